#!/usr/bin/env python3
"""The dead set, side by side in one run on the same generated store:
`nix-store --gc --print-dead` against

- standalone: `gcroots-query --standalone dead`, a fresh process (start-up
  included), as nix-store is;
- warm: `gcroots-query dead` through the real pipeline (gcroots-helper
  serving, gcrootsd answering from its graph);
- changed: the first query after Nix registered paths (10; at 1M, 1,000
  each time) -- gcrootsd follows the DB: the graph stays warm;
- cold: the first query after a change only a full load follows (another
  process deleted a path): gcrootsd answers from SQLite while it reloads.

Every answer is checked against Nix's.  Prints medians and ranges, the
ratios, gcrootsd's resident memory (now and peak) and the load average.

  ./.venv/bin/python bench/dead.py                        # 100k paths
  ./.venv/bin/python bench/dead.py --paths 1000000        # 1M: ours only, +1,000 nix-store --add
  ./.venv/bin/python bench/dead.py --paths 1000000 --nix  # ... checked against Nix's answer (minutes)

Run as root.  Stores are generated once and cached (bench/common.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, BIN, NIX_ORACLE, cleanup, daemon_stats, load_average, make_store,  # noqa: E402
                    median, memory_kib, pipeline, run_timed, summary)


def nix_dead(root: Path) -> tuple[float, bytes]:
    t, _, out = run_timed([str(NIX_ORACLE), str(root), "nix-store", "--gc", "--print-dead"])
    return t, out


def same(ours: bytes, theirs: bytes) -> str:
    return "= nix-store" if sorted(ours.split()) == sorted(theirs.split()) else "DIFFERS FROM NIX"


def add_paths(root: Path, count: int) -> None:
    """`count` new paths registered by one real `nix-store --add`."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        files = []
        for i in range(count):
            f = Path(tmp) / f"bench-added-{i}"
            f.write_text(f"added {i} {time.time()}\n")
            files.append(str(f))
        subprocess.run([str(NIX_ORACLE), str(root), "nix-store", "--add", *files], check=True,
                       stdout=subprocess.DEVNULL)


def graph_loads(log: BinaryIO) -> int:
    """How many graphs gcrootsd has loaded, by its log."""
    log.flush()
    with open(log.name, "rb") as f:
        return f.read().count(b'"graph_loaded"')


def delete_one_dead(root: Path, dead: bytes) -> None:
    """Another process deletes a path (nix-store --delete of a garbage path
    nothing refers to): a change only a full load of the graph follows."""
    for p in dead.split()[::-1]:
        out = subprocess.run([str(NIX_ORACLE), str(root), "nix-store", "--delete", p.decode()],
                             capture_output=True)
        if out.returncode == 0:
            return
    raise RuntimeError("no dead path could be deleted")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--nix", action="store_true", help="at 1M paths, also Nix's answer (minutes)")
    args = p.parse_args()
    n = args.paths
    big = n >= 1_000_000
    print(f"load average before: {load_average()}", flush=True)
    root = make_store(f"dead-{n}", paths=n, roots=1000, indirect=100, stale=0)
    # At 1M Nix takes minutes: its answer only where the target needs it
    # (after the 1,000 additions), with --nix.
    ratios = not big
    theirs_t, theirs = [], b""
    if ratios:  # first: Nix would delete junk entries (there are none here)
        for _ in range(args.runs):
            t, theirs = nix_dead(root)
            theirs_t.append(t)
    q = [str(BIN / "gcroots-query")]
    standalone, rss_standalone = [], 0
    for _ in range(args.runs):
        t, rss, ours = run_timed(q + ["--standalone", "--root", str(root), "dead"])
        standalone.append(t)
        rss_standalone = max(rss_standalone, rss)

    def ratio(ts: list[float]) -> str:
        return f"  {median(theirs_t) / median(ts):.1f}x nix-store" if ratios else ""

    lines = [f"{n} paths, {len(ours.splitlines())} dead, {args.runs} runs each: median [min-max]"]
    if ratios:
        lines.append(f"nix-store --print-dead  {summary(theirs_t)}")
    lines.append(f"standalone              {summary(standalone)}{ratio(standalone)}  "
                 + (same(ours, theirs) + "  " if ratios else "")
                 + f"peak RSS {rss_standalone / 1024:.0f} MiB")
    run = BENCH_DIR / f"dead-{n}-run"
    run.mkdir(parents=True, exist_ok=True)
    daemon_log = open(run.parent / f"dead-{n}-gcrootsd.log", "w+b")
    with daemon_log, pipeline(root, run, daemon_log=daemon_log) as (sock, daemon):
        query = q + ["--socket", str(sock), "dead"]
        run_timed(query)  # the first answer builds what later ones share
        warm = []
        for _ in range(args.runs):
            t, _, out = run_timed(query)
            warm.append(t)
        rss_warm = memory_kib(daemon.pid)
        stats = daemon_stats(sock)
        # Nix registers paths (a build farm, all day): followed, still warm.
        # At 1M, each run right after 1,000 paths registered (the figure
        # issue #17 asks for).
        added = 1000 if big else 10
        changed, outs_changed = [], []
        for i in range(args.runs):
            add_paths(root, added)
            t, _, out_changed = run_timed(query)
            changed.append(t)
            if i == 0:
                checked = ""
                if ratios or args.nix:
                    checked = ": " + same(out_changed, nix_dead(root)[1])
                outs_changed.append(f"first {t:.3f}s{checked}")
        rss_changed = memory_kib(daemon.pid)
        nix_changed = nix_dead(root)[1] if ratios else b""
        # Another process deletes a path: SQLite answers while the graph reloads.
        cold, out_cold = [], out_changed
        for _ in range(1 if big else args.runs):
            loads = graph_loads(daemon_log)   # (before the last deletion: its reload may come first)
            # (from the last answer: a path deleted before is no change)
            delete_one_dead(root, out_cold)
            t, _, out_cold = run_timed(query)
            cold.append(t)
            time.sleep(15 if big else 2)  # the reload, done before the next change
        # Answered from a graph loaded after the last deletion: gcrootsd
        # reloads at most every 20 times the last load took (~2 min at 1M),
        # when a query finds its graph stale; until then SQLite answers.
        waited = time.monotonic()
        while graph_loads(daemon_log) <= loads and time.monotonic() - waited < 600:
            run_timed(query)
            time.sleep(5)
        run_timed(query)
        rss_after = memory_kib(daemon.pid)
        nix_cold = nix_dead(root)[1] if ratios else b""

    lines.append(f"daemon warm             {summary(warm)}{ratio(warm)}  "
                 + (same(out, theirs) if ratios else ""))
    lines.append(f"daemon changed          {summary(changed)}{ratio(changed)}  "
                 + (same(out_changed, nix_changed) + "  " if ratios else "")
                 + f"(each right after a nix-store --add of {added} paths; {'; '.join(outs_changed)})")
    lines.append(f"daemon cold             {summary(cold)}{ratio(cold)}  "
                 + (same(out_cold, nix_cold) if ratios else "")
                 + "  (after nix-store --delete by another process)")
    lines.append(f"gcrootsd resident: {rss_warm[0] / 1024:.0f} MiB after answering (peak "
                 f"{rss_warm[1] / 1024:.0f}), {rss_changed[0] / 1024:.0f} MiB after the additions, "
                 f"{rss_after[0] / 1024:.0f} MiB after the reload and an answer (peak {rss_after[1] / 1024:.0f}); "
                 f"its stats: resident_bytes {int(stats['resident_bytes']) / 2**20:.0f} MiB")
    lines.append(f"load average after: {load_average()}")
    print("\n".join(lines), flush=True)
    cleanup(root, run)
    return 0

if __name__ == "__main__":
    sys.exit(main())
