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
