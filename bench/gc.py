#!/usr/bin/env python3
"""A full collection, side by side in one run on identical fresh copies of
one generated store (stale links included): `nix-store --gc` against

- daemon: `gcroots-query gc --yes` through the real pipeline (gcroots-helper
  serving, gcrootsd collecting; gcrootsd started before, as it runs all day);
- standalone: `gcroots-query --standalone gc --yes`, a fresh process
  (start-up and the graph's load included), as nix-store is.

Every outcome is checked: all leave the same valid paths.  Prints medians
and ranges, the ratios and the load average.  Run as root on tmpfs:

  ./.venv/bin/python bench/gc.py [--paths 100000] [--runs 3]

Generation and copying are not timed (cp -a keeps hard links)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BIN, NIX_ORACLE, cleanup, clone_store, load_average, make_store,  # noqa: E402
                    median, memory_kib, pipeline, run_timed, summary)


def valid(root: Path) -> set[str]:
    # mode=ro, not immutable: the last transactions may still be in the WAL.
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT path FROM ValidPaths")}
    finally:
        db.close()


PHASES: dict[str, list[float]] = {}  # gcrootsd's seconds_* of each collection


def daemon_gc(root: Path) -> tuple[float, int, bytes]:
    """(time, gcrootsd's peak RSS: the collector is in it, stdout); the
    phase timings of its gc_planned and gc_finished log lines go to PHASES."""
    run = root.parent / (root.name + "-run")
    try:
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "gcrootsd.log", "w+b") as log:
            with pipeline(root, run, daemon_log=log) as (sock, daemon):
                t, _, out = run_timed([str(BIN / "gcroots-query"), "--socket", str(sock), "gc",
                                       "--yes"])
                peak = memory_kib(daemon.pid)[1]
            log.seek(0)
            for line in log:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") in ("gc_planned", "gc_finished"):
                    for k, v in event.items():
                        if k.startswith("seconds_"):
                            PHASES.setdefault(k[8:], []).append(v)
        return t, peak, out
    finally:
        cleanup(run)


def standalone_gc(root: Path) -> tuple[float, int, bytes]:
    return run_timed([str(BIN / "gcroots-query"), "--standalone", "--root", str(root), "gc",
                      "--yes"])


def nix_gc(root: Path) -> tuple[float, int, bytes]:
    return run_timed([str(NIX_ORACLE), str(root), "nix-store", "--gc"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    n = args.paths
    print(f"load average before: {load_average()}", flush=True)
    base = make_store(f"gc-{n}", paths=n, roots=1000, indirect=100, stale=20)
    times: dict[str, list[float]] = {"nix-store --gc": [], "daemon": [], "standalone": []}
    rss: dict[str, int] = {k: 0 for k in times}
    said: dict[str, str] = {}
    differ = []
    for _ in range(args.runs):
        results = {}
        for name, collect in (("nix-store --gc", nix_gc), ("daemon", daemon_gc),
                              ("standalone", standalone_gc)):
            root = clone_store(base, f"gc-{n}-{name.split()[0]}")
            t, peak, out = collect(root)
            times[name].append(t)
            rss[name] = max(rss[name], peak)
            said[name] = out.decode().strip().splitlines()[0]
            results[name] = valid(root)
            cleanup(root)
            time.sleep(1)
        differ += [k for k, v in results.items() if v != results["nix-store --gc"]]
    nix = median(times["nix-store --gc"])
    print(f"{n} paths, {args.runs} runs each: median [min-max]")
    for name, ts in times.items():
        ratio = "" if name.startswith("nix") else f"  {nix / median(ts):.1f}x nix-store"
        print(f"{name:<15} {summary(ts)}{ratio}  peak RSS {rss[name] / 1024:.0f} MiB  "
              f"({said[name]})")
    if PHASES:
        print("daemon phases (gcrootsd's log), median: " + ", ".join(
            f"{k} {median(v):.3f}" for k, v in PHASES.items()))
    print("outcome: " + (f"DIFFERS FROM NIX for {sorted(set(differ))}" if differ else
                         "the same valid paths as nix-store --gc in every run"))
    print(f"load average after: {load_average()}")
    cleanup(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
