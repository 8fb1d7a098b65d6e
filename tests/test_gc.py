"""Garbage collection: equal to nix-store --gc, exact bytes, crash-safe,
safe against a concurrent Nix, never a live path deleted."""

from __future__ import annotations

import json
import os
import sys
import re
import pwd
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcroots.daemon import engine
from gcroots.daemon.gc import Collection, GCOptions, SafetyError
from gcroots.daemon.nixconf import GCSettings
from gcroots.daemon.store import StoreDB
from gcroots.layout import StoreLayout

from . import support
from .support import Pipeline, du_bytes, oracle, standalone, valid_set, verify_clean


def disk_set(root: Path) -> set[str]:
    return set(os.listdir(root / "nix/store")) - {".links"}


def foreign_key_problems(root: Path) -> list:
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        db.close()


def gc_json(p: Pipeline, *args: str, user: str | None = None) -> tuple[int, dict | None, bytes]:
    """(exit code, the answer, the error): with --json an error is a JSON
    object on stdout with the same exit code."""
    out = p.query("gc", "--json", *args, user=user)
    doc = json.loads(out.stdout)
    if out.returncode == 0:
        return 0, doc, out.stderr
    assert doc["exit"] == out.returncode and set(doc) == {"error", "exit"}, doc
    return out.returncode, None, doc["error"].encode()


@pytest.mark.parametrize("seed,paths,optimise", [(71, 1000, False), (72, 1000, True),
                                                 (73, 10000, True)])
def test_gc_leaves_what_nix_leaves(scratch, users, pipelines, seed, paths, optimise):
    root = scratch / "store"
    support.make_store(root, paths=paths, seed=seed, quirks=2, roots=100 if paths > 1000 else 40,
                       indirect=15, stale=4)
    (root / "nix/store/junkfile").write_text("junk")
    if optimise:  # hard links into .links: the byte accounting must see them
        oracle(root, "nix-store", "--optimise")
        assert os.listdir(root / "nix/store/.links")
    twin = scratch / "twin"
    subprocess.run(["cp", "-a", str(root), str(twin)], check=True)  # keeps hard links
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    rc, plan, err = gc_json(p, "--dry-run")
    assert rc == 0, err
    assert valid_set(root) == valid_set(twin) and disk_set(root) == disk_set(twin)  # dry run
    before = du_bytes(root / "nix/store")
    rc, done, err = gc_json(p, "--yes")
    assert rc == 0, err
    freed = before - du_bytes(root / "nix/store")
    assert done["disk_bytes_freed"] == freed
    for key in ("disk_bytes_freed", "nar_bytes_freed", "nix_bytes_freed"):
        assert plan[key] == done[key], key
    assert sorted(plan["paths_list"]) == sorted(done["paths_list"]) and done["paths"] > 100
    assert done["stale_links_removed"] == 4
    nix = oracle(twin, "nix-store", "--gc").stdout.decode().strip()
    # Nix's sentence, with Nix's number (issue 15: it used to carry the disk figure).
    assert nix == (f"{done['paths']} store paths deleted, "
                   f"{done['nix_bytes_freed'] / 2**20:.2f} MiB freed"), nix
    assert valid_set(root) == valid_set(twin)
    assert disk_set(root) == disk_set(twin)
    if optimise:
        assert set(os.listdir(root / "nix/store/.links")) == set(os.listdir(twin / "nix/store/.links"))
    p.stop()
    support.chown_tree(root / "nix", "root")
    verify_clean(root)
    # Nothing left to do.
    assert standalone(root, "dead").stdout == b""


def test_gc_refuses_without_complete_roots(scratch, users, pipelines):
    root = scratch / "store"
    support.make_store(root, paths=500, seed=74, quirks=0, roots=20, indirect=3, stale=0)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    p.stop_helper()
    before = valid_set(root), disk_set(root)
    rc, _, err = gc_json(p, "--yes")
    assert rc == 1 and b"no complete root set" in err
    assert (valid_set(root), disk_set(root)) == before


def test_gc_authorization_busy_and_yes(scratch, users, pipelines):
    root = scratch / "store"
    support.make_store(root, paths=1500, seed=75, quirks=0, roots=20, indirect=3, stale=0)
    p = Pipeline(root, scratch / "run", daemon_args=("--admin-group", support.ADMIN_GROUP))
    pipelines.append(p)
    p.start()
    rc, _, err = gc_json(p, "--yes", user=support.BOB)
    assert rc == 3 and b"needs root or membership in the admin group" in err
    # A dry run is read-only, like `dead`: every user may ask (issue 15: exit 3).
    rc, plan, err = gc_json(p, "--dry-run", user=support.BOB)
    assert rc == 0 and plan["paths"] > 0 and plan["dry_run"], err
    no_yes = p.query("gc")  # not a terminal, no --yes
    assert no_yes.returncode == 2 and b"--yes" in no_yes.stderr
    slow = subprocess.Popen([support.QUERY, "--socket", str(p.sock), "gc", "--yes",
                             "--throttle", "0.5"], stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(e.get("event") == "gc_planned" and not e["dry_run"]
                   for e in p.daemon_events()):
                break
            time.sleep(0.1)
        rc, _, err = gc_json(p, "--yes", user=support.CAROL)  # admin group: allowed, but busy
        assert rc == 4 and b"already running" in err
        rc, _, err = gc_json(p, "--dry-run", user=support.BOB)  # reads: never busy
        assert rc == 0, err
    finally:
        out, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, err
    # The answer on stdout: the summary, not 1500 paths (--print-deleted).
    assert re.fullmatch(rb"\d+ store paths deleted, [\d.]+ MiB freed", out.split(b"\n")[0]), out
    assert b"/nix/store/" not in out


def test_max_freed_stops_early(scratch, users, pipelines):
    root = scratch / "store"
    support.make_store(root, paths=1500, seed=76, quirks=0, roots=20, indirect=3, stale=0)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    _, plan, _ = gc_json(p, "--dry-run")
    rc, done, err = gc_json(p, "--yes", "--max-freed", "100K")
    assert rc == 0, err
    assert done["stopped_at_limit"] and done["nix_bytes_freed"] > 100 * 1024
    assert 0 < done["paths"] < plan["paths"]
    p.stop()
    support.chown_tree(root / "nix", "root")
    verify_clean(root)


def test_read_only_store(scratch, users, pipelines):
    """A read-only store mount: gcrootsd (no capabilities) refuses with a
    clear message; run as root, the collector remounts it read-write in a
    private mount namespace, as Nix does, and collects -- the host's mount
    stays read-only."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=77, quirks=0, roots=5, indirect=0, stale=0)
    store = root / "nix/store"
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True)
        p.start_helper()
        p.start_daemon()
        rc, _, err = gc_json(p, "--yes")
        assert rc == 1 and b"mounted read-only" in err and b"CAP_SYS_ADMIN" in err
        dead = standalone(root, "dead").stdout.split()
        out = standalone(root, "gc", "--yes", check=False)
        assert out.returncode == 0, out.stderr
        assert os.statvfs(store).f_flag & os.ST_RDONLY  # still read-only out here
        assert not set(dead) & valid_set(root)
        assert not any((root / d.decode().lstrip("/")).exists() for d in dead)
    finally:
        p.stop()
        subprocess.run(["umount", str(store)], check=True)


def test_kill_9_at_random_points_is_safe(scratch, users):
    """≥ 20 collections killed with SIGKILL at random moments: the store
    verifies, no live path is lost, and the next run finishes the job."""
    base = scratch / "base"
    expected = scratch / "expected"
    support.make_store(base, paths=1500, seed=78, quirks=1, roots=40, indirect=8, stale=2,
                       expected=expected)
    live = set((expected / "live.txt").read_bytes().split())
    rng = random.Random(78)
    killed_mid_way = 0
    for run in range(20):
        root = scratch / f"run{run}"
        subprocess.run(["cp", "-a", str(base), str(root)], check=True)
        p = Pipeline(root, scratch / f"rundir{run}")
        p.start()
        try:
            client = subprocess.Popen([support.QUERY, "--socket", str(p.sock), "gc", "--yes",
                                       "--throttle", "0.02"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.0, 0.6))
            p.daemon.send_signal(signal.SIGKILL)
            p.daemon.wait()
            client.communicate(timeout=60)
            killed_mid_way += client.returncode != 0
            valid = valid_set(root)
            assert live <= valid, f"run {run}: live paths lost"
            assert foreign_key_problems(root) == [], f"run {run}"
            on_disk = {b"/nix/store/" + os.fsencode(n) for n in disk_set(root)}
            assert valid <= on_disk, f"run {run}: valid paths without files"
            p.daemon = None
            p.start_daemon()
            out = p.query("gc", "--yes")
            assert out.returncode == 0, out.stderr
        finally:
            p.stop()
        assert valid_set(root) == live and foreign_key_problems(root) == []
        assert {b"/nix/store/" + os.fsencode(n) for n in disk_set(root)} == live
        if run % 5 == 0:
            support.chown_tree(root / "nix", "root")
            verify_clean(root)
        subprocess.run(["rm", "-rf", str(root)], check=True)
    assert killed_mid_way >= 5, "the kills never hit a running collection"


TRIVIAL = """derivation {
  name = "built-during-gc-%s";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo %s > $out" ];
}"""


def same_dir_store(scratch: Path, seed: int) -> tuple[Path, Path, Path, dict]:
    """(top, store, state dir, environment for Nix commands): a generated
    store whose logical and physical dirs are the same, so that Nix can
    build in it."""
    top = scratch / "s"
    store, state = top / "store", top / "var"
    support.make_store(Path("/"), paths=3000, seed=seed, quirks=0, roots=30, indirect=5, stale=0,
                       extra=["--store-dir", str(store), "--state-dir", str(state),
                              "--home", str(top / "home")])
    nix_env = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
    nix_env.update(NIX_STORE_DIR=str(store), NIX_STATE_DIR=str(state),
                   NIX_LOG_DIR=str(top / "log"),
                   NIX_CONFIG="substituters =\nsandbox = false\nbuild-users-group =")
    return top, store, state, nix_env


def valid_in(state: Path) -> set[bytes]:
    db = sqlite3.connect(f"file:{state}/db/db.sqlite?mode=ro", uri=True)
    try:
        return {r[0].encode() for r in db.execute("SELECT path FROM ValidPaths")}
    finally:
        db.close()


def test_nix_adding_paths_during_our_collection_survives(scratch, users, pipelines):
    """Real Nix processes run while we collect: `nix-store --add` of a path
    that is garbage right now, and `nix-instantiate` + `nix-store -r` of a
    trivial derivation (a real build).  They announce their paths on
    gc-socket; those paths survive, and the store verifies."""
    top, store, state, nix_env = same_dir_store(scratch, 79)

    def nix(*args: str) -> str:
        out = subprocess.run(args, env=nix_env, capture_output=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.decode().strip()

    layout_args = ("--store-dir", str(store), "--state-dir", str(state))
    q = [support.QUERY, "--standalone", *layout_args, "--no-runtime"]
    dead = set(subprocess.run([*q, "dead"], capture_output=True, check=True).stdout.split())
    db = sqlite3.connect(f"file:{state}/db/db.sqlite?mode=ro&immutable=1", uri=True)
    src = next(p for (p,) in db.execute("SELECT path FROM ValidPaths WHERE ca LIKE 'fixed:r:%' "
                                        "AND path NOT LIKE '%.drv' ORDER BY path") if p.encode() in dead)
    db.close()
    copy = scratch / "readd" / os.path.basename(src).split("-", 1)[1]
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", src, str(copy)], check=True)
    subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
    (scratch / "trivial.nix").write_text(TRIVIAL % (os.getpid(), os.getpid()))
    p = Pipeline(top, scratch / "run", layout_args=layout_args)
    pipelines.append(p)
    p.start()
    collector = subprocess.Popen([support.QUERY, "--socket", str(p.sock), "gc", "--yes",
                                  "--throttle", "0.2"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until we hold gc.lock and deletion began
            if any(e.get("event") == "gc_planned" for e in p.daemon_events()):
                break
            time.sleep(0.05)
        added = nix("nix-store", "--add", str(copy))
        drv = nix("nix-instantiate", str(scratch / "trivial.nix"))
        built = nix("nix-store", "-r", drv)
    finally:
        summary, err = collector.communicate(timeout=300)
    assert collector.returncode == 0, err
    assert added == src
    announced = {e["path"] for e in p.daemon_events() if e.get("event") == "gc_socket_root"}
    assert {src, drv, built} <= announced, "Nix did not go through gc-socket"
    assert re.search(rb"\n  [1-9][0-9]* paths? kept for running Nix processes\n", summary), summary
    db = sqlite3.connect(f"file:{state}/db/db.sqlite?mode=ro", uri=True)
    valid = {r[0] for r in db.execute("SELECT path FROM ValidPaths")}
    db.close()
    for path in (added, drv, built):
        assert path in valid and os.path.exists(path), path
    p.stop()
    out = subprocess.run(["nix-store", "--verify", "--check-contents"], env=nix_env,
                         capture_output=True, text=True)
    problems = [line for line in out.stderr.splitlines()
                if not line.startswith(("checking ", "reading the Nix store", "warning: "))]
    assert out.returncode == 0 and not problems, out.stderr


HELD_BUILD = """derivation {
  name = "held-build-%(tag)s";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ": > %(ready)s; while [ -e %(hold)s ]; do /bin/sleep 0.05; done; echo %(tag)s > $out" ];
}"""


class HeldBuild:
    """`nix-build` as root, its builder waiting until release(): meanwhile
    the Nix process has its temp roots in temproots/<pid>, as root, 0600."""

    def __init__(self, scratch: Path, nix_env: dict, tag: str):
        self.ready, self.hold = scratch / f"{tag}.ready", scratch / f"{tag}.hold"
        self.hold.write_text("")
        expr = scratch / f"{tag}.nix"
        expr.write_text(HELD_BUILD % {"tag": tag, "ready": self.ready, "hold": self.hold})
        self.proc = subprocess.Popen(["nix-build", "--no-out-link", str(expr)], env=nix_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"nix-build did not start: {self.proc.communicate()[1]!r}")
            time.sleep(0.05)

    def temproots_file(self, state: Path) -> os.stat_result:
        return os.stat(state / "temproots" / str(self.proc.pid))

    def release(self) -> str:
        self.hold.unlink(missing_ok=True)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return out.decode().strip()


def test_a_root_nix_build_during_our_collection_is_no_error(scratch, users, pipelines):
    """A Nix process that root starts while we collect keeps its temp roots
    in a file gcrootsd cannot read (root's, 0600).  It announced each of
    them on gc-socket before writing it -- Nix does so while a collector
    holds gc.lock -- so the collection knows them: it must neither fail on
    that file (PermissionError, whenever a batch began while such a process
    lived) nor delete what the build uses."""
    top, store, state, nix_env = same_dir_store(scratch, 83)
    layout_args = ("--store-dir", str(store), "--state-dir", str(state))
    p = Pipeline(top, scratch / "run", layout_args=layout_args)
    pipelines.append(p)
    p.start()
    collector = subprocess.Popen([support.QUERY, "--socket", str(p.sock), "gc", "--yes",
                                  "--throttle", "0.3"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    build = None
    try:
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "gc_planned" for e in p.daemon_events()):
            assert time.monotonic() < deadline and collector.poll() is None
            time.sleep(0.05)
        build = HeldBuild(scratch, nix_env, "during")
        st = build.temproots_file(state)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)  # the cause, present
        # Each batch begins by re-reading the temp roots files: let four
        # batches (64 paths with --throttle) go by while the build runs.
        left = len(os.listdir(store))
        while len(os.listdir(store)) > left - 4 * 64 and collector.poll() is None:
            time.sleep(0.05)
        built = build.release()
        build = None
    finally:
        if build is not None:
            build.release()
        _, err = collector.communicate(timeout=300)
    assert collector.returncode == 0, err
    announced = {e["path"] for e in p.daemon_events() if e.get("event") == "gc_socket_root"}
    assert built in announced and os.path.exists(built) and built.encode() in valid_in(state)


def test_temp_roots_we_cannot_read_stop_a_collection(scratch, users, pipelines):
    """A Nix process that root started *before* our collection took gc.lock
    may use paths listed only in its temp roots file, which gcrootsd cannot
    read: there is no complete root set, so nothing is deleted and the error
    says why -- for queries as for collections -- until the process ends."""
    top, store, state, nix_env = same_dir_store(scratch, 84)
    layout_args = ("--store-dir", str(store), "--state-dir", str(state))
    p = Pipeline(top, scratch / "run", layout_args=layout_args)
    pipelines.append(p)
    p.start()
    build = HeldBuild(scratch, nix_env, "before")
    try:
        # gcrootsd made gc.lock when it started: root's Nix, the first Nix
        # here, did not make it root's (0600, for good: Nix never re-owns it).
        assert (state / "gc.lock").stat().st_uid == pwd.getpwnam(support.DAEMON_USER).pw_uid
        valid, on_disk = valid_in(state), set(os.listdir(store))
        for args in (("dead",), ("gc", "--yes")):
            out = p.query(*args)
            assert out.returncode == 1, out
            assert f"cannot read the temporary roots file {state}/temproots/{build.proc.pid}: " \
                   "a Nix process of root (mode 0600)".encode() in out.stderr, out.stderr
            assert b"internal error" not in out.stderr
        assert valid_in(state) == valid and set(os.listdir(store)) >= on_disk
    finally:
        build.release()
    out = p.query("dead")
    assert out.returncode == 0 and out.stdout, out.stderr


def test_gc_lock_belongs_to_the_state_dir_s_owner(scratch, users):
    """Root collecting (--standalone) gives gc.lock to the state dir's owner,
    also one a root Nix process made: else gcrootsd could never lock it."""
    support.tiny_store(scratch, ["a", "b"], refs=[], derivers={}, roots=[0])
    state = scratch / "nix/var/nix"
    support.chown_tree(scratch / "nix", support.DAEMON_USER)
    owner = pwd.getpwnam(support.DAEMON_USER).pw_uid
    for made_by_root in (False, True):
        if made_by_root:
            (state / "gc.lock").unlink()
            os.close(os.open(state / "gc.lock", os.O_CREAT | os.O_RDWR, 0o600))  # as Nix does
        standalone(scratch, "gc", "--yes")
        st = (state / "gc.lock").stat()
        assert (st.st_uid, st.st_mode & 0o777) == (owner, 0o600)


def test_a_live_referrer_stops_the_collection(scratch):
    """If a path refers to garbage in the DB but we did not know (a Nix
    process registered it after our snapshot), invalidation is refused and
    nothing of that batch is deleted."""
    root = scratch / "store"
    full = support.tiny_store(root, ["a", "b", "c"], refs=[(1, 2)], derivers={}, roots=[0])
    layout = StoreLayout.make(root=os.fsencode(root))
    c = Collection(layout, GCSettings(), GCOptions())
    db = StoreDB.open(layout)
    c.begin()
    try:
        c.plan(engine.scan_in_process(layout, runtime=False), db)
        # A new valid path appears that refers to "c" (garbage so far).
        w = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
        w.execute("INSERT INTO ValidPaths (id, path, hash, registrationTime) VALUES "
                  "(99, '/nix/store/" + "z" * 32 + "-new', 'sha256:x', 1)")
        w.execute("INSERT INTO Refs VALUES (99, 3)")
        w.commit()
        w.close()
        with pytest.raises(SafetyError, match="-new refers to .*-c, which we were about to delete"):
            c.execute(layout.db_path)
    finally:
        c.end()
        db.close()
    assert full[2].encode() in valid_set(root) and (root / full[2].lstrip("/")).exists()


def test_deleters_started_before_the_plan_stop_when_the_collection_ends_without_them(scratch):
    """gcrootsd starts the deletion workers right after begin() (they start
    while the roots are scanned); a collection that ends before execute()
    (a refusal, nothing dead) leaves no worker behind.  A dry run starts none."""
    root = scratch / "store"
    support.tiny_store(root, ["a", "b"], refs=[], derivers={}, roots=[0])
    layout = StoreLayout.make(root=os.fsencode(root))
    c = Collection(layout, GCSettings(), GCOptions())
    c.begin()
    try:
        c.start_deleters()
        workers = [w.proc for w in c._pool.workers]
        assert workers and all(p.poll() is None for p in workers)
    finally:
        c.end()
    assert c._pool is None and [p.returncode for p in workers] == [0] * len(workers)
    dry = Collection(layout, GCSettings(), GCOptions(dry_run=True))
    dry.begin()
    dry.start_deleters()
    assert dry._pool is None
    dry.end()


def test_a_deleter_pool_that_cannot_start_every_worker_leaves_none_running(scratch, monkeypatch):
    """The second worker cannot start (its interpreter is gone): the pool
    raises, and the first one is stopped, not left waiting for work."""
    from gcroots.daemon import deleter, gc as gcmod
    started = []
    real_init = deleter.DeleterProcess.__init__

    def init(self):
        if started:
            monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
        real_init(self)
        started.append(self.proc)
    monkeypatch.setattr(deleter.DeleterProcess, "__init__", init)
    monkeypatch.setattr(gcmod, "_cores", lambda: 2)
    c = Collection(StoreLayout.make(root=os.fsencode(scratch)), GCSettings(), GCOptions())
    with pytest.raises(FileNotFoundError):
        gcmod.DeleterPool(c)
    assert len(started) == 1 and started[0].wait(10) == 0


def test_python_level_referrer_check():
    from gcroots.daemon.graph import StoreGraph
    g = StoreGraph(0, [b"/nix/store/a", b"/nix/store/b"], [1, 1], [[1], []], [-1, -1], {},
                   {b"/nix/store/a": 0, b"/nix/store/b": 1})
    c = Collection(StoreLayout.make(), GCSettings(), GCOptions())
    c._graph = g
    with pytest.raises(SafetyError, match="still referenced by /nix/store/a"):
        c._check_referrers([b"/nix/store/b"], done=set())
    c._check_referrers([b"/nix/store/a", b"/nix/store/b"], done=set())  # referrer first: fine


@pytest.mark.parametrize("min_free", ["1000T", "100%"])  # bytes, or a share of the file system
def test_automatic_collection_when_space_is_low(scratch, users, pipelines, min_free):
    root = scratch / "store"
    support.make_store(root, paths=600, seed=80, quirks=0, roots=20, indirect=3, stale=0)
    dead = standalone(root, "dead").stdout.split()
    p = Pipeline(root, scratch / "run", daemon_args=("--min-free", min_free,
                                                     "--free-check-interval", "0.5s"))
    pipelines.append(p)
    p.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(e.get("event") == "gc_finished" for e in p.daemon_events()):
            break
        time.sleep(0.2)
    finished = [e for e in p.daemon_events() if e.get("event") == "gc_finished"]
    assert finished and finished[0]["by"].startswith("auto (free space")
    assert not set(dead) & valid_set(root)


# -- the property: never a live path deleted ------------------------------------------

@st.composite
def graphs(draw):
    n = draw(st.integers(2, 24))
    refs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))
    refs = [(a, b) for a, b in refs if a > b or a == b]  # a DAG (plus self references)
    derivers = {}
    for out in range(n):
        drv = draw(st.one_of(st.none(), st.integers(0, n - 1)))
        if drv is not None and drv != out and out > drv:
            derivers[out] = drv
    roots = draw(st.lists(st.integers(0, n - 1), max_size=4, unique=True))
    keep_outputs = draw(st.booleans())
    keep_derivations = draw(st.booleans())
    return n, refs, derivers, roots, keep_outputs, keep_derivations


def reference_live(n, refs, derivers, roots, keep_outputs, keep_derivations) -> set[int]:
    edges = {i: set() for i in range(n)}
    for a, b in refs:
        if a != b:
            edges[a].add(b)
    for out, drv in derivers.items():
        if keep_derivations:
            edges[out].add(drv)
        if keep_outputs:
            edges[drv].add(out)
    live, todo = set(roots), list(roots)
    while todo:
        for m in edges[todo.pop()]:
            if m not in live:
                live.add(m)
                todo.append(m)
    return live


@given(graphs())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
def test_never_a_live_path_deleted(tmp_path_factory, graph):
    n, refs, derivers, roots, keep_outputs, keep_derivations = graph
    root = tmp_path_factory.mktemp("prop")
    names = [f"p{i}" + (".drv" if i in derivers.values() else "") for i in range(n)]
    full = support.tiny_store(root, names, refs, derivers, roots)
    support.collect_in_process(root, GCSettings(keep_derivations=keep_derivations,
                                                keep_outputs=keep_outputs))
    live = reference_live(n, refs, derivers, roots, keep_outputs, keep_derivations)
    valid = valid_set(root)
    for i, p in enumerate(full):
        on_disk = (root / p.lstrip("/")).exists()
        if i in live:
            assert p.encode() in valid and on_disk, f"live path {p} was deleted"
        else:
            assert p.encode() not in valid and not on_disk, f"dead path {p} survived"


def test_state_dir_not_owned_is_a_clear_error(scratch, users, pipelines):
    root = scratch / "store"
    support.make_store(root, paths=200, seed=82, quirks=0, roots=5, indirect=0, stale=0)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    (root / "nix/var/nix/gc-socket").mkdir(mode=0o755)  # e.g. left by a root-run Nix
    before = valid_set(root)
    rc, _, err = gc_json(p, "--yes")
    assert rc == 1 and b"no write access to" in err and b"gc-socket" in err
    assert valid_set(root) == before
    assert p.query("stats").returncode == 0  # and the daemon keeps serving


def test_path_announced_before_planning_keeps_its_closure(scratch):
    """A Nix process announces a path on gc-socket after we took the lock but
    before the dead set is computed: that path *and its closure* survive."""
    root = scratch / "store"
    # 0 -> 1 -> 2, nothing rooted: all garbage unless announced.
    full = support.tiny_store(root, ["top", "mid", "low", "other"], refs=[(0, 1), (1, 2)],
                              derivers={}, roots=[])
    layout = StoreLayout.make(root=os.fsencode(root))
    c = Collection(layout, GCSettings(), GCOptions())
    db = StoreDB.open(layout)
    c.begin()
    try:
        c._announced(full[0].encode())  # as the gc-socket server would, before plan()
        c.plan(engine.scan_in_process(layout, runtime=False), db)
        c.execute(layout.db_path)
    finally:
        c.end()
        db.close()
    valid = valid_set(root)
    for p in full[:3]:
        assert p.encode() in valid and (root / p.lstrip("/")).exists(), p
    assert full[3].encode() not in valid


def _collect(root: Path, options: GCOptions | None = None, before_execute=None):
    return support.collect_in_process(root, options=options, before_execute=before_execute)


def test_gc_socket_connections_end_with_the_collection(scratch):
    """A Nix process keeps its gc-socket connection for its whole life.  When
    a collection ends, that connection must end too (Nix then retakes
    gc.lock and talks to the next collector): a "1" from a finished
    collection would promise a protection nobody gives."""
    import socket
    root = scratch / "store"
    full = support.tiny_store(root, ["kept", "garbage"], refs=[], derivers={}, roots=[0])
    layout = StoreLayout.make(root=os.fsencode(root))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)

    def announce(c):
        client.connect(os.fsdecode(layout.real_state_dir + b"/gc-socket/socket"))
        client.sendall(full[0].encode() + b"\n")
        assert client.recv(1) == b"1"

    _collect(root, before_execute=announce)
    assert client.recv(1) == b"", "the connection outlived its collection"
    try:  # and an announcement now gets no promise
        client.sendall(full[1].encode() + b"\n")
        assert client.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        pass
    client.close()


def test_failed_batch_releases_waiting_nix_processes(scratch):
    """A collection that stops between claiming a batch and deleting it
    (here: a damaged DB) must not leave the batch marked "being deleted": a
    Nix process announcing one of those paths would wait for ever."""
    root = scratch / "store"
    full = support.tiny_store(root, ["a", "b", "c"], refs=[], derivers={}, roots=[])
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.execute("INSERT INTO Refs VALUES (999, 2)")  # a referrer that is not a valid path
    db.commit()
    db.close()
    collections: list[Collection] = []
    with pytest.raises(SafetyError, match="not a valid path"):
        _collect(root, before_execute=collections.append)
    assert collections[0]._pending == set()
    assert valid_set(root) >= {full[1].encode()}  # the referenced one was not invalidated


def test_deletion_worker_ignores_the_current_directory(scratch):
    """root runs `gcroots-query --standalone gc` in a directory someone else
    wrote: nothing there is imported by the deletion worker."""
    root = scratch / "store"
    support.tiny_store(root, ["kept", "garbage"], refs=[], derivers={}, roots=[0])
    trap = scratch / "cwd"
    (trap / "gcroots/daemon").mkdir(parents=True)
    marker = scratch / "pwned"
    (trap / "gcroots/__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (trap / "gcroots/daemon/__init__.py").write_text("")
    (trap / "gcroots/daemon/deleter.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = subprocess.run([support.QUERY, "--standalone", "--root", str(root), "--no-runtime",
                          "gc", "--yes"], cwd=trap, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), "the deletion worker imported code from the current directory"
    assert len(valid_set(root)) == 1


def test_max_freed_counts_optimised_files_like_nix(scratch):
    """In an optimised store every file has a twin in .links, so deleting a
    path leaves its files with one link until .links is cleaned at the end.
    --max-freed must still stop near the limit (Nix counts such files as
    freed), and the dry run must forecast the same stop."""
    root = scratch / "store"
    names = [f"big-{i}" for i in range(40)]
    support.tiny_store(root, names, refs=[], derivers={}, roots=[0])
    for d in (root / "nix/store").iterdir():  # ~64 KiB of distinct content per path
        (d / "f0").chmod(0o644)
        (d / "f0").write_bytes(os.urandom(64 * 1024))
        (d / "f0").chmod(0o444)
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")  # the NAR hashes changed
    db.execute("UPDATE ValidPaths SET hash = 'sha256:' || hex(randomblob(32))")
    db.commit()
    db.close()
    links = root / "nix/store/.links"
    links.mkdir()
    for d in (root / "nix/store").iterdir():
        if d.name != ".links":
            os.link(d / "f0", links / d.name[:32])  # what optimise does: nlink 2
    limit = 256 * 1024
    plan = _collect(root, GCOptions(dry_run=True, max_freed=limit)).result
    full_plan = _collect(root, GCOptions(dry_run=True)).result
    assert 0 < plan.paths < full_plan.paths == 39
    done = _collect(root, GCOptions(max_freed=limit)).result
    assert done.stopped_at_limit
    assert done.paths == plan.paths
    assert limit <= done.disk_bytes_freed <= limit + 17 * 80 * 1024
    assert 1 + 39 - done.paths == len(valid_set(root))


def test_odd_rows_in_the_db_do_not_crash_the_collection(scratch):
    """A ValidPaths row whose name is not ASCII, and a Refs row pointing at
    an id that is not a valid path (a DB written with foreign keys off):
    queries and the collection go on; the odd garbage row goes too."""
    root = scratch / "store"
    full = support.tiny_store(root, ["kept", "garbage", "caf\u00e9"], refs=[], derivers={},
                              roots=[0])
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.execute("INSERT INTO Refs VALUES (1, 999999)")
    db.commit()
    db.close()
    dead = set(standalone(root, "dead").stdout.split())
    assert dead == {full[1].encode(), full[2].encode()}
    standalone(root, "gc", "--yes")
    assert valid_set(root) == {full[0].encode()}
    assert os.listdir(root / "nix/store") == [full[0].split("/")[-1]]


def test_entry_registered_after_planning_is_not_deleted(scratch):
    """An entry on disk that was unregistered when we planned (so garbage)
    but is registered before its batch is deleted is valid now, and stays."""
    root = scratch / "store"
    full = support.tiny_store(root, ["kept", "garbage"], refs=[], derivers={}, roots=[0])
    late = "/nix/store/" + "1" * 32 + "-late"
    (root / late.lstrip("/")).mkdir()
    (root / late.lstrip("/") / "f").write_text("registered late\n")

    def register(c):
        assert late.encode() in c._analysis.dead
        db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
        db.execute("INSERT INTO ValidPaths (path, hash, registrationTime) VALUES (?, ?, 1)",
                   (late, "sha256:" + "0" * 64))
        db.commit()
        db.close()

    _collect(root, before_execute=register)
    assert (root / late.lstrip("/")).is_dir() and late.encode() in valid_set(root)
    assert full[1].encode() not in valid_set(root)


def test_dry_run_says_which_stale_links_would_go(scratch):
    """A collection removes the stale gcroots/auto links; its plan (dry run,
    and the question on a terminal) says so, with the same count."""
    root = scratch / "store"
    support.make_store(root, paths=200, seed=131, quirks=0, roots=5, indirect=3, stale=3)
    auto = root / "nix/var/nix/gcroots/auto"
    before = set(os.listdir(auto))
    plan = json.loads(standalone(root, "gc", "--dry-run", "--json").stdout)
    text = standalone(root, "gc", "--dry-run").stdout.decode()
    assert set(os.listdir(auto)) == before
    done = json.loads(standalone(root, "gc", "--yes", "--json").stdout)
    assert done["stale_links_removed"] == 3 == len(before - set(os.listdir(auto)))
    assert plan["stale_links_removed"] == 3, plan
    assert "  3 stale gcroots/auto links would be removed\n" in text, text


_HOLD_GC_LOCK = ("import fcntl, os, sys, time\n"
                 "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                 "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                 "print('locked', flush=True)\n"
                 "time.sleep(float(sys.argv[2]))\n")


def test_gc_lock_held_by_another_collection_is_busy(scratch, users, pipelines, monkeypatch,
                                                    capsys):
    """Another collector (Nix's) holds gc.lock for longer than we wait: the
    terminal is told we wait, then it is `busy` (exit 4, as the README's
    table says; it was 1, "the collection stopped: Busy"), naming the lock;
    nothing deleted.  --standalone and through gcrootsd."""
    from gcroots.client import cli
    from gcroots.daemon import gc
    from gcroots.protocol.admin import Progress
    root = scratch / "store"
    support.make_store(root, paths=100, seed=134, quirks=0, roots=3, indirect=0, stale=0)
    before = valid_set(root)
    lock = root / "nix/var/nix/gc.lock"
    holder = subprocess.Popen([support.sys.executable, "-c", _HOLD_GC_LOCK, str(lock), "300"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        monkeypatch.setattr(gc, "LOCK_WAIT", 1.0)
        seen: list[Progress] = []
        c = Collection(StoreLayout.make(root=os.fsencode(root)), GCSettings(), GCOptions(),
                       progress=seen.append)
        with pytest.raises(gc.Busy):
            c.begin()
        c.end()
        assert any("waiting for" in p.message and "gc.lock" in p.message for p in seen), seen
        assert cli.main(["--standalone", "--root", str(root), "--no-runtime", "gc", "--yes"]) == 4
        err = capsys.readouterr().err
        assert f"{lock} is held by another process" in err and "stopped" not in err, err
        assert valid_set(root) == before
        monkeypatch.undo()
        p = Pipeline(root, scratch / "run")
        pipelines.append(p)
        p.start()
        out = p.query("gc", "--yes")   # gcrootsd waits LOCK_WAIT (60 s) first
        assert out.returncode == 4, out.stderr
        assert b"gc.lock is held by another process" in out.stderr, out.stderr
        assert valid_set(root) == before
    finally:
        holder.kill()
        holder.wait()
