"""Numbers on the command line (one grammar for every command, checked at
parse time) and SQLite's failures said as what they are."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from gcroots.cliargs import Percent, format_duration, parse_duration, parse_size

from . import support
from .support import DAEMON, HELPER, QUERY, Pipeline, valid_set


def test_sizes():
    assert [parse_size(t) for t in ("4096", "100K", "500M", "10G", "1.5T", "10GiB", "2gb")] == [
        4096, 100 << 10, 500 << 20, 10 << 30, 3 << 39, 10 << 30, 2 << 30]
    for bad in ("", "inf", "nan", "-5", "10Q", "1e9", "10 G", "0x10", "5%"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="too large"):
        parse_size("8388608T")
    # N% only where a flag asks for it.
    assert parse_size("5%", percent=True) == Percent(5.0)
    assert parse_size("10G", percent=True) == 10 << 30
    for bad in ("0%", "101%", "-1%"):
        with pytest.raises(ValueError):
            parse_size(bad, percent=True)


def test_durations():
    day = 86400
    cases = {"30s": 30, "5min": 300, "12h": 12 * 3600, "14d": 14 * day, "2w": 14 * day,
             "1w2d": 9 * day, "1h30min": 5400, "1.5h": 5400, "3mo": 90 * day, "1y": 365 * day,
             "0s": 0}
    assert {t: parse_duration(t) for t in cases} == cases
    with pytest.raises(ValueError, match="'m' is ambiguous: write 'min' for minutes or 'mo'"):
        parse_duration("5m")
    for bad in ("3", "1h30", "", "5x", "-1d", "inf", "nan", "1 d", "d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration("101y")
    assert [format_duration(s) for s in (14 * day, 30 * day, 3600, 300, 90, 1.5)] == [
        "2w", "30d", "1h", "5min", "90s", "1.5s"]


BAD = [  # (command line, the flag its error must name)
    ([QUERY, "gc", "--yes", "--throttle", "nan"], "--throttle"),
    ([QUERY, "gc", "--yes", "--throttle", "-1"], "--throttle"),
    ([QUERY, "gc", "--yes", "--throttle", "inf"], "--throttle"),
    ([QUERY, "gc", "--yes", "--max-freed", "inf"], "--max-freed"),
    ([QUERY, "gc", "--yes", "--max-freed", "-5"], "--max-freed"),
    ([QUERY, "gc", "--yes", "--max-freed", ""], "--max-freed"),
    ([QUERY, "gc", "--yes", "--max-freed", "10Q"], "--max-freed"),
    ([QUERY, "cost", "--top", "-1"], "--top"),
    ([QUERY, "profiles", "prune", "--all", "--keep", "-2"], "--keep"),
    ([QUERY, "profiles", "prune", "--all", "--keep-since", "2m"], "--keep-since"),
    ([QUERY, "roots", "prune", "--older-than", "1000y"], "--older-than"),
    ([QUERY, "profiles", "delete-generations", "--lock-timeout", "nan", "/x", "old"],
     "--lock-timeout"),
    ([DAEMON, "--min-free", "50G", "--max-free", "5G"], "--max-free"),
    ([DAEMON, "--max-free", "5G"], "--max-free"),
    ([DAEMON, "--min-free", "5%", "--max-free", "5G"], "--max-free"),
    ([DAEMON, "--min-free", "20%", "--max-free", "10%"], "--max-free"),
    ([DAEMON, "--min-free", "120%"], "--min-free"),
    ([QUERY, "gc", "--yes", "--ensure-free", "0%"], "--ensure-free"),
    ([QUERY, "gc", "--yes", "--keep-recent", "7"], "--keep-recent"),
    ([QUERY, "clean", "--keep", "-1"], "--keep"),
    ([QUERY, "clean", "--roots-older-than", "1m"], "--roots-older-than"),
    ([DAEMON, "--min-free", "0"], "--min-free"),
    ([DAEMON, "--gc-interval", "0s"], "--gc-interval"),
    ([DAEMON, "--gc-interval", "5m"], "--gc-interval"),
    ([DAEMON, "--free-check-interval", "nan"], "--free-check-interval"),
    ([DAEMON, "--metrics-interval", "1m"], "--metrics-interval"),
    ([DAEMON, "--metrics-address", "127.0.0.1:70000"], "--metrics-address"),
    ([DAEMON, "--socket-mode", "0888"], "--socket-mode"),
    ([HELPER, "serve", "--allow-uid", "-1"], "--allow-uid"),
    ([HELPER, "serve", "--allow-uid", "4294967295"], "--allow-uid"),
    ([HELPER, "serve", "--socket-mode", "1e3"], "--socket-mode"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_numeric_options_are_checked_at_parse_time(argv, flag):
    out = subprocess.run(argv, capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert f"error: argument {flag}:" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()[-1]) < 300


def test_bad_gc_options_delete_nothing(scratch, users, pipelines):
    """On the command line (exit 2) and from any client that sends them
    anyway (BAD_REQUEST): nothing is deleted, not even a first batch."""
    from gcroots.client import conn
    from gcroots.protocol.admin import Status
    root = scratch / "store"
    support.make_store(root, paths=300, seed=96, quirks=0, roots=5, indirect=0, stale=0)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    before = valid_set(root)
    for value in ("nan", "-1", "inf"):
        assert p.query("gc", "--yes", "--throttle", value).returncode == 2
    for opts in ({"throttle": float("nan")}, {"throttle": -1}, {"throttle": 1e300},
                 {"throttle": "1"}, {"max_freed": float("inf")}, {"max_freed": -5},
                 {"max_freed": 2**64}, {"dry_run": "no"}):
        answer = conn.request(str(p.sock), "gc", opts)
        assert answer.status == Status.BAD_REQUEST and answer.message.startswith("gc: "), opts
    assert valid_set(root) == before
    assert p.query("stats").returncode == 0


# -- SQLite ------------------------------------------------------------------------

def test_read_only_db_then_restored_collects_at_once(scratch, users, pipelines):
    """A 0444 DB: a clear error naming it, nothing deleted; made writable
    again, the very next collection works -- even though gcrootsd opened it
    (and SQLite made its -shm file, with the DB's mode) while it was 0444."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=97, quirks=0, roots=5, indirect=0, stale=0)
    db = root / "nix/var/nix/db/db.sqlite"
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    os.chmod(db, 0o444)
    p.start_helper()
    p.start_daemon()
    before = valid_set(root)
    for args in (("--dry-run",), ("--yes",)):
        out = p.query("gc", *args)
        assert out.returncode == 1, out.stderr
        assert f"no write access to {db}: its mode is 444".encode() in out.stderr, out.stderr
    assert valid_set(root) == before and p.query("dead").returncode == 0
    assert oct(os.stat(f"{db}-shm").st_mode & 0o777) == "0o444"  # as SQLite made it
    os.chmod(db, 0o644)
    out = p.query("gc", "--yes")
    assert out.returncode == 0, out.stderr
    assert p.query("dead").stdout == b""


def test_full_disk_is_said_and_nothing_is_lost(scratch, users, pipelines):
    """The DB's file system is full when the first batch is invalidated:
    "the disk is full", the DB path, exit 1; nothing changed; with room
    again, the collection works."""
    root = scratch / "store"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(root)], check=True)
    try:
        support.make_store(root, paths=300, seed=98, quirks=0, roots=5, indirect=0, stale=0)
        p = Pipeline(root, scratch / "run")
        pipelines.append(p)
        p.start()
        before = valid_set(root), set(os.listdir(root / "nix/store"))
        filler = root / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        out = p.query("gc", "--yes")
        err = out.stderr.decode()
        assert out.returncode == 1 and "internal error" not in err, err
        assert f"the Nix database {root}/nix/var/nix/db/db.sqlite: the disk is full" in err, err
        assert (valid_set(root), set(os.listdir(root / "nix/store"))) == before
        filler.unlink()
        out = p.query("gc", "--yes")
        assert out.returncode == 0, out.stderr
        p.stop()
        support.chown_tree(root / "nix", "root")
        support.verify_clean(root)
    finally:
        for p in pipelines:
            p.stop()
        subprocess.run(["umount", str(root)], check=True)


_HOLD_DB = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE ValidPaths SET registrationTime = registrationTime")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def test_locked_db_is_waited_for_then_said(scratch, monkeypatch):
    """Another writer holds the DB: the collection waits for it, as Nix
    retries SQLITE_BUSY, and goes on once it lets go; if it never does,
    "locked by another process" with the DB path, nothing deleted."""
    from gcroots.daemon import gc
    from .test_gc import _collect
    root = scratch / "store"
    support.tiny_store(root, ["kept", "garbage1", "garbage2"], refs=[], derivers={}, roots=[0])
    db = str(root / "nix/var/nix/db/db.sqlite")
    sqlite3.connect(db).execute("PRAGMA journal_mode=WAL").fetchone()
    before = valid_set(root)
    monkeypatch.setattr(gc, "DB_BUSY_TIMEOUT", 1.0)
    holder = subprocess.Popen([support.sys.executable, "-c", _HOLD_DB, db, "5"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    with pytest.raises(gc.DBError, match=f"nothing was deleted: the Nix database {db}: another "
                       "process holds it locked .* \\(SQLITE_BUSY"):
        _collect(root)
    assert valid_set(root) == before
    holder.wait()
    monkeypatch.setattr(gc, "DB_BUSY_TIMEOUT", 30.0)
    holder = subprocess.Popen([support.sys.executable, "-c", _HOLD_DB, db, "2"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    t0 = time.monotonic()
    _collect(root)
    assert time.monotonic() - t0 > 1.0  # it waited for the other writer
    holder.wait()
    assert len(valid_set(root)) == 1


# -- paths on the command line ---------------------------------------------------------

BAD_PATHS = [
    # An empty value (`--root "$MNT"` with MNT unset) used to mean the
    # default: the host's /nix, collected by `--root "" gc --yes`.
    ([QUERY, "--standalone", "--root", "", "--no-runtime", "dead"], "--root"),
    ([QUERY, "--standalone", "--store-dir", "", "--no-runtime", "dead"], "--store-dir"),
    ([QUERY, "--socket", "", "stats"], "--socket"),
    ([QUERY, "profiles", "list", "--root", ""], "--root"),
    # Used to be a traceback.
    ([QUERY, "--standalone", "--state-dir", "var/nix", "stats"], "--state-dir"),
    ([QUERY, "--standalone", "--store-dir", "/", "stats"], "--store-dir"),
    ([QUERY, "profiles", "list", "--store-dir", "nix/store"], "--store-dir"),
]


@pytest.mark.parametrize("argv,flag", BAD_PATHS, ids=[" ".join(a[1:]) for a, _ in BAD_PATHS])
def test_bad_paths_are_usage_errors_naming_the_flag(argv, flag):
    out = subprocess.run(argv, capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2 and out.stdout == b"", err
    assert f"error: argument {flag}:" in err and "Traceback" not in err, err


_DMS_FREE = r"""
import fcntl, struct, sys
# SQLite's "dead man switch" on the -shm file (byte 128, unix-shm's DMS): a
# process that can lock it exclusively thinks no one else has the DB open
# and truncates the -shm file.
with open(sys.argv[1], "r+b") as f:
    try:
        fcntl.fcntl(f, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 128, 1, 0))
        print("free")
    except OSError:
        print("held")
"""


def test_mending_the_wal_files_keeps_our_readers_locks(scratch):
    """gc's mending of the -shm file's mode must not drop the POSIX locks
    our open reader holds on it: with them gone, a Nix process that opens
    the DB next truncates the -shm our reader has mapped (gcrootsd died of
    SIGBUS when a root nix-build started during a collection)."""
    from gcroots.daemon import gc as gc_mod
    db = scratch / "db.sqlite"
    w = sqlite3.connect(db)
    w.execute("PRAGMA journal_mode=WAL")
    w.execute("CREATE TABLE t (x)")
    w.commit()
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reader.execute("SELECT count(*) FROM t").fetchall()
    w.close()   # only the reader keeps the DB open now

    def dms() -> str:
        return subprocess.run([sys.executable, "-c", _DMS_FREE, f"{db}-shm"], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert dms() == "held"
    os.chmod(f"{db}-shm", 0o600)   # a mode to mend
    gc_mod._mend_wal_modes(os.fsencode(db))
    assert stat.S_IMODE(os.stat(f"{db}-shm").st_mode) == stat.S_IMODE(os.stat(db).st_mode)
    assert dms() == "held"
    reader.close()
