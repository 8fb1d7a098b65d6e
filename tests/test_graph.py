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
