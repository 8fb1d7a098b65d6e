"""Shared bits for the benchmarks: generated stores on tmpfs, the oracle, and
side-by-side timing.  Benchmarks print ratios; they never assert timings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests import storegen  # noqa: E402

NIX_ORACLE = Path(storegen.ORACLE)
BIN = Path(sys.executable).parent
BENCH_DIR = Path(os.environ.get("GCROOTS_BENCH_DIR", "/dev/shm/gcroots-bench"))


CACHE_DIR = Path(os.environ.get("GCROOTS_BENCH_CACHE", "/var/cache/gcroots-bench"))

# Timed as installed: a package (pip, Nix) ships its modules compiled, but
# this checkout's editable install, run with PYTHONDONTWRITEBYTECODE=1 (as
# here), would compile every module at every start (~30 ms of a 0.3 s
# `--standalone dead`).  Compiled once into __pycache__ (git-ignored).
subprocess.run([sys.executable, "-m", "compileall", "-q",
                *(str(REPO / d) for d in ("gcroots", "client", "daemon", "helper", "protocol"))],
               check=True, stdout=subprocess.DEVNULL)


def make_store(name: str, paths: int, roots: int, *, seed: int = 1, indirect: int = 100,
               stale: int = 0, profiles: int = 4, generations: int = 5) -> Path:
    """A fresh generated store at BENCH_DIR/name.  Generating takes minutes
    at a million paths, so each one is cached (outside the checkout, keyed by
    the parameters, its physical root -- gcroots/auto names and links depend
    on it -- and the generator's source) and copied into place."""
    root = BENCH_DIR / name
    params = dict(paths=paths, roots=roots, seed=seed, indirect=indirect, stale=stale, quirks=0,
                  profiles=profiles, generations=generations, users=3)
    key = hashlib.sha256(json.dumps([str(root), params]).encode()
                         + Path(storegen.__file__).read_bytes()).hexdigest()[:16]
    cached = CACHE_DIR / f"{paths}-{key}"
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one generator per store at a time
        if not cached.exists():
            storegen.generate(root, **params)
            tmp = cached.with_suffix(".tmp")
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            subprocess.run(["cp", "-a", str(root), str(tmp)], check=True)
            tmp.rename(cached)
            return root
    subprocess.run(["cp", "-a", str(cached), str(root)], check=True)
    return root


def clone_store(src: Path, name: str) -> Path:
    dst = BENCH_DIR / name
    if dst.exists():
        subprocess.run(["rm", "-rf", str(dst)], check=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def nix_env() -> dict:
    env = dict(os.environ)
    env.pop("NIX_REMOTE", None)
    return env


# Where run_timed reads a command's stdout: made (and faulted in) before the
# clock starts, kept for the next run.
_OUTPUT = bytearray()


def run_timed(cmd: list[str], **kw) -> tuple[float, int, bytes]:
    """Wall time, peak RSS (KiB) of this child (and of those it waited for),
    stdout."""
    # Through GNU time (scripts/bootstrap installs it): a child's ru_maxrss
    # starts at its parent's resident size when it forked (the kernel copies
    # the high-water mark), and this process may hold hundreds of MiB; a child
    # of `time` starts at ~2 MiB.  Its fork and exec cost ~1 ms.
    # Its stdout is read as a consumer that streams it (`wc -l`, `xargs`)
    # would, into memory this process made before: growing a buffer for a
    # 1M-path answer (~65 MB, each page faulted in on this VM) took this
    # reader ~40 ms, which is no time of the command's.  (nix-store's output
    # is read the same way.)
    global _OUTPUT
    if not _OUTPUT:
        _OUTPUT = bytearray(160 << 20)
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name, *cmd],
                             stdout=subprocess.PIPE, stderr=err, bufsize=0, **kw)
        with p.stdout:
            n, view, spill = 0, memoryview(_OUTPUT), []
            while True:
                got = p.stdout.readinto(view[n:]) if n < len(view) else 0
                if not got:
                    if n < len(view) or not (more := p.stdout.read()):
                        break
                    spill.append(more)  # (more than the buffer holds: read as it comes)
                    continue
                n += got
        p.wait()
        dt = time.perf_counter() - t0
        out = bytes(view[:n]) + b"".join(spill)
        view.release()
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[:3]}... failed ({p.returncode}): {err.read()[-2000:]!r}")
        maxrss = int(rss.read().split()[-1])
    return dt, maxrss, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summary(xs: list[float]) -> str:
    """median [min-max] over the runs"""
    return f"{median(xs):7.3f}s [{min(xs):.3f}-{max(xs):.3f}]"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process: resident now, and the most so far."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1])
    return out["VmRSS"], out["VmHWM"]


def daemon_stats(sock: Path) -> dict[str, str]:
    """gcrootsd's `stats` answer."""
    from gcroots.client import conn
    return {k.decode(): v.decode() for k, v in conn.request(str(sock), "stats").rows}


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{theirs / ours:.1f}x faster" if ours <= theirs else f"{ours / theirs:.2f}x slower"


def cleanup(*roots: Path) -> None:
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


@contextlib.contextmanager
def pipeline(root: Path, run: Path, helper_args: tuple[str, ...] = (), daemon_log=None):
    """gcroots-helper and gcrootsd serving `root`; yields (gcrootsd's socket,
    gcrootsd's process).  `daemon_log`: a file for gcrootsd's log lines."""
    from tests.support import wait_for_socket

    run.mkdir(parents=True, exist_ok=True)
    helper = subprocess.Popen([str(BIN / "gcroots-helper"), "serve", "--root", str(root),
                               "--socket", str(run / "h.sock"), *helper_args],
                              stderr=subprocess.DEVNULL)
    daemon = None
    try:
        wait_for_socket(run / "h.sock", helper)
        daemon = subprocess.Popen([str(BIN / "gcrootsd"), "--root", str(root), "--helper-socket",
                                   str(run / "h.sock"), "--socket", str(run / "d.sock")],
                                  stderr=daemon_log or subprocess.DEVNULL)
        wait_for_socket(run / "d.sock", daemon)
        # The socket accepts before gcrootsd has read the store graph (clients
        # wait in the backlog): time nothing before it answers.
        from gcroots.client import conn
        conn.request(str(run / "d.sock"), "ping")
        yield run / "d.sock", daemon
    finally:
        for p in (daemon, helper):
            if p is not None:
                p.terminate()
                p.wait()
