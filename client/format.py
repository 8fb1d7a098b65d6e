"""Rows -> text (the nix-store formats where there is one) or JSON.

Paths are bytes; text output writes them raw.  JSON cannot carry arbitrary
bytes, so non-UTF-8 bytes appear as \\udcXX escapes (Python's
surrogateescape), which decode back to the exact bytes."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, NamedTuple, Sequence


def s(b: bytes) -> str:
    return os.fsdecode(b)


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 link`, `3 links`, `1 entry`, `2 entries`."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def mib(n: int) -> str:
    """Nix's showBytes: MiB with two decimals."""
    return f"{n / 2**20:.2f} MiB"


def write_json(obj) -> None:
    sys.stdout.buffer.write(json.dumps(obj, indent=1, ensure_ascii=True).encode() + b"\n")
    sys.stdout.buffer.flush()


def error(args, message: str, code: int, **extra) -> int:
    """Report a failure and return its exit code: one line on stderr, or,
    with --json, a JSON object on stdout ({"error": ..., "exit": N, ...})."""
    if getattr(args, "json", False):
        write_json({"error": message, "exit": code, **extra})
    else:
        print(f"gcroots-query: {message}", file=sys.stderr, flush=True)
    return code


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None,
          right: Sequence[int] = (), indent: str = "") -> str:
    """A plain text table: columns as wide as their widest cell; those in
    `right` right-aligned; the last column never padded."""
    cells = ([list(header)] if header else []) + [list(r) for r in rows]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        parts[-1] = r[-1].rjust(widths[-1]) if len(r) - 1 in right else r[-1]
        out.append(indent + "  ".join(parts).rstrip())
    return "\n".join(out) + "\n"


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


class Formatter(NamedTuple):   # (not a dataclass: see protocol/admin.py's events)
    text: Callable
    json: Callable


def _paths_text(rows, args, out):
    out.write(b"".join(r[0] + b"\n" for r in rows))


def _roots_text(rows, args, out):
    out.write(b"".join(label + b" -> " + path + b"\n" for label, path, _ in rows))


def _why_text(rows, args, out):
    for i, (label, *chain) in enumerate(rows):
        if i:
            out.write(b"\n")
        out.write(label + b" -> " + chain[0] + b"\n")
        for p in chain[1:]:
            out.write(b"  -> " + p + b"\n")


def _cost_text(rows, args, out):
    out.write(b"%12s %7s  %s\n" % (b"FREES (NAR)", b"PATHS", b"ROOT"))
    for nbytes, npaths, path, *labels in rows:
        out.write(b"%12s %7s  %s\n" % (human(int(nbytes)).encode(), npaths, path))
        for label in labels:
            out.write(b"%21s  %s\n" % (b"<-", label))


def _stats_text(rows, args, out):
    out.write(b"".join(k + b": " + v + b"\n" for k, v in rows))


def _num(v: bytes):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return {b"true": True, b"false": False}.get(v, s(v))


FORMATTERS = {
    "roots": Formatter(_roots_text, lambda rows, a: [
        {"link": s(label), "path": s(path), "kind": s(kind)} for label, path, kind in rows]),
    "live": Formatter(_paths_text, lambda rows, a: [s(r[0]) for r in rows]),
    "dead": Formatter(_paths_text, lambda rows, a: [s(r[0]) for r in rows]),
    "why": Formatter(_why_text, lambda rows, a: {
        "path": a.path, "chains": [{"root": s(r[0]), "chain": [s(p) for p in r[1:]]} for r in rows]}),
    "cost": Formatter(_cost_text, lambda rows, a: [
        {"nar_bytes": int(r[0]), "paths": int(r[1]), "store_path": s(r[2]),
         "labels": [s(x) for x in r[3:]]} for r in rows]),
    "stats": Formatter(_stats_text, lambda rows, a: {s(k): _num(v) for k, v in rows}),
}
