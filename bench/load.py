#!/usr/bin/env python3
"""gcrootsd under a query flood (issue 12.5): 25 users, each with 8 `dead`
requests in flight that it never reads (the most the per-user limit
admits), on a 100k-path store.  Prints gcrootsd's resident memory and
root's `dead` latency, quiet and under the flood, and how many analyses
and helper scans the flood cost.

  ./.venv/bin/python bench/load.py [--paths 100000] [--users 25] [--per-user 8]

Run as root: the flood comes from processes with uids of their own (the
daemon tells users apart by SO_PEERCRED; the uids need no account)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, BIN, cleanup, daemon_stats, load_average, make_store,  # noqa: E402
                    median, memory_kib, pipeline, run_timed, summary)

from gcroots.protocol import admin  # noqa: E402

FIRST_UID = 61000


def flood(sock: Path, uid: int, count: int) -> int:
    """A process of `uid` holding `count` unread `dead` requests."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        conns = []
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing anyway
            s.connect(str(sock))
            s.sendall(admin.ClientConnection().request("dead"))
            conns.append(s)
        signal.pause()
    finally:
        os._exit(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", type=int, default=100_000)
    p.add_argument("--users", type=int, default=25)
    p.add_argument("--per-user", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    print(f"load average before: {load_average()}", flush=True)
    root = make_store(f"dead-{args.paths}", paths=args.paths, roots=1000, indirect=100, stale=0)
    run = BENCH_DIR / f"load-{args.paths}-run"
    query = [str(BIN / "gcroots-query")]
    children: list[int] = []
    with pipeline(root, run) as (sock, daemon):
        q = query + ["--socket", str(sock), "dead"]
        run_timed(q)
        quiet = [run_timed(q)[0] for _ in range(args.runs)]
        rss_quiet = memory_kib(daemon.pid)
        before = daemon_stats(sock)
        try:
            for i in range(args.users):
                children.append(flood(sock, FIRST_UID + i, args.per_user))
            time.sleep(2)  # all of them connected, asked, and wait on their answers
            loaded = [run_timed(q)[0] for _ in range(args.runs)]
            rss_loaded = memory_kib(daemon.pid)
            after = daemon_stats(sock)
        finally:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    print(f"{args.paths} paths; {args.users} users x {args.per_user} unread `dead` requests "
          f"({args.users * args.per_user} in flight)")
    print(f"root's dead  quiet {summary(quiet)}   flooded {summary(loaded)}   "
          f"{median(loaded) / median(quiet):.2f}x quiet")
    print(f"gcrootsd resident: quiet {rss_quiet[0] / 1024:.0f} MiB, flooded "
          f"{rss_loaded[0] / 1024:.0f} MiB (peak {rss_loaded[1] / 1024:.0f} MiB)")
    print(f"analyses during the flood: {int(after['analyses']) - int(before['analyses'])}, "
          f"helper scans: {int(after['scans']) - int(before['scans'])}")
    print(f"load average after: {load_average()}")
    cleanup(root, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
