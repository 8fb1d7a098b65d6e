"""--standalone reads the valid paths on a second connection (the DB's
twin, Snapshot.on_twin) while the first walks the live closure.  It may
only use what the twin reads when both see the same DB state: a commit
between the two read transactions means reading on the first connection
instead -- never an answer made from two states."""

from __future__ import annotations

import os

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


def test_no_twin_for_an_immutable_db(scratch):
    """--standalone opens the DB `immutable` when no -wal exists: SQLite then
    takes no lock and its data_version never moves, so a Nix process that
    starts meanwhile and checkpoints its commits into the file would go
    unnoticed between the two connections' reads.  No twin then (it read
    303 valid paths against the snapshot's 300 before)."""
    root, layout = _store(scratch)
    assert not os.path.exists(layout.db_path + b"-wal")
    db = StoreDB.open(layout, create_files=False, twin=True)
    try:
        with db.snapshot() as snap:
            before = _count(snap)
            for name in ("one", "two", "three"):
                _add(root, scratch, name)
            assert not os.path.exists(layout.db_path + b"-wal")   # checkpointed into the file
            with snap.on_twin() as other:
                assert other is None or _count(other) == before
    finally:
        db.close()
