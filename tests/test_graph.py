"""The in-memory graph's arrays (daemon/graph.py); the graph against the DB
is tests/test_follow.py's."""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from gcroots.daemon.graph import CSR, PathTable, SortedPaths


@pytest.mark.parametrize("seed", range(20))
def test_edges_added_as_a_load_of_all_of_them_orders_them(seed):
    rng = np.random.default_rng(seed)
    n0, n = int(rng.integers(1, 50)), int(rng.integers(50, 80))
    old = rng.integers(0, n0, size=(int(rng.integers(0, 200)), 2))
    new = rng.integers(0, n, size=(int(rng.integers(0, 40)), 2))
    grown = CSR.from_pairs(n0, old[:, 0], old[:, 1]).with_pairs(n, new[:, 0], new[:, 1])
    whole = CSR.from_pairs(n, np.concatenate([old[:, 0], new[:, 0]]),
                           np.concatenate([old[:, 1], new[:, 1]]))
    assert grown.start.tolist() == whole.start.tolist()
    assert grown.edges.tolist() == whole.edges.tolist() and grown.edges.dtype == np.int32


def test_path_table_sorted_access():
    paths = [b"/nix/store/%s-p%d" % (b"abcdefghij"[i % 10:i % 10 + 1] * 32, i) for i in range(200)]
    t = PathTable.from_list(paths)
    assert [t[i] for i in range(len(paths))] == paths
    ordered = sorted(paths)
    assert [SortedPaths(t)[r] for r in range(len(paths))] == ordered
    for p in paths[::7] + [b"/nix/store/0", b"/nix/store/zz", b"/nix/store/c"]:
        assert bisect.bisect_left(SortedPaths(t), p) == bisect.bisect_left(ordered, p)
        assert t.lookup(p) == (paths.index(p) if p in paths else None)


@pytest.mark.parametrize("seed", range(30))
def test_path_lookups_in_a_batch_are_bisections(seed):
    """PathTable.ranks/lookup_many (numpy over 8-byte keys of the sorted
    paths, ties compared one by one) answer as bisect and lookup() do --
    paths sharing their first bytes, prefixes of each other, with other
    prefixes than the table's, empty tables, the tail appended since."""
    import random
    rng = random.Random(seed)

    def some(k: int) -> list[bytes]:
        return [rng.choice([b"/nix/store/", b"/nix/store/0a", b"/nix/", b""])
                + bytes(rng.choice(b"ab0\x01\xff") for _ in range(rng.randint(0, 14)))
                for _ in range(k)]

    loaded = list(set(some(rng.choice([0, 1, 2, 50, 400]))))
    rng.shuffle(loaded)
    t = PathTable.from_list(loaded)
    added = [p for p in set(some(rng.randint(0, 5))) if p not in loaded]
    t = t.appended(added) if added else t
    ordered = sorted(loaded)
    queries = some(200) + loaded[:50] + added + [b"", b"\xff" * 20]
    assert t.ranks(queries).tolist() == [bisect.bisect_left(ordered, p) for p in queries]
    assert t.lookup_many(queries) == [t.lookup(p) for p in queries]


def test_a_kept_answer_is_taken_again_only_when_it_is_the_same():
    """gcrootsd keeps its last `dead` answer's frames (engine.path_frames):
    taken again for the same path table, nodes and entries; any other
    answer is made anew -- and equals the paths it names."""
    from gcroots.daemon import engine
    from gcroots.daemon.graph import StoreGraph
    paths = [b"/nix/store/%032d-p" % i for i in range(50)]

    def graph(table: PathTable) -> StoreGraph:
        g = StoreGraph.__new__(StoreGraph)
        g.paths = table
        return g

    def dead(g: StoreGraph, mask: np.ndarray, extra: list[bytes]) -> list[bytes]:
        a = engine.Analysis(None, None, [], set(), None, None, graph=g, dead_mask=mask,
                            dead_extra=extra)
        frames = engine.path_frames(a, "dead", kept)
        joined = b"".join(bytes(p) for pieces, _ in frames for p in pieces)
        assert joined.split(b"\0")[:-1] == sorted(extra + [g.paths[n] for n in np.flatnonzero(mask)])
        return frames

    kept: dict = {}
    g = graph(PathTable.from_list(paths))
    mask = np.arange(50) % 3 == 0
    first = dead(g, mask, [])
    assert dead(g, mask.copy(), []) is first
    assert dead(graph(g.paths), mask.copy(), []) is first  # forget(): the same table
    other_nodes = mask.copy()
    other_nodes[1] = True
    grown = graph(g.paths.appended([b"/nix/store/%032d-new" % 7]))
    for answer in ((g, other_nodes, []), (g, mask, [b"/nix/store/zz-junk"]),
                   (grown, np.append(mask, False), []), (grown, np.append(mask, True), [])):
        assert dead(*answer) is not first


@pytest.mark.parametrize("ahead", [False, True], ids=["same-connection", "counted-ahead"])
def test_counts_checked_while_the_answer_is_made(scratch, ahead):
    """After a change, engine.analyze makes the answer from the followed
    graph while another thread counts the DB's rows for it (gcrootsd's
    queries: on a second connection from the snapshot's start): a change
    follow() accounts for keeps the graph; a deletion it did not make (the
    counts differ) throws the answer away and makes it again from SQLite.
    Either way the answer (and its frames) is a fresh load's, and Nix's."""
    import os

    from gcroots.daemon import engine
    from gcroots.daemon.listing import StoreListing
    from gcroots.daemon.nixconf import GCSettings
    from gcroots.daemon.store import StoreDB
    from gcroots.layout import StoreLayout

    from . import support
    root = scratch / "store"
    support.make_store(root, paths=300, seed=17, roots=8, indirect=2, stale=0)
    layout = StoreLayout.make(root=os.fsencode(root))
    db, settings, kept = StoreDB.open(layout), GCSettings(), {}
    listing = StoreListing(layout.real_store_dir, layout.store_dir, watch=True)
    with db.snapshot():
        db.load_graph()

    def answer() -> engine.Analysis:
        rootset = engine.scan_in_process(layout, runtime=False)
        a = engine.analyze(layout, db, rootset, settings, listing=listing, answer="dead", kept=kept,
                           incremental=ahead)
        fresh = engine.analyze(layout, StoreDB.open(layout), rootset, settings, load=True)
        assert db.unconfirmed is None
        assert a.dead == fresh.dead == sorted(support.oracle(
            root, "nix-store", "--gc", "--print-dead").stdout.split())
        frames = engine.path_frames(a, "dead", kept)
        assert b"".join(bytes(p) for pieces, _ in frames for p in pieces) == \
            b"".join(p + b"\0" for p in a.dead)
        return a

    answer()
    (scratch / "added").write_text("added\n")
    support.oracle(root, "nix-store", "--add", str(scratch / "added"))
    a = answer()
    assert a.graph is not None and db._graph is a.graph and len(a.graph) == 301
    victim = a.dead[0]
    support.oracle(root, "nix-store", "--delete", victim.decode())
    a = answer()
    assert a.graph is None and db._graph is None and victim not in a.dead


def test_counts_ahead_are_of_the_snapshot_or_none(scratch, monkeypatch):
    """The counts made ahead on a second connection (store.CountsAhead)
    must be those of the analysis's snapshot, which SQLite cannot share.
    Here Nix deletes a garbage path after they are set up and before the
    snapshot, then adds a path after the snapshot began and before the
    second connection's transaction: that connection's counts would match
    what the followed graph expects (one path gone, one more), but they
    are not the snapshot's, so there are none; the check counts on the
    snapshot's own connection, sees the deletion, and the answer is made
    anew: Nix's.  Without a commit in between, they are used."""
    import os

    from gcroots.daemon import engine
    from gcroots.daemon.listing import StoreListing
    from gcroots.daemon.nixconf import GCSettings
    from gcroots.daemon.store import CountsAhead, StoreDB
    from gcroots.layout import StoreLayout

    from . import support
    root = scratch / "store"
    support.make_store(root, paths=200, seed=23, roots=6, indirect=2, stale=0)
    layout = StoreLayout.make(root=os.fsencode(root))
    db, settings = StoreDB.open(layout), GCSettings()
    listing = StoreListing(layout.real_store_dir, layout.store_dir, watch=True)
    with db.snapshot():
        db.load_graph()
    rootset = engine.scan_in_process(layout, runtime=False)

    def add(name: str) -> None:
        (scratch / name).write_text(name)
        support.oracle(root, "nix-store", "--add", str(scratch / name))

    def nix_dead() -> list[bytes]:
        return sorted(support.oracle(root, "nix-store", "--gc", "--print-dead").stdout.split())

    results: list = []
    real_result, real_start, real_ahead = CountsAhead.result, CountsAhead.start, StoreDB.counts_ahead
    monkeypatch.setattr(CountsAhead, "result",
                        lambda self: results.append(real_result(self)) or results[-1])
    # No commit in between: counted ahead, and kept.
    add("first")
    a = engine.analyze(layout, db, rootset, settings, listing=listing, incremental=True)
    assert results and results[0] is not None and a.graph is db._graph is not None
    assert a.dead == nix_dead()
    victim = a.dead[0]
    add("second")

    def ahead_then_delete(self, ca=False):
        out = real_ahead(self, ca)
        if out is not None:  # (not in the analysis made again, without a graph)
            support.oracle(root, "nix-store", "--delete", victim.decode())
        return out

    def add_then_start(self):
        add("third")
        real_start(self)
    monkeypatch.setattr(StoreDB, "counts_ahead", ahead_then_delete)
    monkeypatch.setattr(CountsAhead, "start", add_then_start)
    results.clear()
    a = engine.analyze(layout, db, rootset, settings, listing=listing, incremental=True)
    assert db._graph is None  # stale: loaded anew (in gcrootsd, in the background)
    assert victim not in a.dead and a.dead == nix_dead()
    assert results and all(r is None for r in results)


def test_gcrootsd_asks_numpy_for_no_huge_pages():
    """(see daemon/cli.py) set before anything imports numpy."""
    import os
    import subprocess
    import sys
    code = ("import sys, os\nimport gcroots.daemon.cli\n"
            "print('numpy' in sys.modules, os.environ.get('NUMPY_MADVISE_HUGEPAGE'))")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "0"], out


def test_arrays_grown_in_place_never_change_an_older_graphs():
    """follow() grows a graph's arrays into room after them (graph._appended)
    when no other graph grew them since: views older graphs hold never
    change, and growing an older graph again (another branch) copies."""
    from gcroots.daemon.graph import _appended
    room1: dict = {}
    a = _appended(room1, "x", np.arange(5), np.array([5, 6]))
    room2 = dict(room1)
    b = _appended(room2, "x", a, np.array([7]))            # in the room: no copy
    assert np.shares_memory(a, b) and b.tolist() == list(range(8))
    room3 = dict(room1)
    c = _appended(room3, "x", a, np.array([70, 71]))        # a again: b wrote past it
    assert not np.shares_memory(b, c)
    assert a.tolist() == list(range(7)) and b.tolist() == list(range(8))
    assert c.tolist() == list(range(7)) + [70, 71]
    d = _appended(dict(room2), "x", b, np.arange(100))      # beyond the room: copied
    assert d.tolist() == list(range(8)) + list(range(100)) and b.tolist() == list(range(8))


def test_the_first_follow_after_a_load_copies_no_array(scratch):
    """A loaded graph's growing arrays have room after them (StoreGraph
    ._make_room): the first follow() after a load writes the new paths
    there instead of copying every array (at a million paths ~70 ms of the
    first answer after a build), and the loaded graph's arrays stay as
    they were.  (A regression guard: the old code copied, correctly.)"""
    import os

    from gcroots.daemon.store import StoreDB
    from gcroots.layout import StoreLayout

    from . import support
    root = scratch / "store"
    support.make_store(root, paths=50, seed=5, roots=3, indirect=1, stale=0)
    db = StoreDB.open(StoreLayout.make(root=os.fsencode(root)))
    with db.snapshot():
        g = db.load_graph()
    before = {k: getattr(g, k).copy() for k in ("ids", "sizes", "gone", "deriver")}
    (scratch / "new").write_text("new")
    support.oracle(root, "nix-store", "--add", str(scratch / "new"))
    with db.snapshot():
        h = db.cached_graph()
    assert h is not None and h is not g and len(h) == len(g) + 1
    for k, old in before.items():
        assert np.shares_memory(getattr(g, k), getattr(h, k)), k
        assert getattr(g, k).tolist() == old.tolist()
    assert np.shares_memory(g.refs.start, h.refs.start)
    db.close()
