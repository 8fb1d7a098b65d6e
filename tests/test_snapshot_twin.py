"""--standalone reads the valid paths on a second connection (the DB's
twin, Snapshot.on_twin) while the first walks the live closure.  It may
only use what the twin reads when both see the same DB state: a commit
between the two read transactions means reading on the first connection
instead -- never an answer made from two states."""

from __future__ import annotations

import os
import sqlite3

from gcroots.daemon import engine
from gcroots.daemon.nixconf import GCSettings
from gcroots.daemon.store import StoreDB
from gcroots.layout import StoreLayout

from . import support


def _store(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, roots=10, indirect=2, stale=0, quirks=0, profiles=1,
                       generations=2, users=1)
    return root, StoreLayout.make(root=os.fsencode(root))


def _add(root, scratch, name: str) -> bytes:
    """A real commit by Nix: nix-store --add of a new file."""
    f = scratch / name
    f.write_text(f"{name}\n")
    return support.oracle(root, "nix-store", "--add", str(f)).stdout.strip()


def _count(snap) -> int:
    return snap.c.execute("SELECT count(*) FROM ValidPaths").fetchone()[0]


def test_twin_is_used_only_without_a_commit_between(scratch):
    root, layout = _store(scratch)
    # Readers of the WAL (not `immutable`): they see Nix's commits.
    db = StoreDB.open(layout, twin=True)
    try:
        with db.snapshot() as snap:
            before = _count(snap)
            with snap.on_twin() as other:
                assert other is not None and _count(other) == before
            _add(root, scratch, "one")
            with snap.on_twin() as other:   # the twin would see the new path
                assert other is None
            assert _count(snap) == before
        with db.snapshot() as snap:         # a new snapshot: the same state again
            with snap.on_twin() as other:
                assert other is not None and _count(other) == _count(snap) == before + 1
    finally:
        db.close()


def test_dead_set_from_one_state_when_nix_commits_meanwhile(scratch, monkeypatch):
    """Nix registers a path after the analysis's snapshot began and before
    the twin's: the answer is the snapshot's (the twin's read is not used)."""
    root, layout = _store(scratch)
    rootset = engine.scan_in_process(layout, runtime=False)
    plain = StoreDB.open(layout)
    try:
        expected = engine.analyze(layout, plain, rootset, GCSettings())
    finally:
        plain.close()
    added = []
    started = engine._compared_in_thread

    def commit_first(*args):
        added.append(_add(root, scratch, "meanwhile"))
        return started(*args)
    monkeypatch.setattr(engine, "_compared_in_thread", commit_first)
    db = StoreDB.open(layout, twin=True)
    try:
        a = engine.analyze(layout, db, rootset, GCSettings())
    finally:
        db.close()
    assert added and a.graph is None
    assert a.valid_paths == expected.valid_paths          # the twin would count the new path
    # The new path's file may be listed (an unregistered entry in that state: dead).
    assert [p for p in a.dead if p != added[0]] == expected.dead
    assert a.all_live == expected.all_live



def test_immutable_db_twin_is_not_used_once_the_file_changed(scratch):
    """--standalone opens the DB `immutable` when no -wal exists: SQLite then
    takes no lock and its data_version never moves, so a Nix process that
    starts meanwhile and checkpoints its commits into the file went
    unnoticed: the twin read 303 valid paths against the snapshot's 300.
    The file's stamp from before the open says it changed."""
    root, layout = _store(scratch)
    assert not os.path.exists(layout.db_path + b"-wal")
    db = StoreDB.open(layout, create_files=False, twin=True)
    try:
        assert db.stamp is not None and not db.changed()
        with db.snapshot() as snap:
            before = _count(snap)
            with snap.on_twin() as other:
                assert other is not None and _count(other) == before
            for name in ("one", "two", "three"):
                _add(root, scratch, name)
            assert not os.path.exists(layout.db_path + b"-wal")   # checkpointed into the file
            assert db.changed()
            with snap.on_twin() as other:
                assert other is None or _count(other) == before
    finally:
        db.close()
    locked = StoreDB.open(layout, twin=True)   # read with locks: no stamp needed
    try:
        assert locked.stamp is None and not locked.changed()
    finally:
        locked.close()


def test_standalone_answers_again_when_an_immutable_db_changed(scratch, monkeypatch):
    """A Nix commit checkpointed into an immutable-opened DB during the
    analysis: the answer is made again from the new state, never returned
    from the mixed one."""
    import argparse

    from gcroots.client import standalone
    from gcroots.client.conn import Answer

    root, layout = _store(scratch)
    args = argparse.Namespace(store_dir=None, state_dir=None, root=os.fsencode(root),
                              allow_unprivileged_scan=True, no_runtime=True,
                              keep_derivations=None, keep_outputs=None)
    runs = []
    analyze = engine.analyze

    def commit_during(*a, **k):
        runs.append(1)
        if len(runs) == 1:
            _add(root, scratch, "meanwhile")
        return analyze(*a, **k)
    monkeypatch.setattr(engine, "analyze", commit_during)
    got = standalone.answer(args, "dead", {}, ())
    assert len(runs) == 2
    monkeypatch.setattr(engine, "analyze", analyze)
    again = standalone.answer(args, "dead", {}, ())
    assert isinstance(got, Answer) and got.paths == again.paths and got.status == again.status

    def always(*a, **k):
        _add(root, scratch, f"again{len(runs)}")
        runs.append(1)
        return analyze(*a, **k)
    monkeypatch.setattr(engine, "analyze", always)
    refused = standalone.answer(args, "dead", {}, ())
    assert refused.status == standalone.Status.ERROR and "changed while it was read" in refused.message


def test_standalone_dry_run_refuses_a_plan_from_an_immutable_db_that_changed(scratch, monkeypatch):
    """gc --standalone --dry-run reads the DB as `answer` does (immutable
    without a -wal): a plan made while Nix checkpointed into it is refused
    in one line (it was printed before)."""
    import argparse

    from gcroots.client import standalone
    from gcroots.daemon import gc

    root, layout = _store(scratch)
    args = argparse.Namespace(store_dir=None, state_dir=None, root=os.fsencode(root),
                              allow_unprivileged_scan=True, no_runtime=True, command="gc",
                              keep_derivations=None, keep_outputs=None)
    plan = gc.Collection.plan

    def commit_during(self, *a, **k):
        out = plan(self, *a, **k)
        _add(root, scratch, "meanwhile")
        return out
    monkeypatch.setattr(gc.Collection, "plan", commit_during)
    got = standalone.collect(args, {"dry_run": True})
    assert got.status == standalone.Status.ERROR and "changed while it was read" in got.message
    assert "\n" not in got.message


def test_a_reference_that_is_no_integer_is_no_edge(scratch):
    """A damaged DB's Refs row whose reference is not an integer ('1.5'
    is stored as a real) names no ValidPaths id: the live closure is the
    same as without it, as the recursive query found.  Before, the
    level-at-a-time closure ended in int()'s ValueError (a traceback)."""
    root, layout = _store(scratch)
    db = StoreDB.open(layout)
    try:
        with db.snapshot() as snap:
            ids = [i for (i,) in snap.c.execute("SELECT id FROM ValidPaths ORDER BY id LIMIT 5")]
            before = snap.live_closure(ids, GCSettings())
        with sqlite3.connect(layout.db_path) as w:   # (the test's own write; Nix is not running)
            w.execute("INSERT INTO Refs (referrer, reference) VALUES (?, '1.5')", (ids[0],))
        w.close()
        with db.snapshot() as snap:
            assert snap.live_closure(ids, GCSettings()) == before
    finally:
        db.close()
