"""Range-checked integer argument types, shared by the three commands: a
bad value is a usage error (exit 2) naming the flag.  The only ones the
serving helper parses (uids, modes) live here, apart from gcroots.cliargs
(sizes, durations, help and --version of gcroots-query and gcrootsd), so
that `gcroots-helper serve` loads no more than it uses.  Standard library
only."""

from __future__ import annotations

import argparse
from typing import Any, Callable

MAX_UID = 2**32 - 2           # (uid_t)-1 means "no uid"


def checked(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: parse's ValueError becomes a usage error, which
    argparse prefixes with the flag."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name
    return convert


def integer(text: str, what: str, lo: int, hi: int, base: int = 10) -> int:
    """`text` as a whole number (decimal, or octal with base=8) between lo and hi."""
    digits = text.strip().removeprefix("0o" if base == 8 else "")
    if not digits.isascii() or not digits.isdigit() or base == 8 and not set(digits) <= set("01234567"):
        raise ValueError(f"{text!r} is not {what}")
    value = int(digits, base)
    if not lo <= value <= hi:
        shown = (lambda v: f"{v:04o}") if base == 8 else str
        raise ValueError(f"{text!r}: must be between {shown(lo)} and {shown(hi)}")
    return value


file_mode = checked("mode", lambda t: integer(t, "an octal mode such as 0600", 0, 0o777, base=8))
uid = checked("uid", lambda t: integer(t, "a numeric uid", 0, MAX_UID))
