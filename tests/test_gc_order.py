"""The order a collection deletes in: never a path before every referrer
of it in the dead set is gone (Nix deletes referrers first; the DB's
RESTRICT on Refs.reference would refuse otherwise), and otherwise newest
first -- the highest ValidPaths id first, so that each batch is a run of
neighbouring rows.  What is deleted is reported in that order."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gcroots.daemon import gc
from gcroots.daemon.gc import SafetyError, newest_first
from gcroots.daemon.graph import CSR

from . import support
from .support import oracle, valid_set


def _log_invalidations(root: Path) -> None:
    """Every ValidPaths row deleted, in order, into InvalidationLog (a
    table without foreign keys: the collector's cascade ignores it)."""
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.executescript("CREATE TABLE InvalidationLog (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                     "id INTEGER NOT NULL, path TEXT NOT NULL);"
                     "CREATE TRIGGER LogInvalidation AFTER DELETE ON ValidPaths BEGIN "
                     "INSERT INTO InvalidationLog (id, path) VALUES (old.id, old.path); END;")
    db.close()


def _invalidated(root: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    try:
        return db.execute("SELECT id, path FROM InvalidationLog ORDER BY seq").fetchall()
    finally:
        db.close()


def _collect_one_path_per_transaction(root: Path, monkeypatch) -> list[bytes]:
    """A real collection whose every transaction invalidates one path (so
    the log's order is the invalidation order); returns what it reports as
    deleted."""
    monkeypatch.setattr(gc, "FIRST_BATCH", 1)
    monkeypatch.setattr(gc, "BATCH", 1)
    return support.collect_in_process(root).result.deleted


def _check_referrers_first(order: list[int], refs: list[tuple[int, int]]) -> None:
    pos = {n: i for i, n in enumerate(order)}
    for a, b in refs:
        if a in pos and b in pos:
            assert pos[a] < pos[b], f"{b} went before its referrer {a}: {order}"


@pytest.mark.parametrize("case", ["ids follow references", "ids against references"])
def test_referrers_first_then_newest_first(scratch, monkeypatch, case):
    """ids following references (as Nix registers): exactly descending id.
    A reference with a higher id than its referrer (nix-store
    --register-validity registers a batch in hash order) waits for it,
    nothing else moves; the store left equals Nix's."""
    root = scratch / "store"
    if case == "ids follow references":
        refs = [(7, 5), (7, 3), (5, 3), (6, 1), (4, 0), (3, 0), (2, 1)]
        live = [6]
        expected = [8, 7, 5, 4, 3, 2, 0]
    else:
        refs = [(0, 4), (4, 6), (1, 2), (5, 3), (8, 7)]
        live = [8]
        # 6 waits for 4, 4 for 0; 2 for 1; 3 would follow 5 anyway.
        expected = [5, 3, 1, 2, 0, 4, 6]
    paths = support.tiny_store(root, [f"p{i}" for i in range(9)], refs, {}, live)
    twin = scratch / "nix-twin"
    support.copy_store(root, twin)
    _log_invalidations(root)
    deleted = _collect_one_path_per_transaction(root, monkeypatch)
    log = _invalidated(root)
    assert [i - 1 for i, _ in log] == expected
    assert deleted == [paths[n].encode() for n in expected]
    _check_referrers_first([i - 1 for i, _ in log], refs)
    oracle(twin, "nix-store", "--gc")
    assert valid_set(root) == valid_set(twin)


def test_generated_store_order(scratch, monkeypatch):
    """A generated store (derivations, outputs, self references): the
    invalidation log keeps every referrer before its references (the
    graph's edges among the dead, from the DB) and is newest first."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=95, quirks=0, roots=8, indirect=0, stale=0)
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    refs = [(a, b) for a, b in db.execute("SELECT referrer, reference FROM Refs") if a != b]
    db.close()
    _log_invalidations(root)
    deleted = _collect_one_path_per_transaction(root, monkeypatch)
    log = _invalidated(root)
    assert len(log) > 100
    ids = [i for i, _ in log]
    _check_referrers_first(ids, refs)
    assert ids == sorted(ids, reverse=True)  # the generator registers references first
    assert [p for p in deleted if not p.startswith(b"/nix/store/")] == []
    valid_deleted = [p for p in deleted if p in {q.encode() for _, q in log}]
    assert valid_deleted == [q.encode() for _, q in log]


def _brute_order(n: int, edges: set[tuple[int, int]], dead: list[int]) -> list[int]:
    """The same rule, written out: key = the lowest node among a node and
    its transitive referrers in the dead set; highest key first, then
    depth below the dead set's top referrers, then the highest node."""
    inside = set(dead)
    referrers = {v: [a for a, b in edges if b == v and a in inside] for v in dead}
    key, depth = {}, {}

    def walk(v: int) -> tuple[int, int]:
        if v not in key:
            up = [walk(a) for a in referrers[v]]
            key[v] = min([v] + [k for k, _ in up])
            depth[v] = max([d + 1 for _, d in up], default=0)
        return key[v], depth[v]
    for v in dead:
        walk(v)
    return sorted(dead, key=lambda v: (-key[v], depth[v], -v))


def test_newest_first_on_random_graphs():
    rng = random.Random(17)
    for _ in range(300):
        n = rng.randint(1, 40)
        rank = list(range(n))
        rng.shuffle(rank)   # rank[i]: a topological position; a referrer has the lower one
        edges = set()
        for _ in range(rng.randint(0, 3 * n)):
            a, b = rng.randrange(n), rng.randrange(n)
            if rank[a] < rank[b]:
                edges.add((a, b))
        refs = CSR.from_lists({i: [b for a, b in edges if a == i] for i in range(n)}).grown(n)
        dead = sorted(rng.sample(range(n), rng.randint(0, n)))
        got = newest_first(refs, np.array(dead, dtype=np.int64), n).tolist()
        assert got == _brute_order(n, edges, dead)
        _check_referrers_first(got, sorted(edges))


def test_a_cycle_among_dead_paths_is_refused():
    refs = CSR.from_lists({0: [1], 1: [2], 2: [0]}).grown(4)
    with pytest.raises(SafetyError, match="cycle"):
        newest_first(refs, np.array([0, 1, 2, 3], dtype=np.int64), 4)


def test_print_deleted_is_in_plan_order(scratch):
    """What a collection reports as deleted is in the order of its plan
    (the dry run's), whichever deleter finished first."""
    root = scratch / "store"
    support.make_store(root, paths=4000, seed=96, quirks=0, roots=20, indirect=0, stale=0)
    plan = json.loads(support.standalone(root, "gc", "--dry-run", "--json").stdout)
    done = support.standalone(root, "gc", "--yes", "--print-deleted").stdout.split(b"\n")[:-1]
    assert len(done) > 2000
    assert done == [p.encode() for p in plan["paths_list"]]


def test_gc_finished_says_where_the_time_went(scratch, users, pipelines):
    """gcrootsd's gc_finished log line carries the collection's phase
    timings (seconds_*), as gc_planned carries the analysis's."""
    root = scratch / "store"
    support.make_store(root, paths=600, seed=97, quirks=0, roots=20, indirect=3, stale=0)
    p = support.Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    out = p.query("gc", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    finished = [e for e in p.daemon_events() if e.get("event") == "gc_finished"]
    assert len(finished) == 1
    phases = {k for k in finished[0] if k.startswith("seconds_")}
    assert {"seconds_order", "seconds_check", "seconds_claim", "seconds_referrers", "seconds_db",
            "seconds_delete_after_db", "seconds_links"} <= phases
    assert all(finished[0][k] >= 0 for k in phases)
