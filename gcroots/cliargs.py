"""The argument types of gcroots-query and gcrootsd: sizes, durations,
seconds, counts, ports (uids and modes, which the helper parses too, are
gcroots.argtypes'), and the three commands' help and --version.
Each is range-checked while the command line is parsed, so a bad value is a
usage error (exit 2) naming the flag -- never a failure half-way through a
collection.  Standard library only.

Sizes: bytes, or a number with a binary unit K, M, G or T (1K = 1024, as
Nix), optionally followed by B or iB: `4096`, `500M`, `10G`, `1.5TiB`.  A
percentage `N%` (0 < N <= 100) is parsed too (parse_size(percent=True)),
but only a flag that documents it accepts it.

Durations: one or more terms `<number><unit>`, e.g. `30s`, `5min`, `12h`,
`14d`, `2w`, `1w2d`, `1.5h`; units s, min, h, d, w, mo (a month: 30 days)
and y (365 days).  A bare `m` is refused as ambiguous (`min` or `mo`?), and
so is a number without a unit.  Flags given in SECONDS take a plain number.

(`profiles delete-generations <N>d` is Nix's own grammar, not this one: see
client/profiles.py.)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import NamedTuple

from .argtypes import checked, integer

MAX_SIZE = 2**63 - 1          # bytes: what SQLite, JSON and Nix's uint64 all carry
MAX_DURATION = 100 * 365 * 86400.0
MAX_COUNT = 2**31 - 1
MAX_THROTTLE = 3600.0         # gc --throttle: seconds between deletion batches

_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGT]?)(?:I?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")
_TERM = re.compile(r"([0-9]+(?:\.[0-9]+)?)(min|mo|s|m|h|d|w|y)?")
DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400,
                  "mo": 30 * 86400, "y": 365 * 86400}


class Percent(NamedTuple):   # (not a dataclass: see protocol/admin.py's events)
    """`N%` of something the flag names (e.g. the store's file system)."""
    value: float  # 0 < value <= 100


def parse_size(text: str, *, percent: bool = False) -> int | Percent:
    """Bytes (or, with percent=True, a Percent); ValueError saying why."""
    s = text.strip()
    if percent and (m := _PERCENT.fullmatch(s)):
        value = float(m.group(1))
        if not 0 < value <= 100:
            raise ValueError(f"{text!r} is not a percentage between 0 and 100")
        return Percent(value)
    m = _SIZE.fullmatch(s)
    if not m:
        forms = "4096, 500M, 10G, 1.5T" + (" or 10%" if percent else "")
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T: {forms})")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).upper()]
    value = int(float(number) * unit) if "." in number else int(number) * unit
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is too large (at most {MAX_SIZE} bytes)")
    return value


def parse_duration(text: str) -> float:
    """Seconds; ValueError saying why."""
    s, pos, total = text.strip(), 0, 0.0
    for m in _TERM.finditer(s):
        if m.start() != pos:
            break
        unit = m.group(2)
        if unit is None and m.end() == len(s):
            raise ValueError(f"{text!r}: {m.group(1)} needs a unit (s, min, h, d, w, mo or y)")
        if unit is None:
            break
        if unit == "m":
            raise ValueError(f"{text!r}: 'm' is ambiguous: write 'min' for minutes or 'mo' for "
                             "months (30 days)")
        total += float(m.group(1)) * DURATION_UNITS[unit]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5min, 12h, 14d, 2w, 1w2d; "
                         "units s, min, h, d, w, mo = 30 days, y = 365 days)")
    if total > MAX_DURATION:
        raise ValueError(f"{text!r} is too long (at most 100 years)")
    return total


def format_duration(seconds: float) -> str:
    """An exact spelling in one unit: 2w, 30d, 12h, 90s."""
    for unit in ("w", "d", "h", "min"):
        size = DURATION_UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- argparse types: argparse names the flag in front of the message (exit 2) --

def size(*, minimum: int = 0, percent: bool = False):
    def parse(text: str):
        value = parse_size(text, percent=percent)
        if isinstance(value, int) and value < minimum:
            raise ValueError(f"{text!r}: must be at least {minimum} byte{'s' * (minimum != 1)}")
        return value
    return checked("size", parse)


def duration(*, positive: bool = True):
    def parse(text: str) -> float:
        value = parse_duration(text)
        if positive and value <= 0:
            raise ValueError(f"{text!r}: must be longer than 0")
        return value
    return checked("duration", parse)


def seconds(*, maximum: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or not 0 <= value <= maximum:
            raise ValueError(f"{text!r}: must be between 0 and {maximum:g} seconds")
        return value
    return checked("seconds", parse)


def count(*, minimum: int = 0, maximum: int = MAX_COUNT):
    return checked("count", lambda t: integer(t, "a whole number", minimum, maximum))


def _port(text: str) -> str:
    integer(text.rpartition(":")[2], "[HOST:]PORT with a port number", 1, 65535)
    return text


host_port = checked("address", _port)   # [HOST:]PORT, returned as given


# -- help and --version: the same for the three commands ----------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples (epilogs) as written; every flag's help
    says its default, unless there is none to say (None, False) or the help
    already names it."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        # The width as argparse finds it (shutil.get_terminal_size), without
        # importing shutil (and bz2, lzma, ...): a formatter is made for
        # every flag added, so every start paid ~3 ms for it.
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or default == [] or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else the terminal's,
    else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def describe(text: str) -> str:
    """A description paragraph wrapped for --help (the formatter keeps
    descriptions as written, for lists like the exit codes)."""
    import textwrap
    return textwrap.fill(" ".join(text.split()), 79)


def package_version() -> str:
    """The installed package's version (its metadata), as --version says it."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gcroots")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, looked up only when asked (importlib.metadata is not
    cheap, and the helper starts often)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version, help="print the version and exit")
