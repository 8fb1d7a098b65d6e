"""Collection safety: deletion never leaves the store (by directory fds),
collection never starts what it cannot finish, stale gcroots/auto links go
only when certain, against real users, real Nix 2.8 and real races."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import support
from .support import Pipeline, standalone, tree_snapshot, valid_set, verify_clean

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


# -- collection never starts what it cannot finish ---------------------------------

def _store_with_dead_dirs(root: Path, seed: int) -> list[Path]:
    """A real store; its dead paths (physical), those that hold a
    subdirectory first, then the plain files."""
    support.make_store(root, paths=300, seed=seed, quirks=0, roots=5, indirect=0, stale=0)
    dead = [root / p.decode().lstrip("/") for p in standalone(root, "dead").stdout.split()]
    out = [d for d in dead if d.is_dir() and any(c.is_dir() for c in d.iterdir())]
    assert len(out) >= 3
    return out + [d for d in dead if d.is_file()]


def _state(root: Path) -> tuple[set[bytes], set[str]]:
    return valid_set(root), set(os.listdir(root / "nix/store"))


def _refused(run, root: Path, *phrases: str) -> None:
    """Both the plan (dry run) and the collection refuse, naming the path and
    the reason, exit 1, and nothing in the DB or the store changes."""
    before = _state(root)
    for args in (("--dry-run",), ("--yes",)):
        out = run("gc", *args)
        err = out.stderr.decode(errors="replace")
        assert out.returncode == 1, err
        assert "refusing to collect, nothing was deleted: cannot delete" in err, err
        for phrase in phrases:
            assert phrase in err, err
        assert _state(root) == before


def test_refused_in_a_sticky_store_and_for_dirs_it_cannot_make_writable(scratch, users, pipelines):
    """The stock layout when gcrootsd is not root: the store dir is 1775
    root:<group>, and a path that another user owns may be removed only by
    its owner.  Likewise a directory inside a dead path that gcrootsd may
    not make writable.  Refused before the plan is shown and before the
    first row is invalidated; collects once the cause is gone."""
    root = scratch / "store"
    dead = _store_with_dead_dirs(root, 91)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    daemon = pwd.getpwnam(support.DAEMON_USER)
    os.chown(root / "nix/store", 0, daemon.pw_gid)
    os.chmod(root / "nix/store", 0o1775)
    support.chown_tree(dead[0], support.ALICE)
    p.start_helper()
    p.start_daemon()
    _refused(p.query, root, str(dead[0]), "sticky", support.ALICE)
    support.chown_tree(dead[0], support.DAEMON_USER)
    sub = next(c for c in dead[1].iterdir() if c.is_dir())
    support.chown_tree(sub, support.ALICE)
    _refused(p.query, root, str(sub), "only its owner may make it writable")
    support.chown_tree(sub, support.DAEMON_USER)
    out = p.query("gc", "--yes")
    assert out.returncode == 0, out.stderr
    assert p.query("dead").stdout == b""
    p.stop()
    support.chown_tree(root / "nix", "root")
    verify_clean(root)


def _chattr(flag: str, path: Path) -> None:
    out = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    if out.returncode != 0:  # tmpfs before Linux 6.0, overlayfs...
        pytest.skip(f"chattr {flag} is not supported here: {out.stderr.decode().strip()}")


def test_refused_for_immutable_entries_and_read_only_mounts(scratch):
    """Root collecting (--standalone): an immutable dead path, an
    append-only one, a read-only bind mount of one -- none of which even
    root can delete -- each refused before anything is deleted; with the
    cause gone, the collection completes."""
    root = scratch / "store"
    dead = _store_with_dead_dirs(root, 92)
    run = lambda *a: standalone(root, *a, check=False)  # noqa: E731
    _chattr("+i", dead[0])
    try:
        _refused(run, root, str(dead[0]), "immutable (chattr +i)")
    finally:
        _chattr("-i", dead[0])
    _chattr("+a", dead[-1])  # a file: a .drv
    try:
        _refused(run, root, str(dead[-1]), "append-only (chattr +a)")
    finally:
        _chattr("-a", dead[-1])
    subprocess.run(["mount", "--bind", str(dead[2]), str(dead[2])], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dead[2])], check=True)
        _refused(run, root, str(dead[2]), "a mount point (read-only)")
    finally:
        subprocess.run(["umount", str(dead[2])], check=True)
    standalone(root, "gc", "--yes")
    assert standalone(root, "dead").stdout == b""
    verify_clean(root)


def test_a_failure_during_deletion_is_clear_and_the_next_run_finishes(scratch, users, pipelines):
    """What the check does not look at (a flag on a file deep inside a
    path) still stops the deletion: a clear error naming the file, never
    "internal error"; the batch is unregistered garbage on disk, which
    `nix-store --verify --check-contents` accepts, and the next collection
    finishes once the cause is gone."""
    root = scratch / "store"
    dead = _store_with_dead_dirs(root, 93)
    victim = next(f for f in next(c for c in dead[0].iterdir() if c.is_dir()).rglob("*")
                  if f.is_file() and not f.is_symlink())
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    _chattr("+i", victim)
    try:
        out = p.query("gc", "--yes")
        err = out.stderr.decode(errors="replace")
        assert out.returncode == 1, err
        assert f"{victim}: Operation not permitted (EPERM)" in err, err
        assert "internal error" not in err and "next collection removes" in err, err
        valid, on_disk = _state(root)
        assert valid <= {b"/nix/store/" + os.fsencode(n) for n in on_disk}
        assert str(dead[0]).encode().replace(os.fsencode(root), b"") not in valid
        verify_clean(root)
    finally:
        _chattr("-i", victim)
    support.chown_tree(root / "nix", support.DAEMON_USER)  # Nix as root took the store dir
    out = p.query("gc", "--yes")
    assert out.returncode == 0, out.stderr
    assert p.query("dead").stdout == b""
    p.stop()
    support.chown_tree(root / "nix", "root")
    verify_clean(root)
