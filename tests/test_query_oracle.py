"""roots / live / dead equal Nix 2.8's --print-roots / --print-live /
--print-dead on the same store, including the corners of its GC."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gcroots.daemon import engine
from gcroots.daemon.nixconf import GCSettings
from gcroots.daemon.store import StoreDB
from gcroots.layout import StoreLayout
from gcroots.storepath import is_store_basename

from . import support
from .support import nix_roots, oracle, standalone, tree_snapshot


def db_rows(root: Path, query: str, *params) -> list:
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


def ours(root: Path, what: str, env: dict | None = None) -> bytes:
    return standalone(root, what, env=env).stdout


def nix(root: Path, what: str, extra: str = "") -> bytes:
    if what == "roots":
        return nix_roots(root)
    return oracle(root, "nix-store", "--gc", f"--print-{what}", extra_config=extra).stdout


def compare_all(root: Path, keep_outputs: bool = False) -> dict[str, bytes]:
    """Ours first (read-only), then Nix (which deletes junk and stale links)."""
    env = {"NIX_CONFIG": "keep-outputs = true"} if keep_outputs else None
    extra = "keep-outputs = true" if keep_outputs else ""
    before = tree_snapshot(root)
    mine = {w: ours(root, w, env) for w in ("roots", "live", "dead")}
    assert tree_snapshot(root) == before, "a query modified the store"
    # Nix deletes junk during its first run: ask for dead first, as on a
    # fresh store.
    theirs = {w: nix(root, w, extra) for w in ("dead", "live", "roots")}
    # Known deviation: Nix 2.8 deletes entries that are not store paths even
    # in --print-live mode and reports them with the "live" paths.  They are
    # not alive (Nix deletes them); we list them under dead only.
    junk = [line for line in theirs["live"].splitlines()
            if not is_store_basename(line.split(b"/")[-1])]
    for line in junk:
        assert line + b"\n" in mine["dead"]
    theirs["live"] = b"".join(line + b"\n" for line in theirs["live"].splitlines()
                              if line not in junk)
    for w in ("roots", "live", "dead"):
        assert mine[w] == theirs[w], explain(w, mine[w], theirs[w])
    return mine


def explain(what: str, mine: bytes, theirs: bytes) -> str:
    a, b = set(mine.splitlines()), set(theirs.splitlines())
    return (f"{what} differs from nix-store --print-{what}: only ours {sorted(a - b)[:5]}, "
            f"only Nix's {sorted(b - a)[:5]}, order {'same' if a == b else 'n/a'}")


@pytest.mark.parametrize("seed,paths,keep_outputs", [
    (31, 1000, False), (32, 1000, True), (33, 1000, False), (34, 1000, True),
    (35, 10000, False), (36, 10000, True)])
def test_generated_stores_equal_nix(scratch, seed, paths, keep_outputs):
    root = scratch / "store"
    support.make_store(root, paths=paths, seed=seed, quirks=2, roots=100 if paths > 1000 else 40,
                       indirect=20, stale=3)
    out = compare_all(root, keep_outputs)
    assert out["dead"].count(b"\n") > 10 and out["live"].count(b"\n") > 10


HOLDER = r"""
import fcntl, os, sys, time
path = os.path.join(sys.argv[1], str(os.getpid()))
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)           # what a running Nix process holds
os.write(fd, b"".join(p.encode() + b"\0" for p in sys.argv[2:]))
print("ready", flush=True)
time.sleep(600)
"""


def test_store_corners_equal_nix(scratch):
    """Junk names, a .lock file, unregistered paths, valid paths missing on
    disk, temp roots of a live process (by hash part), a stale temp roots
    file: every list still equals Nix's."""
    root = scratch / "store"
    support.make_store(root, paths=1500, seed=37, quirks=2, roots=40, indirect=10, stale=2)
    store = root / "nix/store"
    (store / "junkfile").write_text("junk")
    (store / "junkdir").mkdir()
    (store / ("0" * 32 + "-build.lock")).write_text("")
    (store / ("1" * 32 + "-interrupted-build")).mkdir()
    dead_before = set(ours(root, "dead").split())
    live_before = set(ours(root, "live").split())
    dead_valid = sorted(p.decode() for p in dead_before
                        if db_rows(root, "SELECT 1 FROM ValidPaths WHERE path = ?", p.decode()))
    live_nonroot = sorted(p.decode() for p in live_before
                          if not db_rows(root, "SELECT 1 FROM ValidPaths v JOIN Refs r ON "
                                         "r.reference = v.id WHERE v.path = ? LIMIT 0", p.decode()))
    # Valid paths missing on disk, one dead and one live.
    for p in (dead_valid[3], live_nonroot[7]):
        subprocess.run(["rm", "-rf", str(root) + p], check=True)
    # A live Nix-like process with temp roots: an otherwise dead valid path,
    # an unregistered path on disk, and a path sharing only the hash part of
    # another otherwise dead valid path.
    unreg = "/nix/store/" + "2" * 32 + "-being-built"
    (root / unreg.lstrip("/")).mkdir()
    same_hash = dead_valid[10][:len("/nix/store/") + 32] + "-other-name"
    temproots = root / "nix/var/nix/temproots"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(temproots), dead_valid[5], unreg,
                               same_hash], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        mine = compare_all(root)
        for p in (dead_valid[5], unreg, dead_valid[10]):
            assert p.encode() + b"\n" in mine["live"]
        assert b"/nix/store/junkfile\n" in mine["dead"] and b"-build.lock\n" in mine["dead"]
        assert f"{{temp:{holder.pid}}} -> {same_hash}\n".encode() in mine["roots"]
    finally:
        holder.kill()
        holder.wait()


def test_dead_temp_root_owner_is_ignored_and_file_left_alone(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=38, quirks=0, roots=10, indirect=0, stale=0)
    dead = ours(root, "dead").split()
    victim = dead[0]
    f = root / "nix/var/nix/temproots/999999"
    f.write_bytes(victim + b"\0")  # nobody holds a lock: the owner is dead
    assert victim in ours(root, "dead").split()
    assert f.read_bytes() == victim + b"\0"
    compare_all(root)


def test_keep_derivations_off_equals_nix(scratch):
    root = scratch / "store"
    support.make_store(root, paths=1000, seed=39, quirks=1, roots=40, indirect=5, stale=1)
    env = {"NIX_CONFIG": "keep-derivations = false"}
    mine = {w: ours(root, w, env) for w in ("live", "dead")}
    for w in ("live", "dead"):
        assert mine[w] == nix(root, w, "keep-derivations = false")


def test_queries_are_read_only(scratch):
    root = scratch / "store"
    support.make_store(root, paths=500, seed=40, quirks=2, roots=20, indirect=5, stale=3)
    (root / "nix/store/junk").write_text("x")
    before = tree_snapshot(root)
    for what in ("roots", "live", "dead", "stats", "cost"):
        standalone(root, what)
    assert tree_snapshot(root) == before


def test_user_nix_conf_is_read_like_nix(scratch):
    """keep-outputs in the user's ~/.config/nix/nix.conf (the one
    `gcroots-query --standalone` run by root would see) changes the dead set
    for Nix; ours must follow it, or we would delete outputs Nix keeps."""
    root = scratch / "store"
    support.make_store(root, paths=600, seed=40, quirks=1, roots=20, indirect=3, stale=0)
    home = scratch / "home"
    (home / ".config/nix").mkdir(parents=True)
    (home / ".config/nix/nix.conf").write_bytes(b"# \xff not UTF-8\nkeep-outputs = yes\n")
    env = dict(os.environ, HOME=str(home), NIX_STATE_DIR=str(root / "nix/var/nix"),
               NIX_CONFIG="substituters =\nsandbox = false\nbuild-users-group =")
    for var in ("NIX_REMOTE", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "NIX_USER_CONF_FILES"):
        env.pop(var, None)
    mine = ours(root, "dead", env)  # first: Nix's run deletes junk entries
    default = ours(root, "dead", {"HOME": str(scratch / "nowhere")})
    theirs = subprocess.run(["nix-store", "--store", str(root), "--gc", "--print-dead"],
                            env=env, capture_output=True, check=True).stdout
    assert mine == theirs
    assert default != theirs  # the setting mattered on this store


def test_deriver_that_does_not_list_the_output_equals_nix(scratch):
    """keep-derivations keeps a .drv for a live output only if the output
    names it as deriver *and* the .drv lists the output: that is what Nix's
    collector checks, and what `nix-store --gc --print-dead` and `--gc`
    do.  (Nix 2.8's --print-live walks derivers without the second check
    and lists such a .drv as live too, although its own collector deletes
    it; we list it under dead only, like junk.)"""
    root = scratch / "store"
    full = support.tiny_store(root, ["app", "app.drv", "lib", "lib.drv", "gone", "gone.drv"],
                              refs=[(0, 2)], derivers={0: 1, 2: 3, 4: 5}, roots=[0])
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.execute("DELETE FROM DerivationOutputs WHERE path = ?", (full[2],))
    db.commit()
    db.close()
    lib_drv = full[3].encode() + b"\n"
    mine = {w: ours(root, w) for w in ("live", "dead")}
    assert mine["dead"] == nix(root, "dead"), explain("dead", mine["dead"], nix(root, "dead"))
    assert lib_drv in mine["dead"] and lib_drv not in mine["live"]
    assert mine["live"] == nix(root, "live").replace(lib_drv, b"")
    # The same from the daemon's in-memory graph.
    layout = StoreLayout.make(root=os.fsencode(root))
    db = StoreDB.open(layout)
    try:
        with db.snapshot():
            db.load_graph()
        a = engine.analyze(layout, db, engine.scan_in_process(layout, runtime=False),
                           GCSettings(), want_dead=True)
        assert a.graph is not None
        assert b"".join(p + b"\n" for p in a.dead) == mine["dead"]
    finally:
        db.close()
