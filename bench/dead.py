#!/usr/bin/env python3
"""`gcroots-query dead` through the real pipeline (gcroots-helper serving,
gcrootsd answering) vs `nix-store --gc --print-dead`, side by side on the
same generated stores.  Prints the ratio (goal: >= 20x at 100k paths).

  ./.venv/bin/python bench/dead.py                 # 10k and 100k paths
  ./.venv/bin/python bench/dead.py --million       # also 1M paths: time and peak RSS

gcrootsd reads the store graph once, before it says READY, and keeps it
until the DB changes.  `warm` is the median query; `changed` is the first
query after another process committed to the DB (the daemon then answers
from SQLite while it reloads the graph in the background).  Run as root."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, BIN, NIX_ORACLE, cleanup, make_store, median, pipeline,  # noqa: E402
                    run_timed)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def touch_db(root: Path) -> None:
    """Commit a change (SQLite skips no-op updates), as a Nix process
    registering a path would."""
    import sqlite3
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.execute("UPDATE ValidPaths SET registrationTime = registrationTime + 1 WHERE id = "
               "(SELECT min(id) FROM ValidPaths)")
    db.commit()
    db.close()


def measure(n: int, runs: int, with_nix: bool) -> None:
    root = make_store(f"dead-{n}", paths=n, roots=1000, indirect=100, stale=0)
    run = BENCH_DIR / f"dead-{n}-run"
    with pipeline(root, run) as (sock, daemon):
        query = [str(BIN / "gcroots-query"), "--socket", str(sock), "dead"]
        warm = [run_timed(query)[0] for _ in range(runs)]
        touch_db(root)
        cold, _, ours_out = run_timed(query)
        daemon_rss = rss_kib(daemon.pid)
    theirs = []
    nix_out = b""
    if with_nix:
        for _ in range(runs):
            t, _, nix_out = run_timed([str(NIX_ORACLE), str(root), "nix-store", "--gc",
                                       "--print-dead"])
            theirs.append(t)
    dead = ours_out.count(b"\n")
    line = f"{n:>8} paths, {dead:>7} dead: gcroots warm {median(warm):.3f}s changed {cold:.3f}s"
    if with_nix:
        t = median(theirs)
        same = "same output" if sorted(nix_out.split()) == sorted(ours_out.split()) else "OUTPUT DIFFERS"
        line += (f" | nix-store {t:.3f}s | {t / median(warm):.1f}x faster warm, "
                 f"{t / cold:.1f}x after a DB change ({same})")
    line += f" | gcrootsd peak RSS {daemon_rss / 1024:.0f} MiB"
    print(line, flush=True)
    cleanup(root, run)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--million", action="store_true", help="also 1M paths (ours only; Nix takes minutes)")
    args = p.parse_args()
    for n in [int(x) for x in args.sizes.split(",")]:
        measure(n, args.runs, with_nix=True)
    if args.million:
        measure(1_000_000, 1, with_nix=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
