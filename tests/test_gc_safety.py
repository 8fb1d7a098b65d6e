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


def test_flags_read_in_threads_side_by_side_stay_each_ones_own(scratch):
    """gcrootsd checks a dry run's paths in its own process, and dry runs
    may run side by side: each thread's statx must give its own file's
    flags.  It failed before (one buffer for all: the immutable file read
    as not immutable within a few thousand calls)."""
    import threading

    from gcroots.daemon import deleter

    locked, plain = scratch / "locked", scratch / "plain"
    locked.write_bytes(b"x")
    plain.write_bytes(b"y")
    _chattr("+i", locked)
    try:
        if deleter._statx_flags(os.fsencode(locked)) is None:
            pytest.skip("statx does not report the immutable flag here")
        wrong: list = []

        def check(path: Path, want: int) -> None:
            for _ in range(50000):
                if (got := deleter._statx_flags(os.fsencode(path))) != want:
                    wrong.append((path.name, got))
                    return
        threads = [threading.Thread(target=check, args=(locked, deleter._FS_IMMUTABLE_FL)),
                   threading.Thread(target=check, args=(plain, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
    finally:
        _chattr("-i", locked)


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


# -- stale gcroots/auto links ----------------------------------------------------------

def test_stale_auto_links_go_only_when_certain(scratch):
    """Set aside if unchanged since the helper judged it, removed only if a
    new scan finds the held link stale, put back otherwise: one case each."""
    from gcroots.daemon import engine
    from gcroots.daemon.engine import IncompleteRoots
    from gcroots.daemon.gc import SET_ASIDE, remove_stale_auto_links
    from gcroots.layout import StoreLayout
    from gcroots.protocol.rootstream import StaleLink

    support.tiny_store(scratch, ["x"], refs=[], derivers={}, roots=[])
    layout = StoreLayout.make(root=os.fsencode(scratch))
    auto = scratch / "nix/var/nix/gcroots/auto"
    auto.mkdir()
    targets = {n: scratch / "homes" / n / "result" for n in "abcdef"}
    for n, t in targets.items():
        t.parent.mkdir(parents=True)
        os.symlink(t, auto / n)
    os.symlink(targets["a"], scratch / "nix/var/nix/gcroots/not-auto")
    scan = lambda: engine.scan_in_process(layout, runtime=False)  # noqa: E731
    judged = scan().stale
    assert {os.fsdecode(os.path.basename(s.link)) for s in judged} == set("abcdef")
    assert all(s.identity is not None for s in judged)
    os.symlink("/nix/store/x", targets["b"])        # b: its target is back (we see it)
    os.unlink(auto / "d")                           # d: replaced since (a new inode, as Nix does)
    os.symlink(targets["d"], auto / "d")
    judged = [s if not s.link.endswith(b"/e") else StaleLink(s.link, s.target)  # e: no identity
              for s in judged]

    def rescan():
        os.symlink("/nix/store/x", targets["c"])    # c: made again while it was held
        return scan()

    assert remove_stale_auto_links(layout, judged, rescan) == 2  # a and f
    assert sorted(os.listdir(auto)) == ["b", "c", "d", "e"]
    # A failed rescan puts back what was set aside.
    judged = [s for s in scan().stale if s.link.endswith((b"/d", b"/e"))]

    def failing():
        assert sorted(os.listdir(auto)) == ["b", "c", "d" + SET_ASIDE.decode(), "e" + SET_ASIDE.decode()]
        raise IncompleteRoots("the helper is gone")

    assert remove_stale_auto_links(layout, judged, failing) == 0
    assert sorted(os.listdir(auto)) == ["b", "c", "d", "e"]


def test_an_auto_link_nix_replaces_as_we_set_it_aside_is_never_missing(scratch, monkeypatch):
    """Nix renames its new link over A between our identity check and our
    rename: we then hold Nix's link, not the judged one.  It goes back at
    once -- A is there while the helper scans again, and after -- where it
    used to be missing for the whole rescan (a user's nix-build returned,
    its auto link absent: 1 in ~25 runs of the race test below)."""
    from gcroots.daemon import engine, gc
    from gcroots.layout import StoreLayout

    support.tiny_store(scratch, ["x"], refs=[], derivers={}, roots=[])
    layout = StoreLayout.make(root=os.fsencode(scratch))
    auto = scratch / "nix/var/nix/gcroots/auto"
    auto.mkdir()
    result = scratch / "home/result"
    result.parent.mkdir()
    os.symlink(result, auto / "a")
    scan = lambda: engine.scan_in_process(layout, runtime=False)  # noqa: E731
    judged = scan().stale
    assert len(judged) == 1
    checked = gc._is_link_to

    def nix_builds_in_the_window(path, target, identity=None):
        ok = checked(path, target, identity)
        if identity is not None and path == os.fsencode(auto / "a"):
            os.symlink("/nix/store/x", result)               # nix-build: T, then A anew
            os.symlink(result, auto / "a.tmp")
            os.rename(auto / "a.tmp", auto / "a")
        return ok

    monkeypatch.setattr(gc, "_is_link_to", nix_builds_in_the_window)
    seen = []

    def rescan():
        seen.append(sorted(os.listdir(auto)))
        return scan()

    assert gc.remove_stale_auto_links(layout, judged, rescan) == 0
    assert seen in ([], [["a"]])    # no rescan needed, or one with A in place
    assert sorted(os.listdir(auto)) == ["a"] and os.readlink(auto / "a") == str(result)


# gcrootsd's side of the race: collections (gc.lock, gc-socket), each
# removing the stale auto links a helper scan reports, as fast as it can.
_REMOVER = r"""
import os, sys, trio
from gcroots import log
from gcroots.daemon.gc import Collection, GCOptions, remove_stale_auto_links
from gcroots.daemon.nixconf import GCSettings
from gcroots.daemon.rootsource import fetch_roots
from gcroots.layout import StoreLayout
root, sock, stop = sys.argv[1:]
log.configure("gcrootsd", "info")
layout = StoreLayout.make(root=os.fsencode(root))
sock = os.fsencode(sock)
counts = [0, 0, 0]  # collections, stale links judged, removed

async def main():
    rescan = lambda: trio.from_thread.run(fetch_roots, sock, layout)
    while not os.path.exists(stop):
        c = Collection(layout, GCSettings(), GCOptions())
        await trio.to_thread.run_sync(c.begin)
        try:
            stale = (await fetch_roots(sock, layout)).stale
            counts[1] += len(stale)
            counts[2] += await trio.to_thread.run_sync(remove_stale_auto_links, layout, stale,
                                                       rescan)
        finally:
            await trio.to_thread.run_sync(c.end)
        counts[0] += 1

trio.run(main)
print(*counts)
"""

# Real Nix re-making a result link in a 0700 home, `rounds` times, as fast as
# it can; right after each nix-build the auto link must be there.
_REMAKER = r"""
import os, subprocess, sys
oracle, root, drv, result, auto, rounds = sys.argv[1:]
runs = missing = 0
while runs < int(rounds):
    try:
        os.unlink(result)
    except FileNotFoundError:
        pass
    out = subprocess.run([oracle, root, "nix-build", drv, "-o", result], capture_output=True)
    if out.returncode:
        sys.exit(out.stderr.decode())
    runs += 1
    if not (os.path.islink(auto) and os.readlink(auto) == result):
        missing += 1
print(runs, missing)
"""


def _nix_built(root: Path, scratch: Path) -> tuple[str, str]:
    """A derivation and its output, valid in the store (registered with its
    real NAR hash: chroot stores cannot run builders here), so that
    `nix-build DRV -o LINK` only makes the links."""
    import hashlib
    expr = scratch / "trivial.nix"
    expr.write_text('derivation { name = "raced"; system = builtins.currentSystem; '
                    'builder = "/bin/sh"; args = [ "-c" "echo raced > $out" ]; }')
    drv = support.oracle(root, "nix-instantiate", str(expr)).stdout.decode().strip()
    out = support.oracle(root, "nix-store", "-q", "--outputs", drv).stdout.decode().strip()
    (root / out.lstrip("/")).write_text("raced\n")
    nar = subprocess.run(["nix-store", "--dump", str(root / out.lstrip("/"))],
                         capture_output=True, check=True).stdout
    support.oracle(root, "nix-store", "--load-db", input=(
        f"{out}\nsha256:{hashlib.sha256(nar).hexdigest()}\n{len(nar)}\n{drv}\n0\n").encode())
    return drv, out


REMAKES = 400  # nix-builds per home: ~30 s here, more under load


def test_stale_link_removal_races_nix_build_without_losing_a_root(scratch, users, pipelines):
    """Stock Nix's model: a root-owned store, Nix as root, gcrootsd as uid 0
    without any capability (so it cannot look into homes either).  Real Nix
    2.8 re-creates `result` links in two users' 0700 homes (`rm result;
    nix-build DRV -o result`, in a loop), while gcrootsd's code, under
    gc.lock, removes the auto links the helper reports stale, in a loop.
    2 x 400 nix-builds against thousands of removals: right after each
    nix-build its auto link exists; at the end the links are what Nix
    leaves, and a collection keeps the output."""
    root = scratch / "store"
    support.make_store(root, paths=50, seed=94, quirks=0, roots=3, indirect=0, stale=0)
    drv, out = _nix_built(root, scratch)
    auto_dir = root / "nix/var/nix/gcroots/auto"
    auto_dir.mkdir(exist_ok=True)
    p = Pipeline(root, scratch / "run", daemon_user="root")
    pipelines.append(p)
    p.start_helper()
    homes, results = [], []
    for user in (support.ALICE, support.BOB):
        home = Path(pwd.getpwnam(user).pw_dir) / f"gcroots-race-{os.getpid()}"
        home.mkdir()
        support.chown_tree(home, user)
        homes.append(home)
        results.append(home / "result")
    stop = scratch / "stop"
    try:
        auto = {}
        for r in results:
            support.oracle(root, "nix-build", drv, "-o", str(r))
            auto[r] = next(auto_dir / n for n in os.listdir(auto_dir)
                           if os.readlink(auto_dir / n) == str(r))
        no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
        blind = subprocess.run([*no_caps, sys.executable, "-c", "import os, sys; os.lstat(sys.argv[1])",
                                str(results[0])], capture_output=True)
        assert b"PermissionError" in blind.stderr, blind.stderr  # EACCES: it cannot see
        remover_log = scratch / "remover.log"  # a file: a full pipe would stall it under gc.lock
        with remover_log.open("wb") as err:
            remover = subprocess.Popen([*no_caps, sys.executable, "-c", _REMOVER, str(root),
                                        str(p.helper_sock), str(stop)],
                                       stdout=subprocess.PIPE, stderr=err)
        remakers = [subprocess.Popen([sys.executable, "-c", _REMAKER, str(support.NIX_ORACLE),
                                      str(root), drv, str(r), str(auto[r]), str(REMAKES)],
                                     stdout=subprocess.PIPE) for r in results]
        made = [tuple(map(int, m.communicate(timeout=600)[0].split())) for m in remakers]
        stop.touch()
        rout, _ = remover.communicate(timeout=60)
        rerr = remover_log.read_bytes()
        assert remover.returncode == 0, rerr.decode(errors="replace")[-3000:]
        runs, judged, removed = map(int, rout.split())
        caught = rerr.count(b"stale_link_replaced_meanwhile")  # Nix renamed between check and ours
        print(f"nix-build runs and auto links missing right after: {made}; "
              f"collections {runs}, stale links judged {judged}, removed {removed}, "
              f"caught mid-replacement and put back {caught}")
        assert all(missing == 0 for _, missing in made), made
        assert runs >= REMAKES and removed >= 50  # the loops did race
        # The end state is Nix's: both results exist, each with its auto
        # link, nothing set aside left over; Nix's own scan removes nothing.
        links = sorted(os.listdir(auto_dir))
        assert links == sorted(a.name for a in auto.values())
        assert all(os.readlink(auto[r]) == str(r) for r in results)
        roots = support.nix_roots(root)
        assert all(f"{r} -> {out}".encode() in roots for r in results)
        assert sorted(os.listdir(auto_dir)) == links
        # And nothing live is lost: a collection keeps the output.
        standalone(root, "gc", "--yes")
        assert out.encode() in valid_set(root) and (root / out.lstrip("/")).exists()
    finally:
        stop.touch()
        for h in homes:
            subprocess.run(["rm", "-rf", str(h)], check=True)


def test_unreadable_temp_roots_stop_queries_and_collection(scratch, users, pipelines):
    """A live Nix process of another user (root's, in a store gcrootsd's user
    owns) keeps temp roots in a 0600 file gcrootsd cannot read: `dead` and
    `gc` refuse (fail closed) saying which file and why, never "internal
    error"; nothing is deleted; once the process is gone, gc works."""
    root = scratch / "store"
    support.make_store(root, paths=200, seed=99, quirks=0, roots=5, indirect=0, stale=0)
    (root / "nix/var/nix/gc.lock").touch()  # (Nix would make it root's)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    temproots = root / "nix/var/nix/temproots"
    # toFile adds a path (a temp root), then a long evaluation keeps Nix alive.
    nix = subprocess.Popen([str(support.NIX_ORACLE), str(root), "nix-instantiate", "--eval",
                            "--read-write-mode", "-E",
                            'builtins.seq (builtins.toFile "held" "x") (builtins.length '
                            '(builtins.genList (x: x) 30000000))'],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not any(temproots.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        held = next(temproots.iterdir())
        assert held.stat().st_uid == 0 and held.stat().st_mode & 0o777 == 0o600
        before = valid_set(root)
        for args in (("dead",), ("gc", "--yes")):
            out = p.query(*args)
            err = out.stderr.decode()
            assert nix.poll() is None, "Nix finished too early for this test"
            assert out.returncode == 1 and "internal error" not in err, err
            assert f"cannot read the temporary roots file {held}: a Nix process of root" in err, err
        assert valid_set(root) == before
    finally:
        nix.kill()
        nix.wait()
    held.unlink(missing_ok=True)
    out = p.query("gc", "--yes")
    assert out.returncode == 0, out.stderr
