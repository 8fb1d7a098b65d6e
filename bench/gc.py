#!/usr/bin/env python3
"""`gcroots-query gc` (helper + gcrootsd, real deletion) vs `nix-store --gc`
on identical fresh copies of the same generated store, at 10k and 100k
paths.  Prints the ratio (goal: >= 10x at 100k).  Run as root on tmpfs:

  ./.venv/bin/python bench/gc.py [--sizes 10000,100000] [--runs 1]

Each run gets two fresh copies (cp -a keeps hard links); generation and
copying are not timed.  The outcome is checked: both leave the same valid
paths."""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, NIX_ORACLE, clone_store, cleanup, make_store, median, pipeline  # noqa: E402


def valid(root: Path) -> set[str]:
    # mode=ro, not immutable: the last transactions may still be in the WAL.
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT path FROM ValidPaths")}
    finally:
        db.close()


def ours(root: Path) -> tuple[float, bytes]:
    run = root.parent / (root.name + "-run")
    try:
        with pipeline(root, run) as (sock, _):
            t0 = time.perf_counter()
            out = subprocess.run([str(BIN / "gcroots-query"), "--socket", str(sock), "gc",
                                  "--yes"], capture_output=True, check=True)
            return time.perf_counter() - t0, out.stderr.strip().splitlines()[-1]
    finally:
        cleanup(run)


def nix(root: Path) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    out = subprocess.run([str(NIX_ORACLE), str(root), "nix-store", "--gc"], capture_output=True,
                         check=True)
    return time.perf_counter() - t0, out.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    for n in [int(x) for x in args.sizes.split(",")]:
        base = make_store(f"gc-{n}", paths=n, roots=1000, indirect=100, stale=20)
        t_ours, t_nix = [], []
        for _ in range(args.runs):
            a, b = clone_store(base, f"gc-{n}-ours"), clone_store(base, f"gc-{n}-nix")
            dt, ours_summary = ours(a)
            t_ours.append(dt)
            dt, nix_summary = nix(b)
            t_nix.append(dt)
            same = "same result" if valid(a) == valid(b) else "RESULTS DIFFER"
            cleanup(a, b)
        o, t = median(t_ours), median(t_nix)
        print(f"{n:>7} paths: gcroots {o:.2f}s ({ours_summary.decode()}) | nix-store --gc {t:.2f}s "
              f"({nix_summary.decode()}) | {t / o:.1f}x faster, {same}", flush=True)
        cleanup(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
