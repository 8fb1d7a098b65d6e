"""The store graph in memory, compact, and followed as the DB changes.

`StoreGraph` holds ValidPaths/Refs/DerivationOutputs as a few integer
arrays (numpy): node n is the n-th valid path by id; its references are
`refs.edges[refs.start[n]:refs.start[n+1]]` (compressed sparse rows).  At a
million paths that is ~4 bytes per edge and ~30 per node, against ~200 per
node for lists of tuples and a dict of paths -- what a build farm's
gcrootsd keeps resident all day -- and numpy walks it level by level
without a Python step per node.  The paths themselves are one bytes
object, NUL-terminated and sorted (`PathTable`): a run of consecutive dead
paths is one slice of it, so a `dead` answer is a few thousand slices, not
a million objects.

Its edges are those of liveness (see daemon/store.py): references, deriver
(keep-derivations), outputs (keep-outputs).  With ca-derivations, the
outputs Nix finds through Realisations (daemon/derivation.py) are kept
apart in `realised`: Nix's closure follows them, its referrer search only
for keep-derivations.

`follow()` brings a graph up to date with the DB by reading only the rows
added since it looked (ids only grow: ValidPaths is AUTOINCREMENT), and
gives up -- the caller loads the graph anew -- on anything else: a path
deleted that we did not delete, references added to an old path, a
changed schema or Realisations table.  Counts of every table say whether
anything happened that the new rows do not account for.

`LiveGraph` is the live part of it, renumbered, for `why` and `cost`.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import InitVar, dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from gcroots import log

from .nixconf import GCSettings

_log = log.get("gcroots.graph")
_NONE = np.zeros(0, dtype=np.int64)


class CSR:
    """node -> successors, as two arrays: `edges[start[n]:start[n+1]]`."""

    __slots__ = ("start", "edges")

    def __init__(self, start: np.ndarray, edges: np.ndarray) -> None:
        self.start, self.edges = start, edges

    @classmethod
    def from_pairs(cls, n: int, src: np.ndarray, dst: np.ndarray) -> "CSR":
        order = np.argsort(src, kind="stable")
        start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=start[1:])
        return cls(start, dst[order].astype(np.int32))

    @classmethod
    def from_lists(cls, lists) -> "CSR":
        """From a list of lists, or a dict node -> list (tests, small graphs)."""
        items = lists.items() if isinstance(lists, dict) else enumerate(lists)
        n = (max(lists, default=-1) + 1) if isinstance(lists, dict) else len(lists)
        pairs = [(a, b) for a, bs in items for b in bs]
        src = np.array([a for a, _ in pairs], dtype=np.int64)
        dst = np.array([b for _, b in pairs], dtype=np.int64)
        return cls.from_pairs(n, src, dst)

    def __len__(self) -> int:
        return len(self.start) - 1

    def __getitem__(self, n: int) -> np.ndarray:
        if n >= len(self.start) - 1:
            return _NONE
        return self.edges[self.start[n]:self.start[n + 1]]

    def get(self, n: int, default=()):
        return self[n]

    def grown(self, n: int) -> "CSR":
        """The same edges, for `n` nodes (nodes added have none)."""
        have = len(self.start) - 1
        if n <= have:
            return self
        return CSR(np.concatenate([self.start, np.full(n - have, self.start[-1])]), self.edges)

    def with_pairs(self, n: int, src: np.ndarray, dst: np.ndarray) -> "CSR":
        """These edges added (any node), for `n` nodes."""
        g = self.grown(n)
        if not len(src):
            return g
        # Each after the edges its node has (as from_pairs of old + new
        # puts them): one pass over the edges, not a sort of all of them
        # (a build's few new references on a million-path graph).
        order = np.argsort(src, kind="stable")
        src = src[order]
        start = g.start.copy()
        start[1:] += np.cumsum(np.bincount(src, minlength=n))
        return CSR(start, np.insert(g.edges, g.start[src + 1], dst[order].astype(np.int32)))

    def gather(self, nodes: np.ndarray) -> np.ndarray:
        """The successors of all of `nodes`, concatenated."""
        nodes = nodes[nodes < len(self.start) - 1]
        lo, hi = self.start[nodes], self.start[nodes + 1]
        lens = hi - lo
        total = int(lens.sum())
        if not total:
            return _NONE
        # Position k of the output reads edges[lo[i] + (k - first k of i)].
        shift = np.repeat(lo - (np.cumsum(lens) - lens), lens)
        return self.edges[shift + np.arange(total)]

    def reversed(self, n: int) -> "CSR":
        src = np.repeat(np.arange(len(self.start) - 1), np.diff(self.start))
        return CSR.from_pairs(n, self.edges.astype(np.int64), src)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.repeat(np.arange(len(self.start) - 1), np.diff(self.start)), self.edges


def _empty_csr(n: int) -> CSR:
    return CSR(np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int32))


class PathTable:
    """node -> store path.  The paths of a full load are one bytes object,
    each NUL-terminated, in sorted order (`order`: sorted position -> node,
    `rank`: node -> sorted position); paths added since are in `tail`."""

    def __init__(self, blob: bytes, order: np.ndarray, tail: list[bytes] | None = None) -> None:
        self.blob = blob
        self.order = order.astype(np.int32)
        self.base = len(order)
        self.rank = np.empty(self.base, dtype=np.int32)
        self.rank[self.order] = np.arange(self.base, dtype=np.int32)
        ends = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 0)
        self.offsets = np.zeros(self.base + 1, dtype=np.int64)
        self.offsets[1:] = ends + 1
        # Python ints from a memoryview: 3x faster than numpy scalars in
        # the bisections over the table (path lookups, merging the tail).
        self._offset = memoryview(self.offsets)
        self.tail = tail or []
        self._tail_index = {p: self.base + i for i, p in enumerate(self.tail)}

    @classmethod
    def from_list(cls, paths: list[bytes]) -> "PathTable":
        order = sorted(range(len(paths)), key=paths.__getitem__)
        return cls(b"".join(paths[i] + b"\0" for i in order), np.array(order, dtype=np.int64))

    def __len__(self) -> int:
        return self.base + len(self.tail)

    def sorted_path(self, r: int) -> bytes:
        return self.blob[self._offset[r]:self._offset[r + 1] - 1]

    def __getitem__(self, node) -> bytes:
        node = int(node)
        if node < self.base:
            return self.sorted_path(int(self.rank[node]))
        return self.tail[node - self.base]

    def __iter__(self) -> Iterator[bytes]:
        return (self[n] for n in range(len(self)))

    def appended(self, paths: list[bytes]) -> "PathTable":
        t = object.__new__(PathTable)
        t.__dict__.update(self.__dict__)
        t.tail = self.tail + paths
        t._tail_index = {**self._tail_index,
                         **{p: len(self) + i for i, p in enumerate(paths)}}
        return t

    def _keys(self) -> tuple[int, np.ndarray]:
        """(skip, keys): the 8 bytes of each sorted path after the `skip`
        bytes all of them share, zero-padded, as big-endian integers --
        ordered as the paths are, so numpy bisects a batch of paths at once
        (ranks).  Made on first use, 8 bytes a path, shared by the tables
        appended to this one."""
        cached = self.__dict__.get("_keys_cache")
        if cached is None:
            skip = 0
            if self.base:
                first, last = self.sorted_path(0), self.sorted_path(self.base - 1)
                while skip < min(len(first), len(last)) and first[skip] == last[skip]:
                    skip += 1
            raw = np.frombuffer(self.blob, dtype=np.uint8)
            starts, ends = self.offsets[:-1] + skip, self.offsets[1:] - 1
            keys = np.zeros(self.base, dtype=np.uint64)
            for j in range(8):
                at = starts + j
                inside = at < ends
                byte = raw[np.where(inside, at, 0)].astype(np.uint64)
                keys |= np.where(inside, byte, 0) << np.uint64(56 - 8 * j)
            cached = self.__dict__["_keys_cache"] = (skip, keys)
        return cached

    def ranks(self, paths: list[bytes]) -> np.ndarray:
        """bisect_left of each of `paths` among the loaded (sorted) paths,
        for all of them at once: numpy on the keys, then only paths that
        share their key with loaded ones (rare) compared one by one."""
        skip, keys = self._keys()
        want = np.array([int.from_bytes(p[skip:skip + 8].ljust(8, b"\0"), "big") for p in paths],
                        dtype=np.uint64)
        lo = np.searchsorted(keys, want, side="left")
        hi = np.searchsorted(keys, want, side="right")
        seq = SortedPaths(self)
        prefix = self.sorted_path(0)[:skip] if self.base else b""
        for i in np.flatnonzero(hi - lo != 0).tolist():  # keys shared with loaded paths
            lo[i] = bisect.bisect_left(seq, paths[i], int(lo[i]), int(hi[i]))
        for i, p in enumerate(paths):  # another prefix: it sorts by that alone
            if p[:skip] != prefix:
                lo[i] = bisect.bisect_left(seq, p)
        return lo.astype(np.int64)

    def lookup_many(self, paths: list[bytes]) -> list[int | None]:
        """lookup() of each of `paths`, the loaded ones bisected at once."""
        out: list[int | None] = [self._tail_index.get(p) for p in paths]
        todo = [i for i, n in enumerate(out) if n is None]
        if todo and self.base:
            ranks = self.ranks([paths[i] for i in todo]).tolist()
            for i, r in zip(todo, ranks):
                if r < self.base and self.sorted_path(r) == paths[i]:
                    out[i] = int(self.order[r])
        return out

    def lookup(self, path: bytes) -> int | None:
        """The node of `path` (the newest, if it was added again), or None."""
        node = self._tail_index.get(path)
        if node is not None:
            return node
        r = bisect.bisect_left(SortedPaths(self), path)
        if r < self.base and self.sorted_path(r) == path:
            return int(self.order[r])
        return None

    def with_prefix(self, prefix: bytes) -> list[int]:
        """Nodes whose path starts with `prefix`."""
        seq = SortedPaths(self)
        r = bisect.bisect_left(seq, prefix)
        out = []
        while r < self.base and self.sorted_path(r).startswith(prefix):
            out.append(int(self.order[r]))
            r += 1
        return out + [n for p, n in self._tail_index.items() if p.startswith(prefix)]


class SortedPaths:
    """The sorted paths as a sequence, for bisect."""

    def __init__(self, t: PathTable) -> None:
        self.t = t

    def __len__(self) -> int:
        return self.t.base

    def __getitem__(self, r: int) -> bytes:
        return self.t.sorted_path(r)


class PathIndex:
    """path -> node, over a PathTable (a Mapping's get/[]/in); paths of
    nodes invalidated since the load are not in it."""

    def __init__(self, graph: "StoreGraph") -> None:
        self.graph = graph

    def get(self, path: bytes, default=None):
        node = self.graph.paths.lookup(path)
        if node is None or self.graph.gone[node]:
            return default
        return node

    def __getitem__(self, path: bytes) -> int:
        node = self.get(path)
        if node is None:
            raise KeyError(path)
        return node

    def __contains__(self, path: bytes) -> bool:
        return self.get(path) is not None

    def get_many(self, paths: list[bytes]) -> list[int | None]:
        """get() of each of `paths`, looked up at once (PathTable.lookup_many)."""
        gone = self.graph.gone
        return [None if n is None or gone[n] else n for n in self.graph.paths.lookup_many(paths)]


class Stale(Exception):
    """The DB changed in a way only a full load follows."""


@dataclass(frozen=True)
class Marks:
    """What the DB held when the graph last looked (see follow())."""
    max_id: int
    paths: int            # rows of ValidPaths
    refs: int             # ... of Refs
    outputs: int          # ... of DerivationOutputs
    realisations: tuple   # (rows, highest id) of Realisations if followed, else ()
    schema: int           # PRAGMA schema_version


def _counts(conn) -> tuple[int, int, int]:
    """Rows of ValidPaths, Refs, DerivationOutputs.  SQLite reads every page
    of a b-tree to count it: after a commit by Nix (its page cache dropped),
    at a million paths, 60-140 ms, the most of a follow (see
    StoreGraph.check_counts).  Of DerivationOutputs, through its primary
    key's index (drv, id; drv is NOT NULL, so every row): count(*) alone
    picks the index on path, 4.5 times as many pages (at a million paths
    13,000 against 2,900)."""
    return conn.execute(f"SELECT {COUNT_PATHS}, {COUNT_EDGES}").fetchone()


# _counts' parts: what each of two connections counts (store.CountsAhead),
# about 22,500 and 13,800 pages at a million paths.
COUNT_PATHS = "(SELECT count(*) FROM ValidPaths)"
COUNT_EDGES = ("(SELECT count(*) FROM Refs), "
               "(SELECT count(*) FROM DerivationOutputs WHERE drv IS NOT NULL)")


def _marks(conn, ca: bool, counted: bool = True) -> Marks:
    """Without `counted`, the row counts are left at -1."""
    one = lambda q: conn.execute(q).fetchone()[0] or 0  # noqa: E731
    realisations: tuple = ()
    if ca:  # rows, and the highest id ever given (AUTOINCREMENT): grows with every row added
        try:
            realisations = (one("SELECT count(*) FROM Realisations"),
                            one("SELECT max(seq) FROM sqlite_sequence WHERE name = 'Realisations'")
                            or one("SELECT max(id) FROM Realisations"))
        except Exception:  # no such table (yet)
            realisations = ("none",)
    return Marks(one("SELECT max(id) FROM ValidPaths"), *(_counts(conn) if counted else (-1,) * 3),
                 realisations, one("PRAGMA schema_version"))


def _ints(conn, query: str, args=()) -> np.ndarray:
    """The integers of a `group_concat(... ',' ...)` query: one text value
    moves the rows to numpy without a Python object per row (at a million
    paths that is the difference between 0.5 s and 2 s, and 50 MB)."""
    text = conn.execute(query, args).fetchone()[0]
    if not text:
        return np.zeros(0, dtype=np.int64)
    return np.fromstring(text, dtype=np.int64, sep=",")


@dataclass(eq=False)
class StoreGraph:
    version: int                      # PRAGMA data_version it matches
    paths: PathTable                  # node -> store path
    sizes: np.ndarray                 # node -> narSize
    refs: CSR                         # node -> referenced nodes (no self)
    deriver: np.ndarray               # node -> its valid deriver node that lists it, or -1
    outputs: CSR                      # drv node -> valid output nodes (DerivationOutputs)
    given_index: InitVar[object] = None  # path -> node, as callers once gave it: see index
    realised: CSR | None = None       # ... through Realisations
    ca: bool = False                  # loaded following Realisations (realised filled in)
    ids: np.ndarray | None = None     # node -> ValidPaths.id, ascending
    marks: Marks | None = None
    gone: np.ndarray | None = None    # nodes we invalidated since the load
    ref_rows: np.ndarray | None = None  # node -> its Refs rows as referrer (self refs too)
    do_rows: np.ndarray | None = None   # node -> its DerivationOutputs rows as drv
    _referrers: CSR | None = field(default=None, repr=False)
    # The last live_mark() (see there) and the nodes whose edges out
    # follow() changed since it was made (arrays), in one attribute: a
    # graph is copied (follow) while another thread may mark it.
    _live: tuple = field(default=(None, ()), repr=False)
    _room: dict = field(default_factory=dict, repr=False)   # see _appended

    def __post_init__(self, given_index) -> None:
        # Small graphs may be given as lists (tests); the loader gives arrays.
        if isinstance(self.paths, list):
            self.paths = PathTable.from_list(self.paths)
        n = len(self.paths)
        if not isinstance(self.refs, CSR):
            self.refs = CSR.from_lists(self.refs)
        for name in ("outputs", "realised"):
            value = getattr(self, name)
            value = _empty_csr(0) if value is None else value
            setattr(self, name, (value if isinstance(value, CSR) else CSR.from_lists(value)).grown(n))
        self.refs = self.refs.grown(n)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.deriver = np.asarray(self.deriver, dtype=np.int32)
        if self.ids is None:
            self.ids = np.arange(1, n + 1, dtype=np.int64)
        for name in ("gone", "ref_rows", "do_rows"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n, dtype=bool if name == "gone" else np.int32))

    @property
    def index(self) -> PathIndex:
        """path -> node.  Made on use, not kept: a graph and its index
        pointing at each other would be a cycle, so a graph replaced by a
        newer one (follow, forget, a reload) would wait for the cyclic GC --
        for ever for the one loaded first, which gc.freeze() makes
        permanent."""
        return PathIndex(self)

    def __len__(self) -> int:
        return len(self.paths)

    # -- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, conn, version: int,
             realised_pairs: list[tuple[int, int]] | None = None) -> "StoreGraph":
        """Read the graph (inside a read transaction).  `realised_pairs`:
        (drv id, output id) from Realisations, given when Nix would follow
        them (GCSettings.follows_realisations)."""
        ca = realised_pairs is not None
        marks = _marks(conn, ca)
        ids_sizes = _ints(conn, "SELECT group_concat(id || ',' || coalesce(narSize, 0)) "
                                "FROM ValidPaths")
        ids, sizes = ids_sizes[0::2].copy(), ids_sizes[1::2].copy()
        n = len(ids)
        blob, by_path = conn.execute(
            "SELECT group_concat(path, char(0)) || char(0), group_concat(id) "
            "FROM (SELECT id, path FROM ValidPaths ORDER BY path)").fetchone()
        order = np.searchsorted(ids, np.fromstring(by_path or b"", dtype=np.int64, sep=","))
        g = cls(version, PathTable(blob if n else b"", order), sizes, _empty_csr(n),
                np.full(n, -1, dtype=np.int32), _empty_csr(n), ids=ids, marks=marks, ca=ca)
        src, dst = g._ref_pairs(conn, "")
        g.refs = CSR.from_pairs(n, src, dst)
        g._add_outputs(conn, "FROM DerivationOutputs x JOIN ValidPaths v ON v.path = x.path")
        g._count_do_rows(conn, 0)
        if realised_pairs:
            g._add_realised(conn, realised_pairs)
        g._live = (None, ())
        g._make_room()
        return g

    def _make_room(self) -> None:
        """The arrays follow() grows, moved into buffers with room after
        them (see _appended): else the first follow after a load copies
        them all (at a million paths ~70 ms of the first answer after a
        build).  The room is not written, so not resident."""
        room = self._room
        for key in ("ids", "sizes", "gone", "deriver", "ref_rows", "do_rows"):
            setattr(self, key, _with_room(room, key, getattr(self, key)))
        for key in ("refs", "outputs", "realised"):
            csr = getattr(self, key)
            setattr(self, key, CSR(_with_room(room, key, csr.start), csr.edges))

    def _touch(self, *nodes: np.ndarray) -> None:
        last, touched = self._live
        if last is not None:
            self._live = (last, touched + nodes)

    def _add_realised(self, conn, realised_pairs: list[tuple[int, int]]) -> None:
        """Edges .drv -> output found through Realisations (and the
        keep-derivations edge back when the output names the .drv)."""
        pairs = np.array(realised_pairs, dtype=np.int64).reshape(-1, 2)
        d, o = self.nodes_of(pairs[:, 0]), self.nodes_of(pairs[:, 1])
        self._touch(d, o)
        self.realised = self.realised.with_pairs(len(self), d, o)
        derivers = self._derivers_of(conn, o)
        named = np.array([self.paths[x] == derivers.get(int(y)) for x, y in zip(d, o)],
                         dtype=bool)
        self.deriver = self.deriver.copy()
        self.deriver[o[named]] = d[named]

    def nodes_of(self, ids: np.ndarray) -> np.ndarray:
        """DB ids -> nodes (each must be one of ours)."""
        return np.searchsorted(self.ids, ids)

    def _known(self, ids: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), dtype=bool)

    def _ref_pairs(self, conn, where: str, args=()) -> tuple[np.ndarray, np.ndarray]:
        """(referrer, reference) nodes of the Refs rows `where` selects, self
        references left out (and counted in ref_rows, with the others);
        rows naming an id that is not in ValidPaths (a DB written with
        foreign keys off) join with nothing in Nix's queries, nor in ours."""
        pairs = _ints(conn, f"SELECT group_concat(referrer || ',' || reference) FROM Refs {where}",
                      args).reshape(-1, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        known_a = self._known(a)
        self.ref_rows = self.ref_rows.copy()
        np.add.at(self.ref_rows, self.nodes_of(a[known_a]), 1)
        ok = known_a & self._known(b)
        if not ok.all():
            _log.warning("db_dangling_rows", count=int((~ok).sum()))
            a, b = a[ok], b[ok]
        a, b = self.nodes_of(a), self.nodes_of(b)
        keep = a != b
        return a[keep], b[keep]

    def _add_outputs(self, conn, rows: str, where: str = "", args=()) -> None:
        """The DerivationOutputs rows of `rows` (a FROM clause naming the
        table x, joined with the output's row v) and `where`: keep-derivations keeps a
        .drv for an output that names it as its deriver and that the .drv
        lists (DerivationOutputs or, with ca-derivations, Realisations:
        both, as Nix's referrer search checks); keep-outputs keeps every
        valid output a .drv lists."""
        found = _ints(conn, "SELECT group_concat(x.drv || ',' || v.id || ',' || "
                            "(v.deriver IS NOT NULL AND v.deriver = d.path)) "
                            f"{rows} JOIN ValidPaths d ON d.id = x.drv {where}",
                       args).reshape(-1, 3)
        if not len(found):
            return
        d, o = self.nodes_of(found[:, 0]), self.nodes_of(found[:, 1])
        # Edges out of both may be new: drv -> output, output -> deriver.
        self._touch(d, o)
        self.outputs = self.outputs.with_pairs(len(self), d, o)
        named = found[:, 2] == 1
        self.deriver = self.deriver.copy()
        self.deriver[o[named]] = d[named]

    def _count_do_rows(self, conn, above: int) -> None:
        """do_rows += the DerivationOutputs rows of .drvs with ids > above."""
        drvs = _ints(conn, "SELECT group_concat(drv) FROM DerivationOutputs WHERE drv > ?",
                     (above,))
        self.do_rows = self.do_rows.copy()
        np.add.at(self.do_rows, self.nodes_of(drvs[self._known(drvs)]), 1)

    def _derivers_of(self, conn, nodes: np.ndarray) -> dict[int, bytes]:
        """node -> its ValidPaths.deriver, for these nodes."""
        out = {}
        for i in range(0, len(nodes), 500):
            chunk = [int(x) for x in self.ids[nodes[i:i + 500]]]
            rows = conn.execute("SELECT id, deriver FROM ValidPaths WHERE id IN (%s)"
                                % ",".join("?" * len(chunk)), chunk)
            node_of = dict(zip(chunk, (int(x) for x in nodes[i:i + 500])))
            out.update((node_of[i_], d) for i_, d in rows if d is not None)
        return out

    # -- following the DB ------------------------------------------------------------

    def forget(self, ids: Iterable[int], realisations: int = 0) -> "StoreGraph":
        """Our own collection invalidated these paths, and with them what
        the DB's foreign keys delete (daemon/gc.py; `realisations`: rows of
        Realisations): the graph without them, and the DB's counts as they
        must now be, which follow() checks."""
        ids = np.fromiter(ids, dtype=np.int64)
        nodes = self.nodes_of(ids[self._known(ids)])
        nodes = nodes[~self.gone[nodes]]
        if not len(nodes):
            return self
        gone = self.gone.copy()
        gone[nodes] = True
        m = self.marks
        # Their Refs rows all have one of them as referrer: a path still
        # valid that refers to one stops the collection (RESTRICT).
        rs = m.realisations
        if realisations and len(rs) == 2:
            rs = (rs[0] - realisations, rs[1])
        return _replace(self, gone=gone, _referrers=None, _live=(None, ()), marks=Marks(
            m.max_id, m.paths - len(nodes), m.refs - int(self.ref_rows[nodes].sum()),
            m.outputs - int(self.do_rows[nodes].sum()), rs, m.schema))

    def follow(self, conn, version: int,
               realised_since: "Callable[[int], list[tuple[int, int]]] | None" = None,
               *, check_later: bool = False) -> "StoreGraph":
        """This graph brought up to date with the DB (inside a read
        transaction); Stale if that takes a full load: anything but rows
        added since we looked (and the deletions of forget()).
        `realised_since(max_id)`: with `ca`, the Realisations pairs of the
        .drvs registered since (realised_outputs): a .drv registered again
        finds the rows of its outputs that stayed valid, and no count
        changes.  `check_later`: the row counts are left to the caller's
        check_counts() on the new graph, in the same transaction, before
        anything made from it is used."""
        if version == self.version:
            return self
        old = self.marks
        now = _marks(conn, self.ca, counted=False)
        if now.schema != old.schema:
            raise Stale("the DB's schema changed")
        if now.realisations != old.realisations:  # found by hashing .drv files
            raise Stale("Realisations changed")
        rows = conn.execute("SELECT id, path, coalesce(narSize, 0) FROM ValidPaths WHERE id > ? "
                            "ORDER BY id", (old.max_id,)).fetchall()
        # Rows of new paths (and .drvs) only: an old path's references or
        # outputs are registered with it, and registering it again replaces
        # them with the same; anything else changes a count (check_counts).
        new_refs, new_do = conn.execute(
            "SELECT (SELECT count(*) FROM Refs WHERE referrer > ?1), "
            "(SELECT count(*) FROM DerivationOutputs WHERE drv > ?1)", (old.max_id,)).fetchone()
        g = _replace(self, version=version, _referrers=None, marks=replace(
            now, paths=old.paths + len(rows), refs=old.refs + new_refs,
            outputs=old.outputs + new_do))
        if not check_later:
            g.check_counts(conn)
        g._room = room = dict(self._room)
        if rows:
            k = len(rows)
            g.ids = _appended(room, "ids", self.ids, np.array([r[0] for r in rows], dtype=np.int64))
            g.sizes = _appended(room, "sizes", self.sizes,
                                np.array([r[2] for r in rows], dtype=np.int64))
            g.paths = self.paths.appended([r[1] for r in rows])
            g.gone = _appended(room, "gone", self.gone, np.zeros(k, dtype=bool))
            g.deriver = _appended(room, "deriver", self.deriver, np.full(k, -1, dtype=np.int32))
            g.ref_rows = _appended(room, "ref_rows", self.ref_rows, np.zeros(k, dtype=np.int32))
            g.do_rows = _appended(room, "do_rows", self.do_rows, np.zeros(k, dtype=np.int32))
        n = len(g.paths)
        g.refs, g.outputs, g.realised = (_grown(room, "refs", self.refs, n),
                                         _grown(room, "outputs", self.outputs, n),
                                         _grown(room, "realised", self.realised, n))
        if new_refs:
            src, dst = g._ref_pairs(conn, "WHERE referrer > ?", (old.max_id,))
            g.refs = g.refs.with_pairs(n, src, dst)
        if new_do:  # new .drvs: their outputs, old or new
            g._add_outputs(conn, "FROM DerivationOutputs x JOIN ValidPaths v ON v.path = x.path",
                           "WHERE x.drv > ?", (old.max_id,))
            g._count_do_rows(conn, old.max_id)
        if rows:    # new outputs of old .drvs (registered after them)
            # CROSS JOIN: the new rows first.  Left to itself SQLite walks
            # DerivationOutputs by drv <= max_id -- all of it, 1.8 s at a
            # million paths, on every change.
            g._add_outputs(conn, "FROM ValidPaths v CROSS JOIN DerivationOutputs x "
                                 "ON x.path = v.path",
                           "WHERE v.id > ? AND x.drv <= ?", (old.max_id, old.max_id))
        if rows and self.ca:
            if realised_since is None:
                raise Stale("new paths, and no way to read their realisations")
            pairs = realised_since(old.max_id)
            if pairs:
                g._add_realised(conn, pairs)
        return g

    def check_counts(self, conn, counted: tuple[int, int, int] | None = None) -> None:
        """Stale unless the DB's row counts are the ones follow() made this
        graph for: any row that went away, or was added but not as the
        rows of a new path, changes one.  `counted`: the counts, made of
        this very snapshot by another connection (store.CountsAhead)."""
        paths, refs, outputs = counted if counted is not None else _counts(conn)
        if paths != self.marks.paths:
            raise Stale("a valid path went away (another collector, nix-store --delete)")
        if refs != self.marks.refs:
            raise Stale("references of a path registered before changed")
        if outputs != self.marks.outputs:
            raise Stale("outputs of a derivation registered before changed")

    # -- walking ---------------------------------------------------------------------

    def closure_mask(self, start: Iterable[int], settings: GCSettings) -> np.ndarray:
        """The nodes reachable from `start` over the GC's edges, as a mask;
        breadth first, one array operation per level."""
        # Paths we invalidated are seen from the start: edges to them (a
        # .drv's outputs) lead nowhere.
        seen = self.gone.copy()
        frontier = np.unique(np.fromiter(start, dtype=np.int64))
        return self._walk(seen, frontier, settings) & ~self.gone

    def live_mark(self, roots: np.ndarray, settings: GCSettings) -> np.ndarray:
        """closure_mask(roots) (read-only), made from the last one when it
        can be: follow() only adds nodes and edges (anything else is Stale,
        and forget() drops the last mark), so if every root of the last
        mark is still a root, the closure only grows -- from the roots not
        in it and from what the nodes in it that gained edges since now
        reach.  At a million paths that walks a build's new paths, not the
        whole live part again."""
        roots = np.unique(np.asarray(roots, dtype=np.int64))
        key = (settings.keep_derivations, settings.keep_outputs)
        (last, since), n = self._live, len(self)
        if (last is None or last.key != key or last.n > n
                or not np.isin(last.roots, roots, assume_unique=True).all()):
            mask = self.closure_mask(roots, settings)
        else:
            seen = np.zeros(n, dtype=bool)
            seen[:last.n] = last.mask
            touched = np.concatenate([np.asarray(t, dtype=np.int64) for t in since] + [_NONE])
            touched = np.unique(touched[touched < last.n])
            touched = touched[seen[touched]]   # live ones: their new edges lead on
            start = np.concatenate([roots, self._successors(touched, settings)])
            seen |= self.gone
            mask = self._walk(seen, np.unique(start), settings) & ~self.gone
        mask.flags.writeable = False
        self._live = (_LiveMark(key, roots, n, mask), ())
        return mask

    def _successors(self, nodes: np.ndarray, settings: GCSettings) -> np.ndarray:
        out = [self.refs.gather(nodes)]
        if settings.keep_derivations:
            d = self.deriver[nodes]
            out.append(d[d >= 0])
        if settings.keep_outputs:
            out += [self.outputs.gather(nodes), self.realised.gather(nodes)]
        return np.concatenate(out).astype(np.int64)

    def _walk(self, seen: np.ndarray, frontier: np.ndarray, settings: GCSettings) -> np.ndarray:
        """`seen` (changed) with what `frontier` (unique) reaches."""
        frontier = frontier[~seen[frontier]]
        seen[frontier] = True
        kd, ko = settings.keep_derivations, settings.keep_outputs
        while len(frontier):
            nxt = [self.refs.gather(frontier)]
            if kd:
                d = self.deriver[frontier]
                nxt.append(d[d >= 0])
            if ko:
                nxt += [self.outputs.gather(frontier), self.realised.gather(frontier)]
            cand = np.concatenate(nxt)
            cand = np.unique(cand[~seen[cand]])
            seen[cand] = True
            frontier = cand
        return seen

    def closure(self, start: Iterable[int], settings: GCSettings) -> set[int]:
        return set(np.flatnonzero(self.closure_mask(start, settings)).tolist())

    def successors(self, node: int, settings: GCSettings) -> list[int]:
        out = self.refs[node].tolist()
        if settings.keep_derivations and self.deriver[node] >= 0:
            out.append(int(self.deriver[node]))
        if settings.keep_outputs:
            out += self.outputs[node].tolist() + self.realised[node].tolist()
        return [m for m in out if not self.gone[m]]

    def referrers(self) -> CSR:
        """node -> the nodes that reference it (built on first use)."""
        if self._referrers is None:
            self._referrers = self.refs.reversed(len(self))
        return self._referrers

    def nodes_with_hash(self, h: bytes, store_dir: bytes) -> list[int]:
        """Valid paths whose hash part is `h` (Nix matches temp roots so)."""
        return [n for n in self.paths.with_prefix(store_dir + b"/" + h) if not self.gone[n]]

    def referrer_closure_mask(self, start: Iterable[int], settings: GCSettings) -> np.ndarray:
        """What Nix's referrer search visits: referrers; for a .drv, its
        outputs whose deriver is that .drv (keep-derivations); the .drvs
        that list a path as output in DerivationOutputs (keep-outputs:
        queryValidDerivers, which does not look at Realisations)."""
        referrers = self.referrers()
        derivers_of = self.outputs.reversed(len(self)) if settings.keep_outputs else None
        seen = self.gone.copy()
        frontier = np.unique(np.fromiter(start, dtype=np.int64))
        frontier = frontier[~seen[frontier]]
        seen[frontier] = True
        while len(frontier):
            nxt = [referrers.gather(frontier)]
            if settings.keep_derivations:
                for csr in (self.outputs, self.realised):
                    src = np.repeat(frontier, np.diff(csr.start)[frontier])
                    outs = csr.gather(frontier)
                    nxt.append(outs[self.deriver[outs] == src])
            if derivers_of is not None:
                nxt.append(derivers_of.gather(frontier))
            cand = np.concatenate(nxt).astype(np.int64)
            cand = np.unique(cand[~seen[cand]])
            seen[cand] = True
            frontier = cand
        return seen & ~self.gone

    def referrer_closure(self, start: Iterable[int], settings: GCSettings) -> set[int]:
        return set(np.flatnonzero(self.referrer_closure_mask(start, settings)).tolist())


@dataclass(frozen=True)
class _LiveMark:
    key: tuple            # (keep-derivations, keep-outputs)
    roots: np.ndarray     # sorted nodes
    n: int                # nodes the graph had
    mask: np.ndarray


def _appended(room: dict, key: str, arr: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """`arr` with `tail` after it, for follow(): a new graph, but not a
    copy of a million-node array per change.  The arrays follow() grows
    are views of buffers with room after them (`room`, the graph's: key ->
    (buffer, [its length written], the view)): when `arr` is the view that
    reaches that length -- no other graph grew the buffer since -- `tail`
    is written into the room, which the views older graphs hold do not
    reach; else the buffer is copied into one with room for an eighth
    more (pages of it not yet written are not resident)."""
    n, k = len(arr), len(tail)
    if not k:
        return arr
    buf, written, view = room.get(key, (None, None, None))
    if view is not arr or written[0] != n or len(buf) < n + k:
        buf, written = np.empty(n + k + max(k, n // 8), dtype=arr.dtype), [n]
        buf[:n] = arr
    buf[n:n + k] = tail
    written[0] = n + k
    out = buf[:n + k]
    room[key] = (buf, written, out)
    return out


def _with_room(room: dict, key: str, arr: np.ndarray) -> np.ndarray:
    """`arr` copied into a buffer with room for an eighth more after it,
    as _appended leaves one: its view, registered in `room`."""
    n = len(arr)
    buf = np.empty(n + max(1, n // 8), dtype=arr.dtype)
    buf[:n] = arr
    out = buf[:n]
    room[key] = (buf, [n], out)
    return out


def _grown(room: dict, key: str, csr: CSR, n: int) -> CSR:
    """csr.grown(n), its start array grown by _appended."""
    have = len(csr.start) - 1
    if n <= have:
        return csr
    return CSR(_appended(room, key, csr.start, np.full(n - have, csr.start[-1])), csr.edges)


def _replace(g: StoreGraph, **changes) -> StoreGraph:
    """A shallow copy with `changes` (arrays are shared until replaced)."""
    new = object.__new__(StoreGraph)
    new.__dict__.update(g.__dict__)
    new.__dict__.update(changes)
    return new


SUPER = -1


@dataclass
class LiveGraph:
    paths: list[bytes]                      # node -> store path
    sizes: list[int]                        # node -> narSize
    succ: list[list[int]]                   # forward edges (within the live set)
    roots: list[int]                        # root nodes
    index: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def from_store_graph(cls, g: StoreGraph, live: np.ndarray, root_nodes: Iterable[int],
                         settings: GCSettings, sizes: dict[int, int] | None = None) -> "LiveGraph":
        """`live`: the mask of live nodes; `sizes`: node -> narSize to use
        instead of the graph's (read from the DB when answering)."""
        old_nodes = np.flatnonzero(live).tolist()
        renumber = {old: new for new, old in enumerate(old_nodes)}
        succ = [sorted({renumber[m] for m in g.successors(old, settings) if m in renumber})
                for old in old_nodes]
        paths = [g.paths[o] for o in old_nodes]
        index = {p: i for i, p in enumerate(paths)}
        roots = sorted(renumber[r] for r in set(root_nodes) if r in renumber)
        size = (lambda o: sizes.get(o, 0)) if sizes is not None else (lambda o: int(g.sizes[o]))
        return cls(paths, [size(o) for o in old_nodes], succ, roots, index)


    def predecessors(self) -> list[list[int]]:
        pred: list[list[int]] = [[] for _ in self.paths]
        for a, bs in enumerate(self.succ):
            for b in bs:
                pred[b].append(a)
        return pred

    # -- why -----------------------------------------------------------------

    def chains_to(self, target: int, all_roots: bool) -> list[list[int]]:
        """Shortest chains root -> ... -> target.  One (the shortest from any
        root) or, with all_roots, the shortest from each root that reaches it."""
        # BFS backwards from the target: next_hop[n] is n's successor on a
        # shortest path from n to the target.
        pred = self.predecessors()
        next_hop = {target: target}
        queue = deque([target])
        order = [target]
        while queue:
            n = queue.popleft()
            for p in pred[n]:
                if p not in next_hop:
                    next_hop[p] = n
                    queue.append(p)
                    order.append(p)
        root_set = set(self.roots)
        reached = [n for n in order if n in root_set]  # by distance, nearest first
        if not all_roots:
            reached = reached[:1]
        chains = []
        for r in reached:
            chain = [r]
            while chain[-1] != target:
                chain.append(next_hop[chain[-1]])
            chains.append(chain)
        return chains

    # -- cost ----------------------------------------------------------------

    def root_costs(self) -> dict[int, tuple[int, int]]:
        """For each root node: (bytes, paths) that would become garbage if
        only that root went away.  Dominator tree (Cooper, Harvey, Kennedy)
        over the graph with a virtual super-root feeding every root."""
        n = len(self.paths)
        sup = n  # the super-root's index in the arrays below
        succ = self.succ + [list(self.roots)]
        # Iterative DFS postorder from the super-root.
        post = [-1] * (n + 1)
        order: list[int] = []
        visited = [False] * (n + 1)
        stack = [(sup, 0)]
        visited[sup] = True
        while stack:
            node, i = stack[-1]
            if i < len(succ[node]):
                stack[-1] = (node, i + 1)
                nxt = succ[node][i]
                if not visited[nxt]:
                    visited[nxt] = True
                    stack.append((nxt, 0))
            else:
                stack.pop()
                post[node] = len(order)
                order.append(node)
        pred: list[list[int]] = [[] for _ in range(n + 1)]
        for a, bs in enumerate(succ):
            for b in bs:
                pred[b].append(a)
        idom = [-1] * (n + 1)
        idom[sup] = sup
        rpo = order[::-1]

        def intersect(a: int, b: int) -> int:
            while a != b:
                while post[a] < post[b]:
                    a = idom[a]
                while post[b] < post[a]:
                    b = idom[b]
            return a

        changed = True
        while changed:
            changed = False
            for b in rpo[1:]:
                new = -1
                for p in pred[b]:
                    if idom[p] != -1:
                        new = p if new == -1 else intersect(p, new)
                if idom[b] != new:
                    idom[b] = new
                    changed = True
        # Subtree weights, children before parents (postorder).
        weight = [0] * (n + 1)
        count = [0] * (n + 1)
        for node in order:
            if node == sup:
                continue
            weight[node] += self.sizes[node]
            count[node] += 1
            parent = idom[node]
            weight[parent] += weight[node]
            count[parent] += count[node]

        def dominates(a: int, b: int) -> bool:
            while b != sup:
                if b == a:
                    return True
                b = idom[b]
            return a == sup

        out = {}
        for r in self.roots:
            # Freed only if every other way to r passes through r itself.
            sole = idom[r] == sup and all(p == sup or dominates(r, p) for p in pred[r])
            out[r] = (weight[r], count[r]) if sole else (0, 0)
        return out
