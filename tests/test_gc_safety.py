"""Collection safety: deletion never leaves the store (by directory fds),
collection never starts what it cannot finish, stale gcroots/auto links go
only when certain, against real users, real Nix 2.8 and real races."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import support
from .support import standalone, tree_snapshot, valid_set, verify_clean

# The store's owner, racing a root collection of its store: swap each dead
# path's `sub` directory for a symlink to a victim directory of the same
# shape, and back, as fast as it can.
_SWAPPER = r"""
import os, sys, time
paths, victim, stop = sys.argv[1].split(":"), sys.argv[2], sys.argv[3]
swaps = 0
while not os.path.exists(stop):
    for p in paths:
        try:
            os.rename(p + "/sub", p + "/sub.moved")
            os.symlink(victim, p + "/sub")
            swaps += 1
        except OSError:
            pass
    for p in paths:
        try:
            os.unlink(p + "/sub")
            os.rename(p + "/sub.moved", p + "/sub")
        except OSError:
            pass
print(swaps)
"""


def _tree(sub: Path, text: str) -> None:
    """The shape both a dead path's `sub` and the victim have: d*/f*, read-only."""
    for i in range(SUBDIRS):
        d = sub / f"d{i}"
        d.mkdir(parents=True)
        for k in range(2):
            (d / f"f{k}").write_text(text)
            (d / f"f{k}").chmod(0o444)
        d.chmod(0o555)
    sub.chmod(0o555)


SUBDIRS = 30


def test_deletion_never_follows_a_swapped_directory(scratch, users):
    """Root collects a store owned by another user (`--standalone gc --yes`,
    the --take-store layout) while that user swaps directories inside dead
    paths for symlinks to root's directories: nothing outside the store is
    deleted or chmodded, and every collection either completes or stops with
    a clear error; one more run afterwards leaves no garbage."""
    victims = scratch / "victims" / "victim"
    _tree(victims, "root's file\n")
    before = tree_snapshot(scratch / "victims")
    swaps = rounds = 0
    outcomes = []
    while rounds < 4 or swaps < 100:
        root = scratch / f"store{rounds}"
        full = support.tiny_store(root, [f"p{i}" for i in range(40)], refs=[], derivers={},
                                  roots=[0])
        dead = [root / p.lstrip("/") for p in full[1:]]
        for d in dead:
            _tree(d / "sub", "garbage\n")
        support.chown_tree(root / "nix", support.DAEMON_USER)
        stop = scratch / f"stop{rounds}"
        racer = subprocess.Popen(
            ["runuser", "-u", support.DAEMON_USER, "--", sys.executable, "-c", _SWAPPER,
             ":".join(map(str, dead)), str(victims), str(stop)], stdout=subprocess.PIPE)
        time.sleep(0.2)
        out = standalone(root, "gc", "--yes", check=False)
        stop.touch()
        swaps += int(racer.communicate(timeout=60)[0])
        outcomes.append(out.returncode)
        err = out.stderr.decode(errors="replace")
        assert out.returncode in (0, 1) and "Traceback" not in err and "internal error" not in err, err
        assert tree_snapshot(scratch / "victims") == before, f"round {rounds}: {err}"
        assert valid_set(root) == {full[0].encode()} or out.returncode == 1
        standalone(root, "gc", "--yes")  # nobody racing: the rest goes
        assert standalone(root, "dead").stdout == b""
        assert set(os.listdir(root / "nix/store")) - {".links"} == {full[0].split("/")[-1]}
        rounds += 1
    assert tree_snapshot(scratch / "victims") == before
    print(f"{swaps} swaps during {rounds} root collections; exit codes {outcomes}")
