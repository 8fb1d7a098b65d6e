"""Content-addressed derivations, built by the real Nix 2.8 with
`experimental-features = ca-derivations`: the live and dead sets and the
whole DB after a collection equal what `nix-store --gc` does to an
identical copy, for every keep-derivations/keep-outputs setting; the
Realisations rows go with their paths, crash or not."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import support
from .nixbuild import BuiltStore, derivation, remove

CA = "experimental-features = ca-derivations"


def ca_expression() -> str:
    fixed = hashlib.sha256(b"fixed\n").hexdigest()
    drvs = {
        "fod": ('derivation { name = "fod"; system = builtins.currentSystem; builder = "/bin/sh"; '
                'args = [ "-c" "echo fixed > $out" ]; outputHashMode = "flat"; '
                f'outputHashAlgo = "sha256"; outputHash = "{fixed}"; }}'),
        "a": derivation("a", ca=True, lines=50),
        "aTwin": derivation("a", ca=True, lines=50, build_only=["e"]),  # the same output path
        "b": derivation("b", ca=True, refs=["a"], build_only=["fod"], outputs=("out", "dev")),
        "c": derivation("c", ca=True, refs=["b"], build_only=["b.dev"], lines=200),
        "d": derivation("d", ca=False, refs=["c"]),     # input-addressed on top: deferred
        "e": derivation("e", ca=False, lines=10),
        "f": derivation("f", ca=True, refs=["e"]),       # content-addressed on top of it
        "g": derivation("g", ca=True, refs=["a"], lines=300),
    }
    return "rec {\n" + "".join(f"  {k} = {v};\n" for k, v in drvs.items()) + "}\n"


@pytest.fixture(scope="module")
def ca_world():
    """A store built once: roots on d and f (nix-build links), g and aTwin
    built and their links removed (garbage), a stale auto link."""
    top = Path(tempfile.mkdtemp(prefix="gcroots-ca-", dir="/tmp"))
    os.chmod(top, 0o755)
    s = BuiltStore.create(top / "live")
    expr = top / "ca.nix"
    expr.write_text(ca_expression())
    for attr in ("d", "f", "g", "aTwin"):
        s.build(expr, attr, s.top / f"result-{attr}", CA)
    for attr in ("g", "aTwin"):
        remove(s.top / f"result-{attr}")
    pristine = s.copy(top / "pristine")
    yield s, pristine, expr
    subprocess.run(["rm", "-rf", str(top)], check=True)


def settings(kd: bool, ko: bool) -> str:
    return f"{CA}\nkeep-derivations = {str(kd).lower()}\nkeep-outputs = {str(ko).lower()}"


@pytest.mark.parametrize("kd,ko", [(True, False), (True, True), (False, False), (False, True)])
def test_ca_store_collected_as_nix_collects_it(ca_world, kd, ko):
    s, pristine, _ = ca_world
    s.restore(pristine)
    twin = pristine.copy(s.top.parent / "twin")
    config = settings(kd, ko)
    try:
        for what in ("dead", "live"):
            ours = set(s.query(what, config=config).stdout.split())
            nix = set(s.nix_on_copy(twin, "nix-store", "--gc", f"--print-{what}",
                                    config=config).stdout.split())
            assert ours == nix, (what, sorted(ours ^ nix))
        assert s.db_rows()["Realisations"], "the store has no realisations to test with"
        assert (s.state / "db/reserved").stat().st_size == 8 << 20  # Nix made it
        done = json.loads(s.query("gc", "--yes", "--json", config=config).stdout)
        s.nix_on_copy(twin, "nix-store", "--gc", config=config)
        assert done["paths"] > 0
        assert s.entries() == twin.entries()
        assert s.db_rows() == twin.db_rows()
        assert not (s.state / "db/reserved").exists() and not (twin.state / "db/reserved").exists()
        assert s.foreign_key_problems() == [] == twin.foreign_key_problems()
        s.verify()
    finally:
        subprocess.run(["rm", "-rf", str(twin.top)], check=True)


def test_reserved_space_freed_as_nix_frees_it(ca_world):
    """<state>/db/reserved (gc-reserved-space): a deleting collection
    removes it first, as Nix's does, a dry run does not; the next Nix that
    opens the store reserves it again."""
    s, pristine, _ = ca_world
    s.restore(pristine)
    reserved = s.state / "db/reserved"
    s.query("gc", "--dry-run", config=CA)
    assert reserved.stat().st_size == 8 << 20
    s.query("gc", "--yes", config=CA)
    assert not reserved.exists()
    s.nix("nix-store", "-q", "--hash", os.readlink(s.top / "result-d"), config=CA)
    assert reserved.stat().st_size == 8 << 20


def test_realisations_go_with_their_paths(ca_world):
    """Everything garbage (no roots): every Realisations and
    RealisationsRefs row goes, as Nix's ON DELETE CASCADE takes them."""
    s, pristine, _ = ca_world
    s.restore(pristine)
    for link in ("result-d", "result-f"):
        remove(s.top / link)
    assert s.db_rows()["RealisationsRefs"]
    s.query("gc", "--yes", config=CA)
    rows = s.db_rows()
    assert rows["ValidPaths"] == rows["Realisations"] == rows["RealisationsRefs"] == []
    assert s.foreign_key_problems() == []


# -- invalidation does what the DB's foreign keys do -------------------------------

# What newer schemas add (written from their documented effect): Nix >= 2.9
# deletes the RealisationsRefs rows that point at a deleted path's
# realisations before the path goes; an unreleased one had a build trace
# table that cascades like Realisations.
NEWER_SCHEMA = {
    "2.8": "",
    "2.9": "CREATE TRIGGER DeleteSelfRefsViaRealisations BEFORE DELETE ON ValidPaths BEGIN "
           "DELETE FROM RealisationsRefs WHERE realisationReference IN "
           "(SELECT id FROM Realisations WHERE outputPath = old.id); END;",
    "trace": "CREATE TABLE BuildTraceV2 (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "
             "drvPath TEXT NOT NULL, outputName TEXT NOT NULL, outputPath INTEGER NOT NULL, "
             "signatures TEXT, FOREIGN KEY (outputPath) REFERENCES ValidPaths(id) ON DELETE CASCADE);"
             "INSERT INTO BuildTraceV2 (drvPath, outputName, outputPath) "
             "SELECT drvPath, outputName, outputPath FROM Realisations;",
    "set-null": "CREATE TABLE Odd (path INTEGER REFERENCES ValidPaths(id) ON DELETE SET NULL);"
                "INSERT INTO Odd VALUES (3);",
}


@pytest.mark.parametrize("schema", sorted(NEWER_SCHEMA))
@pytest.mark.parametrize("live_refers_to_dead_realisation", [False, True])
def test_invalidation_does_what_sqlite_foreign_keys_do(scratch, schema,
                                                       live_refers_to_dead_realisation):
    """The oracle is SQLite itself: the same dead paths deleted one at a
    time, referrers first, with foreign keys on (as Nix deletes them).
    Where that fails (a RESTRICT), our collection refuses and leaves the DB
    as it was; where it succeeds, every table ends up the same."""
    import sqlite3
    from gcroots.daemon.gc import SafetyError
    root = scratch / "store"
    # 0 (rooted) -> 1; 2 -> 3 -> 4 garbage; 5 garbage.
    full = support.tiny_store(root, ["top", "lib", "app", "mid", "low", "lone"],
                              refs=[(0, 1), (2, 3), (3, 4), (3, 3)], derivers={}, roots=[0])
    support.oracle(root, "nix-store", "-q", "--hash", full[0], extra_config=CA)  # CA tables
    db_path = root / "nix/var/nix/db/db.sqlite"
    db = sqlite3.connect(db_path)
    for i in range(6):  # realisation i+1 for path id i+1 (ValidPaths ids are 1-based)
        db.execute("INSERT INTO Realisations (drvPath, outputName, outputPath, signatures) "
                   "VALUES (?, 'out', ?, '')", (f"sha256:{i:064x}", i + 1))
    db.executemany("INSERT INTO RealisationsRefs VALUES (?, ?)", [(1, 2), (3, 4), (4, 5)])
    if live_refers_to_dead_realisation:
        db.execute("INSERT INTO RealisationsRefs VALUES (1, 6)")  # 0's realisation -> 5's
    db.executescript(NEWER_SCHEMA[schema])
    db.commit()
    db.close()
    oracle_db = sqlite3.connect(":memory:")
    with sqlite3.connect(db_path) as src:
        src.backup(oracle_db)
    oracle_db.execute("PRAGMA foreign_keys = ON")
    try:
        for i in (2, 3, 4, 5):  # referrers first
            oracle_db.execute("DELETE FROM ValidPaths WHERE id = ?", (i + 1,))
        oracle_error = None
    except sqlite3.IntegrityError as e:
        oracle_error = e

    def tables(conn):
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"'), key=repr) for t in names}

    before = tables(sqlite3.connect(db_path))
    try:
        support.collect_in_process(root)
        ours_error = None
    except SafetyError as e:
        ours_error = e
    after = tables(sqlite3.connect(db_path))
    if schema == "set-null":  # Nix's schemas never had one: we refuse to guess
        assert ours_error is not None and "no Nix schema has" in str(ours_error)
        assert after == before
    elif oracle_error is not None:
        assert ours_error is not None and "RealisationsRefs still refers" in str(ours_error)
        assert after == before
    else:
        assert ours_error is None
        assert after == tables(oracle_db)
        assert after["ValidPaths"] and len(after["ValidPaths"]) == 2
    assert (oracle_error is not None) == (live_refers_to_dead_realisation and schema != "2.9")


def test_kill_9_during_a_ca_collection(users):
    """gcrootsd killed with SIGKILL at random moments of collections of a
    CA store: every time the DB passes `PRAGMA foreign_key_check`, no live
    path is lost, and after the next collection the store verifies and the
    DB equals what nix-store --gc leaves on a copy."""
    import random
    top = Path(tempfile.mkdtemp(prefix="gcroots-ca-kill-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        s = BuiltStore.create(top / "live")
        expr = top / "many.nix"
        drvs = {f"p{i}": derivation(f"p{i}", ca=i % 4 != 3, lines=20,
                                    refs=[f"p{i - 1}"] if i % 5 else [],
                                    build_only=[f"p{i // 2}"] if i > 1 else [])
                for i in range(60)}
        expr.write_text("rec {\n" + "".join(f"  {k} = {v};\n" for k, v in drvs.items()) + "}\n")
        s.nix("nix-build", str(expr), *(a for i in range(60) for a in ("-A", f"p{i}")),
              "-o", str(s.top / "all"), config=CA)
        for link in s.top.glob("all*"):
            remove(link)
        for attr in ("p12", "p31"):
            s.build(expr, attr, s.top / f"result-{attr}", CA)
        pristine = s.copy(top / "pristine")
        twin = pristine.copy(top / "twin")
        s.nix_on_copy(twin, "nix-store", "--gc", config=CA)
        expected = twin.db_rows()
        rng = random.Random(14)
        killed = 0
        for run in range(8):
            s.restore(pristine)
            p = support.Pipeline(s.top, top / f"run{run}", layout_args=s.layout_args,
                                 env=s.env(CA))
            p.start()
            try:
                client = subprocess.Popen([support.QUERY, "--socket", str(p.sock), "gc", "--yes",
                                           "--throttle", "0.05"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(
                        e.get("event") == "gc_planned" for e in p.daemon_events()):
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.4))
                p.daemon.send_signal(signal.SIGKILL)
                p.daemon.wait()
                client.communicate(timeout=60)
                killed += client.returncode != 0
                assert s.foreign_key_problems() == [], f"run {run}"
                valid = {r[1] for r in s.db_rows()["ValidPaths"]}
                assert {r[1] for r in expected["ValidPaths"]} <= valid, f"run {run}: live lost"
                assert {os.path.basename(v) for v in valid} <= s.entries()
                p.daemon = None
                p.start_daemon()
                out = p.query("gc", "--yes")
                assert out.returncode == 0, out.stderr
            finally:
                p.stop()
            assert s.db_rows() == expected and s.entries() == twin.entries()
            assert s.foreign_key_problems() == []
            support.chown_tree(s.top / "store", "root")
            support.chown_tree(s.top / "var", "root")
            s.verify()
        assert killed >= 3, "the kills never hit a running collection"
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_delete_in_a_ca_store_equals_nix_store_delete(ca_world):
    """Through Realisations a resolved .drv and its output belong together
    (keep-derivations): the .drv alone is refused, as by Nix; the output
    alone, or both, go -- and their Realisations rows with them."""
    s, pristine, _ = ca_world
    db = sqlite3.connect(f"file:{pristine.state}/db/db.sqlite?mode=ro", uri=True)
    g_out, g_drv = db.execute("SELECT path, deriver FROM ValidPaths WHERE path LIKE '%-g'").fetchone()
    live_drv = db.execute("SELECT deriver FROM ValidPaths WHERE path = ?",
                          (os.readlink(pristine.top / "result-d"),)).fetchone()[0]
    db.close()
    for paths, code in (([g_drv], 1), ([live_drv], 1), ([g_out], 0), ([g_out, g_drv], 0)):
        s.restore(pristine)
        twin = pristine.copy(s.top.parent / "twin")
        try:
            ours = s.query("delete", *paths, config=CA, check=False)
            nix = s.nix_on_copy(twin, "nix-store", "--delete", *paths, config=CA, check=False)
            assert ours.returncode == nix.returncode == code, (paths, ours.stderr, nix.stderr)
            assert s.entries() == twin.entries() and s.db_rows() == twin.db_rows()
            assert s.foreign_key_problems() == []
        finally:
            subprocess.run(["rm", "-rf", str(twin.top)], check=True)


def test_an_unreadable_derivation_stops_us_as_it_stops_nix(ca_world):
    """With ca-derivations, the outputs of a derivation without
    DerivationOutputs rows are known only by reading it: when one cannot be
    read, Nix's collector fails when it visits it (it visits every dead one:
    here the resolved .drv of g, which is garbage), and we answer nothing
    and delete nothing."""
    s, pristine, _ = ca_world
    s.restore(pristine)
    drv = Path(subprocess.run(["sqlite3", f"{s.state}/db/db.sqlite", "SELECT deriver FROM "
                               "ValidPaths WHERE path LIKE '%-g'"], capture_output=True,
                              check=True).stdout.decode().strip())
    drv.chmod(0o644)
    drv.write_text("Derive([garbage")
    twin = s.copy(s.top.parent / "twin")
    try:
        before = s.db_rows(), s.entries()
        for args in (("dead",), ("gc", "--yes")):
            out = s.query(*args, config=CA, check=False)
            assert out.returncode == 1 and b"cannot parse the derivation" in out.stderr, out.stderr
            assert out.stdout == b""
        nix = s.nix_on_copy(twin, "nix-store", "--gc", config=CA, check=False)
        assert nix.returncode == 1, nix.stderr
        assert (s.db_rows(), s.entries()) == before
        # (Nix deleted what it met before.)  Without keep-derivations and
        # keep-outputs neither reads a .drv.
        subprocess.run(["rm", "-rf", str(twin.top)], check=True)
        twin = s.copy(s.top.parent / "twin")
        off = settings(False, False)
        ours = set(s.query("dead", config=off).stdout.split())
        assert ours == set(s.nix_on_copy(twin, "nix-store", "--gc", "--print-dead",
                                         config=off).stdout.split())
    finally:
        subprocess.run(["rm", "-rf", str(twin.top)], check=True)


def test_one_output_of_two_derivations_one_needing_the_other(scratch):
    """Nix issue #5320: two content-addressed derivations, the one built
    from the other, with the same (self-referencing) output: its two
    realisations refer to each other.  Nix 2.8 cannot delete that path (a
    foreign key refuses, 2.9 added a trigger); we delete it as 2.9 does,
    leaving no row behind (README, Differences)."""
    s = BuiltStore.create(scratch / "s")
    expr = scratch / "same.nix"
    ca = '__contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";'
    expr.write_text(
        "rec {\n"
        f'  bar = derivation {{ name = "same"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'args = [ "-c" "echo $out > $out" ]; {ca} }};\n'
        f'  foo = derivation {{ name = "same"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'args = [ "-c" "test -e ${{bar}}; echo $out > $out" ]; {ca} }};\n'
        "}\n")
    s.build(expr, "foo", s.top / "result", CA)
    remove(s.top / "result")
    assert s.db_rows()["RealisationsRefs"]
    twin = s.copy(scratch / "twin")
    nix = s.nix_on_copy(twin, "nix-store", "--gc", config=CA, check=False)
    assert nix.returncode == 1 and b"constraint failed" in nix.stderr
    s.query("gc", "--yes", config=CA)
    rows = s.db_rows()
    assert rows["ValidPaths"] == rows["Realisations"] == rows["RealisationsRefs"] == []
    assert s.foreign_key_problems() == [] and s.entries() == set()
    s.verify()
