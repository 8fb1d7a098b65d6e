#!/usr/bin/env python3
"""gcroots-helper vs nix-store --gc --print-roots, side by side on the same
generated stores (1k, 10k and 100k direct roots).  Prints the ratio of our
time to Nix's (goal: <= 1.0x).  Run as root: ./.venv/bin/python bench/roots.py

Two numbers for us:
- `scan`: the one-shot CLI, a fresh Python process like nix-store's;
- `served`: one connection to a running `gcroots-helper serve`, until its
  trailer -- what gcrootsd pays per scan in deployment.
Both sides scan /proc too.  Nix's scan removes stale links, so the stores
have none."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, BIN, NIX_ORACLE, REPO, cleanup, fmt_ratio, make_store,  # noqa: E402
                    median, run_timed)

sys.path.insert(0, str(REPO))
from tests.support import read_root_stream, roots_of, wait_for_socket  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1000,10000,100000", help="root counts")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print(f"{'roots':>8} {'nix-store':>10} {'scan':>8} {'served':>8}  ratios (ours/nix)")
    for n in [int(x) for x in args.sizes.split(",")]:
        root = make_store(f"roots-{n}", paths=max(n, 10000), roots=n, stale=0)
        sock = BENCH_DIR / f"roots-{n}.sock"
        server = subprocess.Popen([str(BIN / "gcroots-helper"), "serve", "--root", str(root),
                                   "--socket", str(sock)], stderr=subprocess.DEVNULL)
        try:
            wait_for_socket(sock, server)
            ours, served, theirs = [], [], []
            for _ in range(args.runs):
                t, _, out_nix = run_timed([str(NIX_ORACLE), str(root), "nix-store", "--gc",
                                           "--print-roots"])
                theirs.append(t)
                t, _, out_ours = run_timed([str(BIN / "gcroots-helper"), "scan", "--root", str(root)])
                ours.append(t)
                t0 = time.perf_counter()
                events, end, _ = read_root_stream(sock)
                served.append(time.perf_counter() - t0)
                assert end.complete, end.reason
        finally:
            server.terminate()
            server.wait()
        strip = lambda b: {x for x in b.split(b"\n") if x and not x.startswith(b"/proc/")}  # noqa: E731
        same = "same output" if strip(out_nix) == strip(out_ours) else "OUTPUT DIFFERS"
        stream_roots = len({lbl for lbl, _ in roots_of(events) if not lbl.startswith(b"/proc/")})
        o, s_, t = median(ours), median(served), median(theirs)
        print(f"{n:>8} {t:>9.3f}s {o:>7.3f}s {s_:>7.3f}s  scan {o / t:.2f}x, served {s_ / t:.2f}x"
              f" ({fmt_ratio(s_, t)} served; {same}; {stream_roots} roots streamed)", flush=True)
        cleanup(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
