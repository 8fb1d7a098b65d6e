"""The store's reference graph, from the Nix DB, and liveness over it.

Liveness is computed from SQLite a level at a time (Snapshot.live_closure),
walking only the live part of the graph (on a 100k-path store about 20k
paths), instead of Nix 2.8's referrer search with one query per store
entry.  The edges are exactly those of Nix's computeFSClosure as the GC
uses it:

- every reference (Refs);
- keep-derivations (default on): a path keeps its deriver, if that .drv is
  valid (ValidPaths.deriver);
- keep-outputs (default off): a .drv keeps its valid outputs
  (DerivationOutputs).

With ca-derivations on and rows in Realisations, Nix also finds outputs
there, which takes reading derivation files: then the in-memory graph
(daemon/graph.py, daemon/derivation.py) answers, never these queries.

Every query of one analysis runs inside one read transaction, so it sees
one consistent snapshot of the DB even while Nix writes to it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from gcroots import log
from gcroots.layout import StoreLayout
from gcroots.nixdb import connect_ro, is_immutable, ro_uri

from .nixconf import GCSettings

_log = log.get("gcroots.store")

if TYPE_CHECKING:
    from .graph import StoreGraph

_TOP = "\U0010ffff"  # sorts after every byte a store path can hold
MMAP_MAX = 128 << 20  # see StoreDB.one_shot


# One level of the live closure (Snapshot.live_closure), each query over the
# level's ids (a JSON array): their paths, and with keep-derivations their
# derivers -- Nix keeps a .drv for an output that names it as deriver *and*
# that the .drv lists among its outputs (the reverse edge below) -- read
# from the same row;
_LEVEL_PATHS = ("SELECT group_concat({path}, char(0)), NULL FROM json_each(?) j "
                "JOIN ValidPaths v ON v.id = j.value")
_LEVEL_PATHS_DERIVERS = (
    "SELECT group_concat({path}, char(0)), group_concat(d.id) FROM json_each(?) j "
    "JOIN ValidPaths v ON v.id = j.value "
    "LEFT JOIN ValidPaths d ON d.path = v.deriver AND EXISTS "
    "(SELECT 1 FROM DerivationOutputs x WHERE x.drv = d.id AND x.path = v.path)")
# their references;
# (Only integers: a reference of another type, in a damaged DB, is no
# ValidPaths id -- as the recursive query found -- and no int() either.)
_LEVEL_REFS = ("SELECT group_concat(r.reference) FROM json_each(?) j "
               "JOIN Refs r ON r.referrer = j.value WHERE typeof(r.reference) = 'integer'")
# with keep-outputs, a .drv's valid outputs.
_LEVEL_OUTPUTS = ("SELECT group_concat(o.id) FROM json_each(?) j "
                  "JOIN DerivationOutputs x ON x.drv = j.value JOIN ValidPaths o ON o.path = x.path")


def _reverse_edges(settings: GCSettings) -> str:
    """The edges Nix's referrer search follows (the reverse of the above;
    for keep-derivations Nix checks the output's deriver names this drv)."""
    terms = ["SELECT r.referrer FROM Refs r JOIN dead ON r.reference = dead.id"]
    if settings.keep_derivations:
        terms.append("SELECT o.id FROM dead JOIN ValidPaths v ON v.id = dead.id "
                     "JOIN DerivationOutputs x ON x.drv = dead.id "
                     "JOIN ValidPaths o ON o.path = x.path AND o.deriver = v.path")
    if settings.keep_outputs:
        terms.append("SELECT x.drv FROM dead JOIN ValidPaths v ON v.id = dead.id "
                     "JOIN DerivationOutputs x ON x.path = v.path")
    return "\nUNION\n".join(terms)


def _name_after(prefix: bytes) -> str:
    """SQL for what follows `prefix` in v.path, as bytes; NULL if it does
    not start with it."""
    n = len(prefix)
    return (f"CASE WHEN substr(CAST(v.path AS BLOB), 1, {n}) = X'{prefix.hex()}' "
            f"THEN substr(CAST(v.path AS BLOB), {n + 1}) END")


def _text(paths: Iterable[bytes]) -> str:
    """The paths as one JSON array for json_each().  Store paths are ASCII;
    a DB row that is not even UTF-8 (only a damaged or hand-edited DB has
    one) cannot be carried this way and is left out.  Live closures start
    from parsed roots (ASCII) and follow ids inside SQLite, so they are never
    cut short by this; what can miss such a row is sizes and listings."""
    out = []
    for p in paths:
        try:
            out.append(p.decode())
        except UnicodeDecodeError:
            _log.warning("db_path_not_utf8", path=p)
    return json.dumps(out)


@dataclass
class StoreDB:
    layout: StoreLayout
    conn: sqlite3.Connection
    _graph: "StoreGraph | None" = None
    _graph_lock: threading.Lock = field(default_factory=threading.Lock)
    unconfirmed: "StoreGraph | None" = None   # see cached_graph
    twin: "StoreDB | None" = None             # see Snapshot.on_twin
    _counters: "list[sqlite3.Connection]" = field(default_factory=list)  # see counts_ahead
    stamp: "tuple[int, ...] | None" = None    # the file before opened immutable: see changed()

    @classmethod
    def open(cls, layout: StoreLayout, *, create_files: bool = True,
             twin: bool = False) -> "StoreDB":
        """`twin`: with a second connection, opened the same way (the same
        URI), for another thread to read a snapshot's state (Snapshot.on_twin).
        A DB opened `immutable` (no -wal: see gcroots.nixdb) is read without
        locks, its commits unseen: see changed()."""
        # No mmap_size: it makes the live walk ~15% faster, but each page it
        # touches counts in our resident memory (a million paths: 700 MB).
        try:   # before ro_uri looks for a -wal: a writer that starts later changes it
            stamp = _file_stamp(layout.db_path)
        except OSError:
            stamp = ()   # (then ro_uri says why, or changed() is always True)
        uri = ro_uri(layout.db_path, create_files=create_files)
        db = cls(layout, connect_ro(layout.db_path, uri=uri))
        if is_immutable(uri):
            db.stamp = stamp
        if twin:
            try:
                db.twin = cls(layout, connect_ro(layout.db_path, uri=uri))
            except BaseException:
                db.close()
                raise
        return db

    def changed(self) -> bool:
        """Opened `immutable` (no locks, no commit seen: gcroots.nixdb),
        has the file changed since just before it was opened -- a Nix
        process that started meanwhile checkpointed its commits into it --
        so that what was read may mix two states?  Checked after reading:
        an answer is good only if not.  (Its mtime and ctime: a stat makes
        the kernel's next change of them fine-grained.)  Always False when
        SQLite's locks keep each snapshot consistent."""
        if self.stamp is None:
            return False
        try:
            return _file_stamp(self.layout.db_path) != self.stamp
        except OSError:
            return True

    def close(self) -> None:
        if self.twin is not None:
            self.twin.close()
        self.conn.close()
        for c in self._counters:
            c.close()

    def one_shot(self) -> None:
        """For a process that answers once and exits (--standalone).
        SQLite's default 2 MB page cache rereads pages during the live walk;
        32 MB makes it ~15% faster.  A DB of at most MMAP_MAX is read through
        a memory map: no copy of each page into the cache (the walk ~10%
        faster again), and those pages count in our resident memory only up
        to that (a million paths' DB, ~640 MB, is read as before).  The
        twin reads each page once: SQLite's default cache."""
        self.conn.execute("PRAGMA cache_size = -32768")
        if os.stat(self.layout.db_path).st_size <= MMAP_MAX:
            for db in (self, self.twin) if self.twin is not None else (self,):
                db.conn.execute(f"PRAGMA mmap_size = {MMAP_MAX}")

    def snapshot(self) -> "Snapshot":
        return Snapshot(self)

    def data_version(self) -> int:
        """Changes whenever another connection commits (cache invalidation)."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def cached_graph(self, ca: bool = False, *, check_later: bool = False) -> "StoreGraph | None":
        """The in-memory graph brought up to date with the DB by the rows
        added since (StoreGraph.follow), or None if that takes a full load
        (call inside a snapshot, so that it matches the snapshot too).
        `check_later`: a followed graph is returned before its row counts
        are checked (the slowest part; another thread can make the answer
        meanwhile) and kept only once confirm(), in the same snapshot,
        says it may be used; `unconfirmed` is it, until then."""
        with self._graph_lock:
            g = self._graph
            if g is None or g.ca != ca:
                return None
            from .graph import Stale
            from .derivation import realised_outputs
            try:
                followed = g.follow(self.conn, self.data_version(),
                                    lambda above: realised_outputs(self.conn, self.layout, above),
                                    check_later=check_later)
            except Stale as e:
                _log.info("graph_stale", reason=str(e))
                followed = None
            if check_later and followed is not None and followed is not g:
                self.unconfirmed = followed
            else:
                self._graph = followed
            return followed

    def counts_ahead(self, ca: bool = False) -> "CountsAhead | None":
        """If the DB changed since the graph looked (so that an analysis
        will follow it and must count rows to confirm it): a CountsAhead on
        a connection of its own.  Call outside a transaction, right before
        snapshot(); then CountsAhead.start() inside it."""
        g = self._graph
        if g is None or g.ca != ca or self.data_version() == g.version:
            return None
        while len(self._counters) < 2:
            self._counters.append(connect_ro(self.layout.db_path))
        return CountsAhead(self._counters)

    def confirm(self, g: "StoreGraph",
                counted: "Callable[[], tuple[int, int, int] | None] | None" = None) -> bool:
        """Whether `g` (cached_graph(check_later=True)'s) matches the DB's
        row counts: then it is the graph kept, else none is (a full load
        follows).  `counted`: CountsAhead.result, if counting started
        early; when it has no counts of this snapshot, they are made here."""
        from .graph import Stale
        try:
            g.check_counts(self.conn, counted() if counted is not None else None)
        except Stale as e:
            _log.info("graph_stale", reason=str(e))
            g = None
        with self._graph_lock:
            self._graph, self.unconfirmed = g, None
        return g is not None

    def load_graph(self, ca: bool = False) -> "StoreGraph":
        """Read the whole graph (inside a snapshot) and keep it; with `ca`
        (ca-derivations on) the outputs found through Realisations too."""
        from .derivation import realised_outputs
        from .graph import StoreGraph
        pairs = realised_outputs(self.conn, self.layout) if ca else None
        graph = StoreGraph.load(self.conn, self.data_version(), pairs)
        graph.paths.ranks([])  # its keys, made now: not in the first answer after a change
        with self._graph_lock:
            self._graph = graph
        # Long-lived objects: keep the cyclic GC from walking them on every
        # collection of young objects.
        gc.freeze()
        return_free_memory()
        return graph

    def forget(self, ids: Iterable[int], realisations: int = 0) -> None:
        """Our collection invalidated these ValidPaths ids, and with them
        `realisations` rows of Realisations (committed)."""
        with self._graph_lock:
            if self._graph is not None:
                self._graph = self._graph.forget(ids, realisations)

    def has_realisations(self) -> bool:
        try:
            return self.conn.execute("SELECT 1 FROM Realisations LIMIT 1").fetchone() is not None
        except sqlite3.OperationalError:  # no such table
            return False


class CountsAhead:
    """The row counts that confirm a followed graph (StoreGraph.check_counts,
    the slowest part of following: every page of three b-trees), made on
    two connections of their own from the moment the analysis's snapshot
    begins, in two threads (ValidPaths on one, Refs and DerivationOutputs
    on the other: SQLite reads pages without the GIL), while the
    analysis's connection validates roots and follows the graph.

    They must be counts of that very snapshot, which SQLite cannot share
    between connections; so each one notes its PRAGMA data_version before
    the snapshot begins (`__init__`) and again once its own read
    transaction began after it (`start`): equal, no commit happened in
    between and it sees the same DB; else (a commit in those microseconds)
    there are no counts, and confirm() counts on the snapshot's own
    connection."""

    def __init__(self, conns: "list[sqlite3.Connection]") -> None:
        self.conns = conns
        self.before = [c.execute("PRAGMA data_version").fetchone()[0] for c in conns]
        self._threads: list[threading.Thread] = []
        self._parts: dict[int, tuple] = {}

    def start(self) -> None:
        """Call inside the analysis's snapshot."""
        from .graph import COUNT_EDGES, COUNT_PATHS
        begun, same = [], False
        try:
            for c, before in zip(self.conns, self.before):
                if c.in_transaction:  # left so by a failure: not this snapshot's
                    c.execute("ROLLBACK")
                c.execute("BEGIN")
                begun.append(c)
                if c.execute("PRAGMA data_version").fetchone()[0] != before:
                    break
            else:
                same = len(begun) == 2
        except sqlite3.Error as e:  # then confirm() counts on the snapshot's connection
            _log.warning("db_count_failed", error=str(e))
        if not same:  # not both of them see this snapshot
            for c in begun:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("COMMIT")
            return

        def run(i: int, c: sqlite3.Connection, query: str) -> None:
            try:
                self._parts[i] = tuple(c.execute(f"SELECT {query}").fetchone())
            except sqlite3.Error as e:
                _log.warning("db_count_failed", error=str(e))
            finally:
                c.execute("COMMIT")
        for i, (c, query) in enumerate(zip(self.conns, (COUNT_PATHS, COUNT_EDGES))):
            t = threading.Thread(target=run, args=(i, c, query), name="gcroots-count", daemon=True)
            t.start()
            self._threads.append(t)

    def result(self) -> tuple[int, int, int] | None:
        """The counts, or None; waits for them (call before the connections
        are used again, whatever happened)."""
        for t in self._threads:
            t.join()
        self._threads = []
        if len(self._parts) != 2:
            return None
        return self._parts[0] + self._parts[1]  # type: ignore[return-value]


class Snapshot:
    """A read transaction: `with db.snapshot() as snap: ...`."""

    def __init__(self, db: StoreDB) -> None:
        self.db = db
        self.c = db.conn
        self._twin_mark: int | None = None

    def __enter__(self) -> "Snapshot":
        if self.db.twin is not None:  # see on_twin
            self._twin_mark = self.db.twin.data_version()
        self.c.execute("BEGIN")
        # A deferred transaction takes its snapshot at the first read.
        self.c.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return self

    def __exit__(self, *exc) -> None:
        self.c.execute("COMMIT")

    @contextlib.contextmanager
    def on_twin(self) -> Iterator["Snapshot | None"]:
        """This snapshot's state of the DB, read on the twin connection (so
        that another thread reads it while this connection works): a read
        transaction there, begun after this one began, and used only if no
        commit came between -- the twin's data_version inside it is the
        one it read just before this one began (a DB opened immutable,
        whose data_version never moves: its file is unchanged, see
        StoreDB.changed).  None: no twin, or a commit came between (read on
        this connection instead).  Call it while this snapshot is open."""
        twin = self.db.twin
        if twin is None or self._twin_mark is None:
            yield None
            return
        with twin.snapshot() as other:
            same = twin.data_version() == self._twin_mark and not self.db.changed()
            yield other if same else None

    def valid_among(self, paths: Iterable[bytes]) -> set[bytes]:
        return set(self.valid_ids(paths))

    def valid_ids(self, paths: Iterable[bytes]) -> dict[bytes, int]:
        """path -> ValidPaths.id of those of `paths` that are valid."""
        rows = self.c.execute("SELECT v.path, v.id FROM json_each(?) j "
                              "JOIN ValidPaths v ON v.path = j.value", (_text(paths),))
        return dict(rows)

    def valid_with_hash(self, store_dir: bytes, hashes: Iterable[bytes]) -> dict[bytes, int]:
        """path -> id of the valid paths whose hash part is one of `hashes`
        (temp roots)."""
        out: dict[bytes, int] = {}
        for h in hashes:
            prefix = (store_dir + b"/" + h).decode("ascii")
            out.update(self.c.execute("SELECT path, id FROM ValidPaths WHERE path >= ? AND path < ?",
                                      (prefix, prefix + _TOP)))
        return out

    def live_closure(self, root_ids: Iterable[int], settings: GCSettings, *,
                     names_after: bytes | None = None) -> set[bytes]:
        """Closure of the roots (ValidPaths ids, from valid_ids in this
        snapshot) over the GC's edges, as paths; with `names_after` (the
        store dir and "/"), as the names that follow it (compared as
        bytes; a valid path elsewhere, which only a hand-made DB holds,
        names no entry: left out).  Breadth-first, a level
        at a time: a few queries per level (~11 levels on a generated
        store), each a join over the level's ids, and the ids seen kept
        here.  A third faster than one recursive query (its queue and
        its UNION's index of every row, and the paths looked up again at
        the end): 62 ms instead of 95 ms of CPU at 100k paths."""
        seen = set(root_ids)
        level = list(seen)
        paths = []
        ends = (_LEVEL_PATHS_DERIVERS if settings.keep_derivations else _LEVEL_PATHS).format(
            path="v.path" if names_after is None else _name_after(names_after))
        terms = [_LEVEL_REFS, _LEVEL_OUTPUTS] if settings.keep_outputs else [_LEVEL_REFS]
        while level:
            ids = json.dumps(level)
            found, derivers = self.c.execute(ends, (ids,)).fetchone()
            if found is not None:
                paths.append(found)
            reached = [derivers] + [self.c.execute(q, (ids,)).fetchone()[0] for q in terms]
            new = set()
            for text in reached:
                if text is not None:
                    new.update(map(int, text.split(b",")))
            new -= seen
            seen |= new
            level = list(new)
        return set(b"\0".join(paths).split(b"\0")) if paths else set()

    def referrer_closure(self, start_ids: Iterable[int], settings: GCSettings) -> set[bytes]:
        """What Nix's referrer search visits from `start_ids`, as paths."""
        return self._closure(start_ids, "dead", _reverse_edges(settings))

    def _closure(self, start_ids: Iterable[int], name: str, edges: str) -> set[bytes]:
        # One NUL-separated value (no path holds a NUL): no row object per path.
        query = f"""
            WITH RECURSIVE {name}(id) AS (
                SELECT value FROM json_each(?)
                UNION
                {edges}
            )
            SELECT group_concat(v.path, char(0)) FROM {name} JOIN ValidPaths v ON v.id = {name}.id"""
        text = self.c.execute(query, (json.dumps(list(start_ids)),)).fetchone()[0]
        return set(text.split(b"\0")) if text else set()

    def sorted_valid_pages(self, size: int = 4096) -> Iterator[bytes]:
        """Every valid path in the store dir, sorted, each NUL-terminated, in
        pages of `size` (one value each: no object per path).  Small pages
        (~250 kB) reuse the same memory: 65,536 paths a page (~4 MB, made
        twice, by SQLite and as bytes) cost ~7,500 page faults more at 100k
        paths, 28 ms of CPU instead of 43 to compare them with the store's
        entries."""
        last = self.db.layout.store_dir + b"/"
        top = last + _TOP.encode()
        while True:
            (page,) = self.c.execute(  # the last path found here, not by max(): 40% faster
                "SELECT group_concat(path, char(0)) || char(0) FROM (SELECT path "
                "FROM ValidPaths WHERE path > CAST(? AS TEXT) AND path < CAST(? AS TEXT) "
                "ORDER BY path LIMIT ?)", (last, top, size)).fetchone()
            if page is None:
                return
            last = page[page.rfind(b"\0", 0, -1) + 1:-1]
            yield page

    def nar_sizes(self, paths: Iterable[bytes]) -> dict[bytes, int]:
        rows = self.c.execute("SELECT v.path, v.narSize FROM json_each(?) j "
                              "JOIN ValidPaths v ON v.path = j.value", (_text(paths),))
        return {p: n or 0 for p, n in rows}

    def nar_sizes_of_ids(self, ids: Iterable[int]) -> dict[int, int]:
        rows = self.c.execute("SELECT v.id, v.narSize FROM json_each(?) j "
                              "JOIN ValidPaths v ON v.id = j.value", (json.dumps(list(ids)),))
        return {i: n or 0 for i, n in rows}


def _file_stamp(path: bytes) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def return_free_memory() -> None:
    """Give the pages malloc holds free back to the kernel.  A graph's load
    and each analysis allocate and free hundreds of MB of temporaries
    (SQLite's text values, numpy's intermediate arrays); glibc keeps much
    of that in its heap, resident, until trimmed (at a million paths,
    ~150 MB of gcrootsd's ~420 MB after answering)."""
    _glibc_malloc("malloc_trim", 0)


def one_malloc_arena() -> None:
    """glibc's malloc in one arena (M_ARENA_MAX 1), for gcrootsd: call
    before any thread starts.  By default each thread that allocates gets
    an arena of its own, and what one frees only it reuses; the graph's
    load, the analyses and the row counts run in threads, so at a million
    paths a reload left ~45 MiB of freed pages resident, scattered across
    four arenas where no trim can give them back (301 MiB after a reload
    and an answer; one arena: ~260).  Python objects are pymalloc's, not
    malloc's: the threads share malloc's lock only for numpy's arrays and
    SQLite's pages."""
    _glibc_malloc("mallopt", M_ARENA_MAX, 1)


M_ARENA_MAX = -8  # glibc's malloc.h


def _glibc_malloc(name: str, *args: int) -> None:
    """glibc's malloc function `name`, called; nothing where there is none."""
    import ctypes
    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


def list_store(real_store_dir: bytes) -> list[bytes]:
    """Names in the store dir, except `.links` (Nix skips it)."""
    return [n for n in os.listdir(real_store_dir) if n != b".links"]
