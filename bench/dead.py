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
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, BIN, NIX_ORACLE, REPO, cleanup, make_store, median, run_timed  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.support import wait_for_socket  # noqa: E402


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
    run.mkdir(exist_ok=True)
    helper = subprocess.Popen([str(BIN / "gcroots-helper"), "serve", "--root", str(root),
                               "--socket", str(run / "helper.sock")], stderr=subprocess.DEVNULL)
    daemon = None
    try:
        wait_for_socket(run / "helper.sock", helper)
        daemon = subprocess.Popen([str(BIN / "gcrootsd"), "--root", str(root), "--helper-socket",
                                   str(run / "helper.sock"), "--socket", str(run / "d.sock")],
                                  stderr=subprocess.DEVNULL)
        wait_for_socket(run / "d.sock", daemon)
        query = [str(BIN / "gcroots-query"), "--socket", str(run / "d.sock"), "dead"]
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
    finally:
        for p in (daemon, helper):
            if p is not None:
                p.terminate()
                p.wait()
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
