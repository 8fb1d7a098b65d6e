"""From a complete root set to answers.  Synchronous and transport-free: the
daemon runs it in a worker thread, `gcroots-query --standalone` in-process.

One analysis = the helper's roots + temp roots, validated against one DB
snapshot, their closure, and (when asked) the dead set, computed as Nix 2.8's
GC computes it:

- dead = every entry of the store dir but `.links` that is not live: junk
  names and unregistered paths included, plus valid paths absent from disk
  that Nix's referrer search reaches from a dead entry;
- an entry whose hash part is a temp root's is alive, registered or not.

Queries never modify anything.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import os
import pwd
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from gcroots.layout import StoreLayout
from gcroots.protocol.admin import PATHS_PAYLOAD
from gcroots.protocol.rootstream import Root, RootKind, ScanWarning, StaleLink
from gcroots.storepath import is_store_basename

from .storepaths import HASH_LEN, hash_part, parse_store_path

from .nixconf import GCSettings
from .store import CountsAhead, Snapshot, StoreDB, list_store
from .temproots import TempRoots, UnreadableTempRoots, read_temp_roots

T = TypeVar("T")

if TYPE_CHECKING:  # numpy and the graph are imported when a graph is used:
    import numpy as np  # a one-shot `--standalone dead` never needs them

    from .graph import LiveGraph, StoreGraph
    from .listing import StoreListing

CENSORED = b"{censored}"
PIECE = PATHS_PAYLOAD
_PRIVATE_KINDS = (RootKind.RUNTIME, RootKind.TEMP)


class IncompleteRoots(Exception):
    """No complete root set: nothing may be decided from what we have."""


# Only the helper's own ending (scan._blame): the message before it quotes
# paths and link targets that any user chooses.
_OWNER = re.compile(r"belongs to uid (\d+)(?=, who \(or root\) must [^;]+$)")


def scan_error(message: str) -> tuple[str, str]:
    """A failed scan's message with the blocking entry's owner named (the
    helper's sandbox cannot read the user database and says "uid N"), and
    that owner ("" if the message names none)."""
    m = _OWNER.search(message)
    if m is None:
        return message, ""
    try:
        owner = pwd.getpwuid(int(m[1])).pw_name
    except (KeyError, OverflowError):
        owner = f"uid {m[1]}"
    return message[:m.start()] + f"belongs to {owner} (uid {m[1]})" + message[m.end():], owner


@dataclass
class RootSet:
    """A *complete* root set (the stream's trailer checked out)."""
    roots: list[Root]
    stale: list[StaleLink] = field(default_factory=list)
    warnings: list[ScanWarning] = field(default_factory=list)
    scan_seconds: float = 0.0

    @classmethod
    def from_records(cls, records, layout: StoreLayout, scan_seconds: float = 0.0) -> "RootSet":
        """Re-validate what the helper sent: every store path must parse
        under our store dir.  One bad record rejects the whole set."""
        out = cls([], scan_seconds=scan_seconds)
        for rec in records:
            if isinstance(rec, Root):
                if parse_store_path(rec.store_path, layout.store_dir) != rec.store_path:
                    raise IncompleteRoots(
                        f"the helper sent a root that is not a store path of "
                        f"{layout.store_dir.decode()}: {rec.store_path[:300]!r}")
                out.roots.append(rec)
            elif isinstance(rec, StaleLink):
                out.stale.append(rec)
            elif isinstance(rec, ScanWarning):
                out.warnings.append(rec)
        return out


def store_graph(db: StoreDB, settings: GCSettings) -> StoreGraph:
    """The in-memory graph, cached or read now (call inside a snapshot)."""
    from .derivation import DerivationError
    try:
        return (db.cached_graph(settings.follows_realisations)
                or db.load_graph(settings.follows_realisations))
    except DerivationError as e:  # Nix's collector stops there too
        raise IncompleteRoots(f"cannot follow the Realisations of ca-derivations: {e}") from None


def scan_in_process(layout: StoreLayout, *, runtime: bool = True) -> RootSet:
    """--standalone: the helper's scan, in this process and with its rights.
    As root, with the helper's checks (capabilities, hidden dirs, EACCES
    fails); otherwise the caller chose a partial scan (--allow-unprivileged-scan,
    or an answer that deletes nothing): EACCES skipped, as Nix does."""
    from gcroots.helper.prepare import hidden_dirs, preflight
    from gcroots.helper.scan import ScanError, Scanner

    t0 = time.perf_counter()
    full = os.geteuid() == 0
    try:
        records = list(Scanner(layout, runtime=runtime,
                               preflight=preflight(hidden_dirs(scanned=(layout.gcroots_dir, layout.profiles_dir)),
                                                   caps=full, runtime=runtime),
                               accept_unreadable=() if full else (b"/",)).scan())
    except ScanError as e:
        raise IncompleteRoots(f"the root scan failed: {scan_error(str(e))[0]}") from None
    return RootSet.from_records(records, layout, time.perf_counter() - t0)


@dataclass
class Analysis:
    """One analysis.  The live and dead sets are kept as the in-memory
    graph's node masks when it was current (gcrootsd, a collection), else
    as sets of paths from SQLite (`--standalone` queries, gcrootsd while it
    loads the graph); the properties give paths either way."""
    layout: StoreLayout
    settings: GCSettings
    roots: list[tuple[RootKind, bytes, bytes]]     # (kind, label, store path): valid + temp
    root_paths: set[bytes]                          # valid paths that are roots
    temp: TempRoots
    rootset: RootSet
    timings: dict[str, float] = field(default_factory=dict)
    graph: StoreGraph | None = None                 # the in-memory graph, if it was current
    hash_roots: list[tuple[RootKind, bytes, bytes]] = field(default_factory=list)
    root_nodes: "np.ndarray | None" = None          # with a graph: the roots' nodes
    live_mask: "np.ndarray | None" = None           # ... and the live nodes
    dead_mask: "np.ndarray | None" = None           # ... the dead valid ones
    dead_extra: list[bytes] = field(default_factory=list)  # ... dead entries no valid path, sorted
    store_entries: int = 0
    valid_paths: int = 0
    computed_dead: bool = False
    _live: set[bytes] | None = None                 # without a graph: the paths
    _live_names: set[bytes] | None = None           # ... or their names in the store dir
    _dead: list[bytes] | None = None
    _dead_names: list[bytes] | None = None         # without a graph: the dead names, sorted
    _dead_valid: set[bytes] | None = None
    _live_unregistered: set[bytes] | None = None
    _db: StoreDB | None = None
    _frames: dict = field(default_factory=dict)     # see path_frames

    @property
    def live(self) -> set[bytes]:
        """The closure of the roots (valid paths)."""
        if self._live is None and self._live_names is not None:
            prefix = self.layout.store_dir + b"/"
            self._live = {prefix + n for n in self._live_names}
        elif self._live is None:
            import numpy as np  # only here: a one-shot --standalone query never loads it
            self._live = {self.graph.paths[n] for n in np.flatnonzero(self.live_mask)}
        return self._live

    @property
    def live_unregistered(self) -> set[bytes]:
        """Entries on disk, not valid, whose hash part is a temp root's:
        alive too (a build in progress writes its outputs before
        registering them).  Known after the dead set, or from gcrootsd's
        listing; else listed now."""
        if self._live_unregistered is None:
            names = list_store(self.layout.real_store_dir) if self.temp.hashes else []
            prefix = self.layout.store_dir + b"/"
            _split_temp(self, (prefix + n for n in names if n[:HASH_LEN] in self.temp.hashes))
            self._live_unregistered -= self.live
        return self._live_unregistered

    @property
    def dead(self) -> list[bytes] | None:
        """Sorted; None if not computed."""
        if not self.computed_dead:
            return None
        if self._dead is None:
            joined = b"".join(path_chunks(self, "dead"))
            self._dead = joined.split(b"\0")[:-1] if joined else []
        return self._dead

    def dead_count(self) -> int | None:
        if not self.computed_dead:
            return None
        if self._dead is None and self.dead_mask is not None:
            return int(self.dead_mask.sum()) + len(self.dead_extra)
        return len(self._dead_names) if self._dead is None else len(self._dead)

    @property
    def dead_valid(self) -> set[bytes]:
        """The dead paths that are registered (computed when first asked)."""
        if self._dead_valid is None:
            if self.dead_mask is not None:
                import numpy as np
                g = self.graph
                self._dead_valid = {g.paths[n] for n in np.flatnonzero(self.dead_mask)}
            elif self.dead:
                with self._db.snapshot() as snap:
                    self._dead_valid = snap.valid_among(self.dead)
            else:
                self._dead_valid = set()
        return self._dead_valid

    @property
    def all_live(self) -> set[bytes]:
        return self.live | self.live_unregistered

    def live_count(self) -> int:
        if self._live is None and self.live_mask is not None:
            return int(self.live_mask.sum()) + len(self.live_unregistered)
        return len(self.all_live)

    def labels_by_path(self, censor: bool) -> dict[bytes, list[bytes]]:
        out: dict[bytes, set[bytes]] = defaultdict(set)
        for kind, label, path in self.roots + self.hash_roots:
            out[path].add(CENSORED if censor and kind in _PRIVATE_KINDS else label)
        return {p: sorted(ls) for p, ls in out.items()}


def _frame_starts(sizes: "np.ndarray", limit: int) -> "np.ndarray":
    """Where frames start in a sequence of items of `sizes` bytes, so that
    none holds more than `limit`: an item starts a new frame when its start
    crosses a multiple of (limit - the largest item)."""
    import numpy as np
    if not len(sizes):
        return np.zeros(0, dtype=np.int64)
    step = limit - int(sizes.max())
    frame = (np.cumsum(sizes) - sizes) // step
    return np.flatnonzero(np.diff(frame, prepend=-1))


def _packed(paths: list[bytes], limit: int = PIECE, prefix: bytes = b"") -> list[tuple[list, int]]:
    """Sorted paths (`prefix` + each of `paths`), NUL-terminated, as frames
    (one piece each).  Without numpy: a one-shot --standalone query never
    loads it; each frame's end found by bisection over the running sum of
    the lengths, not by a loop over the paths."""
    each = len(prefix) + 1
    sums = list(itertools.accumulate(map(len, paths)))
    glue = b"\0" + prefix
    frames: list[tuple[list, int]] = []
    lo = used = 0
    while lo < len(paths):
        hi = max(lo + 1, bisect.bisect_right(range(len(paths)), used + limit, lo,
                                             key=lambda i: sums[i] + (i + 1) * each))
        frames.append(([prefix + glue.join(paths[lo:hi]) + b"\0"], hi - lo))
        lo, used = hi, sums[hi - 1] + hi * each
    return frames


def _merged_frames(g: StoreGraph, mask: "np.ndarray", extra: list[bytes],
                   limit: int = PIECE) -> list[tuple[list, int]]:
    """The paths of the nodes in `mask` and of `extra`, sorted and merged,
    NUL-terminated, as frames of at most `limit` bytes: (pieces, paths in
    them).  A piece is a view of the path table -- a run of paths that sort
    together, cut where a frame ends -- or one path of `extra` or added
    since the load.  Found with array operations: at 1M paths the answer
    is ~50k runs."""
    return _frames_and_keys(g, mask, extra, limit)[0]


def _filled(limit: int, largest: int) -> int:
    """How full a frame of the graph's answers is made: three quarters of
    `limit`, so that the paths a build adds later (_merge_into) mostly fit
    in the frame they sort into.  Cut full, nearly every frame a path went
    to had to be cut in two, and round after round the answer became ever
    more, ever smaller frames (~5,000 of them after a dozen builds at a
    million paths, ~60 ms to merge)."""
    return max(limit - limit // 4, min(limit, 2 * largest))


# What _merge_into needs to find a path's place among a frame's pieces,
# per frame: (keys, first, last), a list each, one item per piece.  A run
# of the table's sorted positions first..last has the key 2 * first + 1;
# any other path (first = last = -1) 2 * its rank (the table's paths
# before it): keys ascend as the pieces do, others of one rank by path.
FrameKeys = list


def _frames_and_keys(g: StoreGraph, mask: "np.ndarray", extra: list[bytes],
                     limit: int = PIECE) -> tuple[list[tuple[list, int]], FrameKeys]:
    import numpy as np
    t = g.paths
    picked = np.flatnonzero(mask[:t.base][t.order])     # sorted positions
    # Paths added since the load, and entries no valid path: few; each
    # goes before the first picked path that sorts after it.
    others = sorted(extra + [t[n] for n in np.flatnonzero(mask[t.base:]) + t.base])
    ranks = t.ranks(others)
    before = np.searchsorted(picked, ranks)
    at = before.astype(np.int64) + np.arange(len(others))  # their indices among all items
    n = len(picked) + len(others)
    if not n:
        return [], []
    is_other = np.zeros(n, dtype=bool)
    is_other[at] = True
    pos = np.full(n, -1, dtype=np.int64)                 # sorted position; -1: an other
    pos[~is_other] = picked
    sizes = np.empty(n, dtype=np.int64)
    sizes[~is_other] = t.offsets[picked + 1] - t.offsets[picked]
    sizes[at] = [len(p) + 1 for p in others]
    new_frame = np.zeros(n, dtype=bool)
    new_frame[_frame_starts(sizes, _filled(limit, int(sizes.max())))] = True
    breaks = new_frame | is_other | (np.diff(pos, prepend=-3) != 1)
    breaks[1:] |= is_other[:-1]
    starts = np.flatnonzero(breaks)
    ends = np.append(starts[1:], n)
    first, last = pos[starts], pos[ends - 1]
    begin = np.where(first < 0, 0, t.offsets[first]).tolist()   # an other: its own bytes
    end = np.where(first < 0, 0, t.offsets[last + 1]).tolist()
    view, other_at = memoryview(t.blob), dict(zip(at.tolist(), others))
    pieces = [view[b:e] if e else other_at[lo] + b"\0"
              for lo, b, e in zip(starts.tolist(), begin, end)]
    cuts = np.flatnonzero(new_frame[starts])          # the pieces that start a frame
    counts = np.add.reduceat(ends - starts, cuts).tolist()
    bounds = cuts.tolist() + [len(pieces)]
    other_rank = np.zeros(n, dtype=np.int64)
    other_rank[at] = ranks
    keys = np.where(first < 0, 2 * other_rank[starts], 2 * first + 1).tolist()
    first, last = first.tolist(), last.tolist()
    frames = [(pieces[lo:hi], k) for lo, hi, k in zip(bounds, bounds[1:], counts)]
    return frames, [(keys[lo:hi], first[lo:hi], last[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


def _merge_into(g: StoreGraph, frames: list[tuple[list, int]], frame_keys: FrameKeys,
                paths: list[bytes], limit: int = PIECE) -> tuple[list[tuple[list, int]], FrameKeys]:
    """`frames` (and their keys) with `paths` (sorted, none in them) added
    in order: each frame a path goes to is made anew -- the run it falls
    in split in two views around it -- and cut again (_cut) if it outgrew
    the limit; the other frames are the same objects (a client may be
    sending them).  After a build's thousand paths at a million, ~10 ms
    instead of ~50 ms to make the whole answer again."""
    import numpy as np
    t = g.paths
    ranks = t.ranks(paths)
    starts = np.array([ks[0][0] for ks in frame_keys], dtype=np.int64)
    lo = np.searchsorted(starts, 2 * ranks, side="left")
    hi = np.searchsorted(starts, 2 * ranks, side="right")
    where = (hi - 1).tolist()
    for k in np.flatnonzero(hi > lo).tolist():  # frames that start with a path of its rank
        first_paths = [frames[j][0][0][:-1] for j in range(lo[k], hi[k])]
        where[k] = int(lo[k]) - 1 + bisect.bisect_left(first_paths, paths[k])
    where = [max(j, 0) for j in where]
    view, offsets = memoryview(t.blob), t._offset
    out_frames: list[tuple[list, int]] = []
    out_keys: FrameKeys = []
    done = 0
    for j, group in itertools.groupby(zip(where, paths, ranks.tolist()), key=lambda x: x[0]):
        out_frames += frames[done:j]
        out_keys += frame_keys[done:j]
        done = j + 1
        pieces = list(frames[j][0])
        count = frames[j][1]
        keys, first, last = (list(x) for x in frame_keys[j])
        for _, p, r in group:
            count += 1
            key = 2 * r
            i = bisect.bisect_left(keys, key)
            while i < len(keys) and keys[i] == key and pieces[i][:-1] < p:
                i += 1
            if i and first[i - 1] >= 0 and last[i - 1] >= r:  # inside the run before it
                a, b = first[i - 1], last[i - 1]
                pieces[i - 1:i] = [view[offsets[a]:offsets[r]], p + b"\0",
                                   view[offsets[r]:offsets[b + 1]]]
                keys[i - 1:i] = [2 * a + 1, key, 2 * r + 1]
                first[i - 1:i] = [a, -1, r]
                last[i - 1:i] = [r - 1, -1, b]
            else:
                pieces.insert(i, p + b"\0")
                keys.insert(i, key)
                first.insert(i, -1)
                last.insert(i, -1)
        if sum(map(len, pieces)) <= limit:
            out_frames.append((pieces, count))
            out_keys.append((keys, first, last))
        else:
            _cut(pieces, keys, first, last, view, offsets, limit, out_frames, out_keys)
    return out_frames + frames[done:], out_keys + frame_keys[done:]


def _cut(pieces: list, keys: list, first: list, last: list, view: memoryview, offsets,
         limit: int, out_frames: list, out_keys: list) -> None:
    """The pieces (with their keys), which hold more than `limit` bytes,
    as frames filled as _filled says, a run split between two where it
    does not fit, appended to the outs."""
    def count(lo: int, hi: int) -> int:
        return sum(1 if first[k] < 0 else last[k] - first[k] + 1 for k in range(lo, hi))
    limit = _filled(limit, 0)   # (a path longer than that goes alone)
    lo = used = 0
    i = 0
    while i < len(pieces):
        size = len(pieces[i])
        if used + size <= limit:
            used += size
            i += 1
            continue
        a, b = first[i], last[i]
        # The run's paths that still fit: the last start within the room left.
        fit = a if a < 0 else bisect.bisect_right(offsets, offsets[a] + limit - used, a, b + 2) - 1
        if i == lo and fit == a < b:  # not even its first path fits: that one alone
            fit += 1
        if a >= 0 and fit > a:   # a..fit-1 here, fit..b in the next frame
            pieces[i:i + 1] = [view[offsets[a]:offsets[fit]], view[offsets[fit]:offsets[b + 1]]]
            keys[i:i + 1] = [2 * a + 1, 2 * fit + 1]
            first[i:i + 1] = [a, fit]
            last[i:i + 1] = [fit - 1, b]
            i += 1
        elif i == lo:            # one path over the limit (none is): alone
            i += 1
        out_frames.append((pieces[lo:i], count(lo, i)))
        out_keys.append((keys[lo:i], first[lo:i], last[lo:i]))
        lo, used = i, 0
    if lo < len(pieces):   # (the last piece may have gone alone: nothing left)
        out_frames.append((pieces[lo:], count(lo, len(pieces))))
        out_keys.append((keys[lo:], first[lo:], last[lo:]))


def analyze(layout: StoreLayout, db: StoreDB, rootset: RootSet, settings: GCSettings,
            *, want_dead: bool = True,
            temp_files_at_lock: frozenset[tuple[bytes, int]] | None = None,
            listing: "StoreListing | None" = None, load: bool = False,
            names: "Callable[[], list[bytes]] | None" = None,
            answer: str | None = None, kept: dict | None = None,
            incremental: bool = False) -> Analysis:
    """`temp_files_at_lock`: see read_temp_roots (a collection's).  The
    in-memory graph is used when it is current (or, with `load`, read
    now); `listing` keeps the store dir's entries for it between calls.
    `names`: listing_in_thread(layout), started by the caller before its
    scan, for a dead set without the graph.  `answer` ("live"/"dead"): its
    frames made too (path_frames, with `kept`) -- while, after a change,
    another thread checks the DB's row counts for the followed graph; if
    they say it is stale, all of it is made again without it.
    `incremental`: the live set made from the graph's last one when it can
    be (StoreGraph.live_mark; gcrootsd's queries)."""
    t0 = time.perf_counter()
    timings = {"scan": rootset.scan_seconds}
    ahead = db.counts_ahead(settings.follows_realisations) if incremental else None
    with _joined(ahead), db.snapshot() as snap:
        if ahead is not None:
            ahead.start()
        try:
            temp = read_temp_roots(layout, temp_files_at_lock)
        except UnreadableTempRoots as e:
            raise IncompleteRoots(str(e)) from None
        temp_valid = snap.valid_with_hash(layout.store_dir, temp.hashes)
        # (Only then: what could fail is done before a followed graph waits
        # in db.unconfirmed for the confirm() below.)
        candidates = {r.store_path for r in rootset.roots}
        ca = settings.follows_realisations
        graph = db.cached_graph(ca, check_later=True)
        # With a graph (of this snapshot: a followed one is confirmed below,
        # or nothing made from it is kept), the roots are looked up in it: in
        # SQLite, after a commit by Nix, ~10 ms at a thousand roots.
        valid_roots = _valid_in(graph, candidates) if graph is not None else snap.valid_ids(candidates)
        roots = [(r.kind, r.label, r.store_path) for r in rootset.roots
                 if r.store_path in valid_roots]
        # Temp roots are listed even when not valid (Nix does), and so are
        # the valid paths that share a temp root's hash part.
        temp_labels = {}
        for label, path in temp.roots:
            roots.append((RootKind.TEMP, label, path))
            temp_labels[path[:len(layout.store_dir) + 1 + HASH_LEN]] = label
        # Valid paths that only share a temp root's hash part are alive but
        # not listed as roots (Nix lists the temp roots themselves).
        hash_roots = [(RootKind.TEMP, temp_labels.get(p[:len(layout.store_dir) + 1 + HASH_LEN],
                                                     b"{temp}"), p) for p in temp_valid]
        root_ids = {**valid_roots, **temp_valid}
        t1 = time.perf_counter()
        counted = ahead.result if ahead is not None else None
        confirmed = _in_thread(lambda: db.confirm(graph, counted)) \
            if graph is not None and graph is db.unconfirmed else lambda: True
        try:
            if graph is None and (load or ca and db.has_realisations()):
                graph = store_graph(db, settings)  # SQLite alone cannot follow Realisations
            a = Analysis(layout, settings, sorted(set(roots)), set(root_ids), temp, rootset,
                         timings, graph, hash_roots, _db=db)
            if graph is not None:  # warm: walk the live part in memory
                import numpy as np
                a.root_nodes = graph.nodes_of(np.fromiter(root_ids.values(), dtype=np.int64,
                                                          count=len(root_ids)))
                a.live_mask = (graph.live_mark(a.root_nodes, settings) if incremental
                               else graph.closure_mask(a.root_nodes, settings))
            else:                  # cold: let SQLite walk it
                # ... while a thread lists the store dir: SQLite's walk releases
                # the GIL (a third of `--standalone dead` at 100k paths).
                if want_dead and names is None:
                    names = listing_in_thread(layout)
                compared = _compared_in_thread(a, snap, names) if want_dead else None
                if want_dead:   # the dead set needs only their names (paths made if asked)
                    a._live_names = snap.live_closure(root_ids.values(), settings,
                                                      names_after=layout.store_dir + b"/")
                else:
                    a._live = snap.live_closure(root_ids.values(), settings)
            t2 = time.perf_counter()
            timings.update(validate=t1 - t0, closure=t2 - t1)
            if want_dead:
                if graph is not None:
                    if listing is None:
                        from .listing import StoreListing
                        listing = StoreListing(layout.real_store_dir, layout.store_dir, watch=False)
                    listing.sync(graph)
                    _dead_from_graph(a, listing)
                else:
                    _dead_from_sql(a, snap, names, compared)
                a.computed_dead = True
                timings["dead"] = time.perf_counter() - t2
            elif graph is not None and listing is not None and a.temp.hashes:
                # What a temp root keeps on disk unregistered, from the listing
                # gcrootsd keeps: not a listing of the store dir per query
                # whenever a build runs.
                listing.sync(graph)
                _split_temp(a, listing.extra)
            if answer is not None and graph is not None:
                path_frames(a, answer, kept)
        finally:  # the check reads the snapshot: done before it ends, whatever happened
            ok = confirmed()
    if not ok:  # what was made from the followed graph goes before it is all made again
        del a, graph, confirmed
        if kept is not None:
            kept.pop(answer, None)
        return analyze(layout, db, rootset, settings, want_dead=want_dead,
                       temp_files_at_lock=temp_files_at_lock, listing=listing, load=load,
                       names=names, answer=answer, kept=kept, incremental=incremental)
    timings["total"] = time.perf_counter() - t0 + rootset.scan_seconds
    return a


def _valid_in(graph: StoreGraph, paths: Iterable[bytes]) -> dict[bytes, int]:
    """Snapshot.valid_ids, from the graph."""
    paths = list(paths)
    ids = graph.ids
    return {p: int(ids[n]) for p, n in zip(paths, graph.index.get_many(paths)) if n is not None}


@contextlib.contextmanager
def _joined(ahead: "CountsAhead | None") -> Iterator[None]:
    """Its counting thread done when the block ends, however it ends: the
    next analysis uses its connection."""
    try:
        yield
    finally:
        if ahead is not None:
            ahead.result()


def _split_temp(a: Analysis, entries: Iterable[bytes]) -> list[bytes]:
    """`entries` (not valid) without those a temp root keeps alive, which
    go to live_unregistered."""
    a._live_unregistered = set()
    if not a.temp.hashes:
        return list(entries)
    skip = len(a.layout.store_dir) + 1
    out = []
    for p in entries:
        name = p[skip:]
        if name[:HASH_LEN] in a.temp.hashes and is_store_basename(name):
            a._live_unregistered.add(p)
        else:
            out.append(p)
    return out


def _dead_from_graph(a: Analysis, listing: StoreListing) -> None:
    import numpy as np
    g = a.graph
    valid = ~g.gone
    on_disk = listing.on_disk
    dead = on_disk & ~a.live_mask
    a.dead_extra = sorted(_split_temp(a, listing.extra))
    a.store_entries = int(on_disk.sum()) + len(listing.extra)
    a.valid_paths = int(valid.sum())
    # Valid paths not on disk: Nix's referrer search from a dead entry visits
    # them and lists them dead; otherwise they are in neither list.  On a
    # healthy store there are none.
    missing = valid & ~on_disk & ~a.live_mask
    if missing.any():
        reached = g.referrer_closure_mask(np.flatnonzero(dead), a.settings)
        dead |= reached & missing
    a.dead_mask = dead


def _in_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """fn() started in a thread now; returns a function that waits for
    its result (or raises what it raised), whose `running()` says whether
    it is still at work."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:
            box.append((False, e))
    t = threading.Thread(target=run, name="gcroots-list-store", daemon=True)
    t.start()

    def result() -> T:
        t.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value
    result.running = t.is_alive
    return result


def listing_in_thread(layout: StoreLayout) -> Callable[[], list[bytes]]:
    """The store dir's names, sorted, listed in a thread (see _in_thread):
    listing 100k entries is ~60 ms in the kernel, without the GIL.  Each
    name's hash is computed there too (a bytes object keeps it), while the
    caller waits on SQLite: the dead set's set lookups then only use it."""
    def entries() -> list[bytes]:
        names = list_store(layout.real_store_dir)
        # Hashed in the order listed, which is the order they lie in memory:
        # ~5 ms at 100k names instead of ~10 after the sort shuffled them.
        collections.deque(map(hash, names), 0)
        names.sort()
        return names
    return _in_thread(entries)


_Compared = tuple[int, set[bytes]]   # see _valid_not_on_disk


def _compared_in_thread(a: Analysis, snap: Snapshot,
                        listed: Callable[[], list[bytes]]) -> Callable[[], _Compared | None] | None:
    """_valid_not_on_disk for `snap`'s state, in a thread on the DB's twin
    connection (Snapshot.on_twin) while this one walks the live closure:
    reading every valid path is ~30 ms at 100k paths, SQLite's, without
    the GIL.  Its result is None where the twin cannot read that state (a
    commit came between): then _dead_from_sql reads it here.  None: no
    twin (gcrootsd's DB)."""
    if snap.db.twin is None:
        return None

    def compare() -> _Compared | None:
        with snap.on_twin() as other:
            if other is None:
                return None
            return _valid_not_on_disk(a.layout.store_dir, _pages_while(listed, other), listed())
    return _in_thread(compare)


def _pages_while(listed: Callable[[], list[bytes]], snap: Snapshot,
                 ahead: int = 64) -> Iterator[bytes]:
    """snap.sorted_valid_pages(), up to `ahead` of them read at once while
    the listing still runs (SQLite releases the GIL while the other thread
    lists), the rest as they are compared: at a million paths, reading
    them all ahead would hold ~70 MB more."""
    pages = snap.sorted_valid_pages()
    read = []
    while listed.running() and len(read) < ahead and (page := next(pages, None)) is not None:
        read.append(page)
    return itertools.chain(read, pages)


def _dead_from_sql(a: Analysis, snap: Snapshot, listed: Callable[[], list[bytes]],
                   compared: Callable[[], _Compared | None] | None = None) -> None:
    """The dead set without the graph: the store's entries (`listed()`,
    sorted) less the live ones.  At a million entries every copy of them
    costs ~90 MB, so the names are the only one: the dead set is a list of
    them, and paths are made in chunks for the answer.  `compared`:
    _compared_in_thread's, started before the live closure."""
    found = compared() if compared is not None else None
    if found is None:  # on this connection
        found = _valid_not_on_disk(a.layout.store_dir, _pages_while(listed, snap), listed())
    names = listed()
    prefix = a.layout.store_dir + b"/"
    skip = len(prefix)
    live_names = a._live_names   # (set by the SQL analysis, the only caller's)
    assert live_names is not None
    dead = list(itertools.filterfalse(live_names.__contains__, names))  # no bytecode per name
    if a.temp.hashes:
        kept = set(_split_temp(a, [prefix + n for n in dead if n[:HASH_LEN] in a.temp.hashes]))
        dead = [n for n in dead if n[:HASH_LEN] not in a.temp.hashes or prefix + n in kept]
    else:
        a._live_unregistered = set()
    a.valid_paths, missing = found
    a.store_entries = len(names)
    if missing and missing - a.live:  # (the live paths made only then)
        dead_valid = snap.valid_ids(prefix + n for n in dead)
        reached = snap.referrer_closure(dead_valid.values(), a.settings) & (missing - a.live)
        dead = sorted(set(dead) | {p[skip:] for p in reached})
    a._dead_names = dead


def _valid_not_on_disk(store_dir: bytes, pages: Iterable[bytes], names: list[bytes]) -> _Compared:
    """(valid paths, those without an entry) (see _dead_from_graph):
    `pages` of the valid paths (Snapshot.sorted_valid_pages), compared in C
    with the next entries -- equal on the usual store -- and only after a
    difference, looked up one by one."""
    prefix = store_dir + b"/"
    glue = b"\0" + prefix
    pos, valid, missing, entries = 0, 0, set(), None
    for page in pages:
        count = page.count(b"\0")
        valid += count
        if entries is None:
            if page == prefix + glue.join(names[pos:pos + count]) + b"\0":
                pos += count
                continue
            entries = set(names)
        missing.update(p for p in page.split(b"\0")[:-1] if p[len(prefix):] not in entries)
    return valid, missing


# -- queries: rows of bytes fields, shared by the daemon and --standalone ----

def rows_roots(a: Analysis, censor: bool) -> Iterator[tuple[bytes, ...]]:
    """(label, store path, kind), one per distinct (label, path), sorted as
    nix-store --gc --print-roots sorts."""
    pairs: dict[tuple[bytes, bytes], RootKind] = {}
    for kind, label, path in a.roots:
        if censor and kind in _PRIVATE_KINDS:
            label = CENSORED
        pairs.setdefault((label, path), kind)
    for (label, path), kind in sorted(pairs.items()):
        yield label, path, kind.name.lower().encode()


def _graph_answer(a: Analysis, command: str) -> tuple:
    """What a `live`/`dead` answer from the graph is made of: (node mask,
    sorted entries no valid path), or (None, None) without a graph."""
    if command == "dead":
        return a.dead_mask, a.dead_extra
    if a.live_mask is None:
        return None, None
    return a.live_mask, sorted(a.live_unregistered)


def path_frames(a: Analysis, command: str, kept: dict | None = None) -> list[tuple[list, int]]:
    """The answer to `live` or `dead`: sorted store paths, NUL-terminated,
    in frames of at most PIECE bytes: (pieces, paths in them).  Computed
    once per analysis and kept with it: every client's answer is sent from
    these (with a graph, views of its path table), none holds a copy of its
    own.  `kept` (gcrootsd's, per command): the last answer made from a
    graph, taken again when it is the same -- same path table, nodes and
    entries: a query after a query, or after a change that added no path
    (~1 ms to compare at a million paths, ~50 ms to make)."""
    frames = a._frames.get(command)
    mask, extra = _graph_answer(a, command) if frames is None else (None, None)
    if mask is not None:
        then = (kept or {}).get(command)
        added = _added_since(then, a.graph, mask, extra) if then else None
        if added == []:
            frames, keys = then[3], then[4]
        elif added is not None:
            frames, keys = _merge_into(a.graph, then[3], then[4], added)
        else:
            frames, keys = _frames_and_keys(a.graph, mask, extra)
        if kept is not None:
            kept[command] = (a.graph.paths, mask, extra, frames, keys)
    elif frames is None:
        if command == "dead":
            prefix = a.layout.store_dir + b"/"
            frames = _packed(a._dead_names, prefix=prefix)
        else:
            frames = _packed(sorted(a.all_live))
    a._frames[command] = frames
    return frames


# Past this many paths added, making the answer anew is as fast as merging.
MERGE_MAX = 20000


def _added_since(then: tuple, g: StoreGraph, mask: "np.ndarray", extra: list[bytes]
                 ) -> list[bytes] | None:
    """The paths an answer (`mask`, `extra`) adds to a kept one (`then`),
    sorted, if it only adds some: same loaded table (the graph followed
    since, paths appended), the same nodes picked among those it had, its
    entries among ours.  None: it must be made anew."""
    import numpy as np
    t, (was, was_mask, was_extra) = g.paths, then[:3]
    n = len(was_mask)
    if was is t:
        if len(mask) != n or was_extra != extra or not np.array_equal(was_mask, mask):
            return None
        return []
    if (t.blob is not was.blob or len(t) < len(was) or len(mask) != len(t)
            or t.tail[:len(was.tail)] != was.tail):
        return None
    new_extra = set(extra) - set(was_extra)
    if len(extra) != len(was_extra) + len(new_extra) or not np.array_equal(was_mask, mask[:n]):
        return None    # an entry went, or the old part changed
    nodes = np.flatnonzero(mask[n:]) + n
    if len(nodes) + len(new_extra) > MERGE_MAX or not then[3] and (len(nodes) or new_extra):
        return None    # (nothing to merge into)
    return sorted([t[x] for x in nodes.tolist()] + list(new_extra))


def path_chunks(a: Analysis, command: str) -> Iterator[bytes]:
    """path_frames, each joined."""
    return (b"".join(pieces) for pieces, _ in path_frames(a, command))


def path_chunks_unframed(a: Analysis, command: str, each: int = 4096) -> list[bytes]:
    """path_chunks' bytes (--standalone: nothing is sent in frames); the
    dead set without the graph joined at once instead of sized into frames
    first (~3 ms at 100k paths instead of ~8), in pieces of `each` paths:
    one join per piece, its first path's prefix and its last one's NUL put
    on those two, so no copy of the whole is made.  (One join of every
    path makes CPython hold a buffer descriptor per path, 80 bytes each,
    and each copy of the whole is ~6 MB at 100k paths, all pages the
    kernel must fault in: ~3,400 faults fewer, ~8 ms.)"""
    names = a._dead_names if command == "dead" and command not in a._frames else None
    if names is None:
        return list(path_chunks(a, command))
    prefix = a.layout.store_dir + b"/"
    glue = b"\0" + prefix
    out = []
    for at in range(0, len(names), each):
        part = names[at:at + each]   # references: the names themselves are not copied
        part[0] = prefix + part[0]
        part[-1] += b"\0"
        out.append(glue.join(part))
    return out


def path_rows(a: Analysis, command: str) -> list[tuple[bytes, ...]]:
    joined = b"".join(path_chunks(a, command))
    return [(p,) for p in joined.split(b"\0")[:-1]] if joined else []


class NotAlive(Exception):
    pass


def rows_why(a: Analysis, db: StoreDB, target: bytes, all_roots: bool,
             censor: bool, g: LiveGraph | None = None) -> Iterator[tuple[bytes, ...]]:
    """Each row: (root label, root path, ..., target).  `g`: the live graph,
    if the caller has it already."""
    store_path = parse_store_path(target, a.layout.store_dir)
    if store_path is None:
        raise NotAlive(f"{target.decode(errors='replace')} is not a store path")
    if store_path in a.live_unregistered:
        labels = a.labels_by_path(censor)
        for label in labels.get(store_path, [b"{temp}"]):
            yield label, store_path
        return
    if store_path not in a.live:
        if not os.path.lexists(a.layout.physical(store_path)):  # a usage error, not a "no"
            raise BadRequest(f"{store_path.decode(errors='replace')} is not in the store")
        raise NotAlive(f"{store_path.decode(errors='replace')} is not alive: "
                       "no root keeps it (it is garbage)")
    g = g or live_graph(a, db)
    if store_path not in g.index:
        raise NotAlive(f"{store_path.decode(errors='replace')} left the store meanwhile")
    labels = a.labels_by_path(censor)
    for chain in g.chains_to(g.index[store_path], all_roots):
        root = g.paths[chain[0]]
        yield (labels.get(root, [b"?"])[0], *(g.paths[n] for n in chain))


EXPLAINED_REFUSALS = 20


def delete_refusals(a: Analysis, db: StoreDB, graph: StoreGraph,
                    paths: list[bytes]) -> list[str]:
    """Why each of `paths` may not be deleted, as `nix-store --delete`
    decides (gcDeleteSpecific): a path that is alive (a root, a temp
    root's, or kept by one: shown with the chain that keeps it), or that
    Nix's referrer search leads from to a path not being deleted -- garbage
    or not.  Empty: all of them may go."""
    wanted = set(paths)
    out: list[str] = []
    g = None
    for p in sorted(wanted):
        if len(out) == EXPLAINED_REFUSALS:
            out.append("...")
            break
        name = p.decode(errors="replace")
        if p in a.all_live or hash_part(p) in a.temp.hashes:
            try:
                g = g or live_graph(a, db)
                label, *chain = next(rows_why(a, db, p, False, False, g))
                why = " -> ".join(x.decode(errors="replace") for x in (label, *chain))
            except (NotAlive, StopIteration):
                why = "a running Nix process uses it (temporary root)"
            out.append(f"{name} is alive: {why}")
            continue
        node = graph.index.get(p)
        if node is None:
            continue  # not valid: nothing in the DB refers to it
        outside = sorted(graph.paths[n] for n in graph.referrer_closure([node], a.settings)
                         if graph.paths[n] not in wanted)
        if outside:
            out.append(f"{name} is still needed by {outside[0].decode(errors='replace')}"
                       + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else "")
                       + ", which is not being deleted")
    return out


def live_graph(a: Analysis, db: StoreDB) -> LiveGraph:
    """The live part of the graph (the analysis's, or one read now), with
    each path's narSize as the DB says it now."""
    from .graph import LiveGraph
    with db.snapshot() as snap:
        g = a.graph or store_graph(db, a.settings)
        if g is a.graph:
            live, roots = a.live_mask, a.root_nodes
        else:
            roots = [n for n in (g.index.get(p) for p in a.root_paths) if n is not None]
            live = g.closure_mask(roots, a.settings)
        nodes = live.nonzero()[0]
        by_id = snap.nar_sizes_of_ids(int(i) for i in g.ids[nodes])
        sizes = {int(n): by_id.get(int(i), 0) for n, i in zip(nodes, g.ids[nodes])}
    return LiveGraph.from_store_graph(g, live, roots, a.settings, sizes)


# A row is one frame (64 KiB): any user can point many long-named links at
# one path, so the labels of one row are capped.
ROW_LABEL_BYTES = 32 * 1024


def bounded_labels(labels: list[bytes], budget: int = ROW_LABEL_BYTES) -> list[bytes]:
    """The first labels that fit in `budget` bytes, then "{... and K more}"."""
    out, used = [], 0
    for i, label in enumerate(labels):
        used += 4 + len(label)
        if used > budget:
            return out + [b"{... and %d more}" % (len(labels) - i)]
        out.append(label)
    return out


def rows_cost(a: Analysis, db: StoreDB, top: int, censor: bool) -> Iterator[tuple[bytes, ...]]:
    """(bytes, paths, store path, labels...) by bytes, biggest first."""
    g = live_graph(a, db)
    costs = g.root_costs()
    labels = a.labels_by_path(censor)
    ranked = sorted(costs.items(), key=lambda kv: (-kv[1][0], g.paths[kv[0]]))
    for node, (nbytes, npaths) in ranked[:top] if top > 0 else ranked:
        path = g.paths[node]
        yield (str(nbytes).encode(), str(npaths).encode(), path,
               *bounded_labels(labels.get(path, [])))


def stats(a: Analysis, db: StoreDB) -> list[tuple[str, str]]:
    by_kind: dict[str, int] = defaultdict(int)
    for kind, _, _ in a.roots:
        by_kind[kind.name.lower()] += 1
    if a.computed_dead and a.dead_mask is None:
        a.dead_valid  # its own read transaction, before the one below
    with db.snapshot() as snap:
        live_bytes = sum(snap.nar_sizes(a.live).values())
        if not a.computed_dead:
            dead_bytes = dead_valid = 0
        elif a.dead_mask is not None:  # a million dead paths: no JSON of them
            dead_bytes = int(a.graph.sizes[a.dead_mask].sum())
            dead_valid = int(a.dead_mask.sum())
        else:
            dead_bytes = sum(snap.nar_sizes(a.dead_valid).values())
            dead_valid = len(a.dead_valid)
    out = [("store_entries", str(a.store_entries)), ("valid_paths", str(a.valid_paths)),
           ("roots", str(len(a.roots))), ("root_paths", str(len(a.root_paths)))]
    out += [(f"roots_{k}", str(v)) for k, v in sorted(by_kind.items())]
    out += [("live_paths", str(a.live_count())), ("live_nar_bytes", str(live_bytes))]
    if a.computed_dead:
        out += [("dead_paths", str(a.dead_count())), ("dead_valid_paths", str(dead_valid)),
                ("dead_nar_bytes", str(dead_bytes))]
    out += [("stale_links", str(len(a.rootset.stale))),
            ("scan_warnings", str(len(a.rootset.warnings))),
            ("temp_root_files_stale", str(len(a.temp.stale_files))),
            ("keep_derivations", str(a.settings.keep_derivations).lower()),
            ("keep_outputs", str(a.settings.keep_outputs).lower()),
            ("ca_derivations", str(a.settings.ca_derivations).lower())]
    out += [(f"seconds_{k}", f"{v:.4f}") for k, v in a.timings.items()]
    # The answering process's memory (gcrootsd keeps the graph resident).
    out += [(f"resident_{k}bytes", str(v)) for k, v in resident_memory().items()]
    return out


def resident_memory() -> dict[str, int]:
    """{"": resident bytes now, "peak_": the most so far} of this process."""
    out = {}
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                out["" if line.startswith(b"VmRSS") else "peak_"] = int(line.split()[1]) * 1024
    return out


NEEDS_DEAD = frozenset({"dead", "stats"})
QUERIES = frozenset({"roots", "live", "dead", "why", "cost", "stats"})


class BadRequest(Exception):
    pass


def check_request(command: str, options: dict, args: tuple[bytes, ...]) -> None:
    """BadRequest for what query_rows would refuse: checked before the
    (costly) scan and analysis."""
    if command not in QUERIES:
        raise BadRequest(f"unknown command {command!r}")
    if command == "why" and len(args) != 1:
        raise BadRequest("why takes exactly one store path")
    if command == "cost":
        _top(options)


def _top(options: dict) -> int:
    top = options.get("top", 20)
    if isinstance(top, bool) or not isinstance(top, (int, str)):
        raise BadRequest("cost: top must be an integer")
    try:
        return int(top)
    except ValueError:
        raise BadRequest("cost: top must be an integer") from None


def query_rows(a: Analysis, db: StoreDB, command: str, options: dict, args: tuple[bytes, ...],
               censor: bool) -> list[tuple[bytes, ...]]:
    """The rows of a read-only query (same for the daemon and --standalone),
    once check_request() passed."""
    if command == "roots":
        return list(rows_roots(a, censor))
    if command in ("live", "dead"):
        return path_rows(a, command)
    if command == "why":
        return list(rows_why(a, db, args[0], bool(options.get("all")), censor))
    if command == "cost":
        return list(rows_cost(a, db, _top(options), censor))
    if command == "stats":
        return [(k.encode(), v.encode()) for k, v in stats(a, db)]
    raise BadRequest(f"unknown command {command!r}")
