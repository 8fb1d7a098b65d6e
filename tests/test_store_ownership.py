"""scripts/store-ownership, what scripts/install --take-store and --uninstall
use: the store handed to a user with every owner it changes recorded, and
given back exactly -- never following a link the store's owner planted
meanwhile, never touching the users' own per-user directories, what was
built since left alone (or given to root when its owner is removed).

On a tree under a temp dir (--root), with real users; the container test
(tests/test_container.py) runs the same through scripts/install on /nix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from . import support

TOOL = support.REPO / "scripts" / "store-ownership"
A, B, C = ("0" * 31 + "a-a", "0" * 31 + "b-b", "0" * 31 + "c-c")


def run(action: str, user: str, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", str(TOOL), action, user, "--root", str(root),
                           "--record", str(root / "record"), *extra],
                          capture_output=True, text=True)


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.fixture
def tree(scratch, users) -> Path:
    """A root's store (one path holding a file of bob's) and state dir."""
    root = scratch / "r"
    store = root / "nix/store"
    (store / A / "bin").mkdir(parents=True)
    (store / A / "bin/x").write_text("x")
    (store / A / "lib").mkdir()
    (store / A / "lib/y").write_text("y")
    (store / B).write_text("b")
    (store / C / "sub").mkdir(parents=True)
    (store / C / "sub/bobs").write_text("z")
    os.chown(store / C / "sub/bobs", users[support.BOB].pw_uid, users[support.BOB].pw_gid)
    (store / ".links").mkdir()
    os.link(store / A / "bin/x", store / ".links/xhash")
    os.chmod(store, 0o1775)
    var = root / "nix/var/nix"
    for d in ("db", "temproots", "gcroots/auto", "gcroots/per-user/alice",
              "profiles/per-user/alice"):
        (var / d).mkdir(parents=True)
    (var / "db/db.sqlite").write_text("")
    (var / "temproots/123").write_text("")
    (var / "gc.lock").write_text("")
    os.symlink("/home/somebody/result", var / "gcroots/auto/l")
    alice = users[support.ALICE]
    for d in ("gcroots/per-user/alice", "profiles/per-user/alice"):
        (var / d / "own").write_text("alice's")
        for p in (var / d, var / d / "own"):
            os.chown(p, alice.pw_uid, alice.pw_gid)
    log = root / "nix/var/log/nix/drvs/ab"
    log.mkdir(parents=True)
    (log / "x.drv.bz2").write_text("")
    return root


def everything(root: Path) -> dict[Path, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root / "nix"):
        for name in [*dirnames, *filenames]:
            out[Path(dirpath) / name] = owner(Path(dirpath) / name)
    out[root / "nix"] = owner(root / "nix")
    return out


def test_take_gives_what_a_store_owner_writes_and_records_it_compactly(tree, users):
    before = everything(tree)
    daemon = users[support.DAEMON_USER]
    out = run("take", support.DAEMON_USER, tree)
    assert out.returncode == 0, out.stderr
    now = everything(tree)
    var = tree / "nix/var/nix"
    users_own = {p for p in before if "per-user/alice" in str(p)}
    # The users' own per-user directories and what is in them stay theirs;
    # so do /nix itself and the directories above the state dir.
    assert all(now[p] == before[p] for p in users_own)
    above = {tree / "nix", tree / "nix/var", tree / "nix/var/log", var / "gcroots",
             var / "profiles"}
    assert all(now[p] == before[p] for p in above)
    taken = {p for p in now if now[p] == (daemon.pw_uid, daemon.pw_gid)}
    assert taken == set(before) - users_own - above
    # Of the store, its dir and one line per path (the entries inside a path
    # have the path's owner), bob's file apart; elsewhere every entry.
    store = tree / "nix/store"
    recorded = [r.split(b" ", 2) for r in (tree / "record").read_bytes().split(b"\0") if r]
    assert {Path(tree, os.fsdecode(rel)) for _, _, rel in recorded} == (
        {p for p in taken if store not in p.parents or p.parent == store}
        | {store, store / C / "sub/bobs"})
    assert all((int(u), int(g)) == before[Path(tree, os.fsdecode(rel))] for u, g, rel in recorded)
    again = run("take", support.DAEMON_USER, tree)
    assert again.returncode == 0 and "gave 0 entries" in again.stderr
    assert (tree / "record").read_bytes().count(b"\0") == len(recorded)


def test_restore_gives_back_exactly_what_was_taken(tree, users, scratch):
    before = everything(tree)
    daemon = users[support.DAEMON_USER]
    assert run("take", support.DAEMON_USER, tree).returncode == 0
    store = tree / "nix/store"
    # Meanwhile, as the store's owner: a path built, one collected, and a
    # directory in a path swapped for a link to a directory of the owner's
    # outside the store.
    victim = scratch / "victim"
    victim.mkdir()
    (victim / "file").write_text("v")
    as_daemon = ["runuser", "-u", support.DAEMON_USER, "--"]
    for p in (victim, victim / "file"):
        os.chown(p, daemon.pw_uid, daemon.pw_gid)
    new = store / ("0" * 31 + "d-new")
    subprocess.run([*as_daemon, "mkdir", str(new)], check=True)
    subprocess.run([*as_daemon, "rm", str(store / B)], check=True)
    subprocess.run([*as_daemon, "mv", str(store / A / "lib"), str(store / A / "lib.old")], check=True)
    subprocess.run([*as_daemon, "ln", "-s", str(victim), str(store / A / "lib")], check=True)
    out = run("restore", support.DAEMON_USER, tree)
    assert out.returncode == 0, out.stderr
    now = everything(tree)
    for p, was in before.items():
        if p in now and p != store / A / "lib":
            assert now[p] == was, (p, now[p], was)
    assert owner(new) == (daemon.pw_uid, daemon.pw_gid)      # built since: not ours
    assert owner(victim) == owner(victim / "file") == (daemon.pw_uid, daemon.pw_gid)
    assert owner(store / C / "sub/bobs") == (users[support.BOB].pw_uid, users[support.BOB].pw_gid)
    # The user is to be removed: what it made goes to root.
    out = run("restore", support.DAEMON_USER, tree, "--adopt-rest", "0:0")
    assert out.returncode == 0, out.stderr
    assert owner(new) == (0, 0)
    assert owner(victim) == (daemon.pw_uid, daemon.pw_gid)


def test_unknown_user_is_a_usage_error(tree):
    out = run("take", "no-such-user-here", tree)
    assert out.returncode == 2 and "no such user" in out.stderr
    assert not (tree / "record").exists()
