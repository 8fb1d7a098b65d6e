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

import os
import pwd
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, KeysView

from gcroots.layout import StoreLayout
from gcroots.protocol.rootstream import Root, RootKind, ScanWarning, StaleLink
from gcroots.storepath import HASH_LEN, hash_part, is_store_basename, parse_store_path

from .derivation import DerivationError
from .graph import LiveGraph, StoreGraph
from .nixconf import GCSettings
from .store import Snapshot, StoreDB, list_store
from .temproots import TempRoots, UnreadableTempRoots, read_temp_roots

CENSORED = b"{censored}"
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
    from gcroots.helper.sandbox import hidden_dirs, preflight
    from gcroots.helper.scan import ScanError, Scanner

    t0 = time.perf_counter()
    full = os.geteuid() == 0
    try:
        records = list(Scanner(layout, runtime=runtime,
                               preflight=preflight(hidden_dirs(), caps=full, runtime=runtime),
                               accept_unreadable=() if full else (b"/",)).scan())
    except ScanError as e:
        raise IncompleteRoots(f"the root scan failed: {scan_error(str(e))[0]}") from None
    return RootSet.from_records(records, layout, time.perf_counter() - t0)


@dataclass
class Analysis:
    layout: StoreLayout
    settings: GCSettings
    roots: list[tuple[RootKind, bytes, bytes]]     # (kind, label, store path): valid + temp
    root_paths: set[bytes]                          # valid paths that are roots
    temp: TempRoots
    live: set[bytes]                                # closure (valid paths)
    live_unregistered: set[bytes]                   # on-disk temp-root entries, not valid
    dead: list[bytes] | None                        # sorted; None if not computed
    rootset: RootSet
    store_entries: int = 0
    valid_paths: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    graph: StoreGraph | None = None                 # the in-memory graph, if it was fresh
    hash_roots: list[tuple[RootKind, bytes, bytes]] = field(default_factory=list)
    _valid: "frozenset[bytes] | KeysView[bytes]" = frozenset()
    _dead_valid: set[bytes] | None = None

    @property
    def dead_valid(self) -> set[bytes]:
        """The dead paths that are registered (computed when first asked)."""
        if self._dead_valid is None:
            self._dead_valid = {p for p in self.dead or () if p in self._valid}
        return self._dead_valid

    @property
    def all_live(self) -> set[bytes]:
        return self.live | self.live_unregistered

    def labels_by_path(self, censor: bool) -> dict[bytes, list[bytes]]:
        out: dict[bytes, set[bytes]] = defaultdict(set)
        for kind, label, path in self.roots + self.hash_roots:
            out[path].add(CENSORED if censor and kind in _PRIVATE_KINDS else label)
        return {p: sorted(ls) for p, ls in out.items()}


def analyze(layout: StoreLayout, db: StoreDB, rootset: RootSet, settings: GCSettings,
            *, want_dead: bool = True,
            temp_files_at_lock: frozenset[tuple[bytes, int]] | None = None) -> Analysis:
    """`temp_files_at_lock`: see read_temp_roots (a collection's)."""
    t0 = time.perf_counter()
    timings = {"scan": rootset.scan_seconds}
    with db.snapshot() as snap:
        candidates = {r.store_path for r in rootset.roots}
        valid_roots = snap.valid_among(candidates)
        try:
            temp = read_temp_roots(layout, temp_files_at_lock)
        except UnreadableTempRoots as e:
            raise IncompleteRoots(str(e)) from None
        temp_valid = snap.valid_with_hash(layout.store_dir, temp.hashes)
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
        root_paths = valid_roots | temp_valid
        t1 = time.perf_counter()
        graph = db.cached_graph(settings.follows_realisations)
        if graph is None and settings.follows_realisations and db.has_realisations():
            graph = store_graph(db, settings)  # SQLite alone cannot follow Realisations
        if graph is not None:  # warm: walk the live part in memory
            nodes = graph.closure((graph.index[p] for p in root_paths), settings)
            live = {graph.paths[n] for n in nodes}
        else:                  # cold: let SQLite walk it
            live = snap.live_closure(root_paths, settings)
        t2 = time.perf_counter()
        timings.update(validate=t1 - t0, closure=t2 - t1)
        analysis = Analysis(layout, settings, sorted(set(roots)), root_paths, temp, live, set(),
                            None, rootset, timings=timings, graph=graph,
                            hash_roots=hash_roots)
        if want_dead:
            _dead(analysis, snap)
            timings["dead"] = time.perf_counter() - t2
        elif temp.hashes:
            # Registered or not, an entry with a temp root's hash is alive.
            analysis.live_unregistered = _temp_hash_entries(analysis) - live
    timings["total"] = time.perf_counter() - t0 + rootset.scan_seconds
    return analysis


def _temp_hash_entries(a: Analysis) -> set[bytes]:
    prefix = a.layout.store_dir + b"/"
    return {prefix + name for name in list_store(a.layout)
            if name[:HASH_LEN] in a.temp.hashes and is_store_basename(name)}


def _dead(a: Analysis, snap: Snapshot) -> None:
    prefix = a.layout.store_dir + b"/"
    on_disk = {prefix + name for name in list_store(a.layout)}
    dead = on_disk - a.live
    if a.temp.hashes:
        for path in list(dead):
            name = path[len(prefix):]
            if name[:HASH_LEN] in a.temp.hashes and is_store_basename(name):
                dead.discard(path)
                a.live_unregistered.add(path)
    valid = snap.db.all_valid()
    a.store_entries, a.valid_paths = len(on_disk), len(valid)
    a._valid = valid
    # Valid paths not on disk: Nix's referrer search from a dead entry visits
    # them and lists them dead; otherwise they are in neither list.  On a
    # healthy store there are none, and one subset test says so.
    if not valid <= on_disk:
        missing = valid - on_disk - a.live
        dead_valid = dead & valid
        if a.graph is not None:
            g = a.graph
            reached = {g.paths[n] for n in
                       g.referrer_closure((g.index[p] for p in dead_valid), a.settings)}
        else:
            reached = snap.referrer_closure(dead_valid, a.settings)
        dead |= (reached & missing) - a.live
    a.dead = sorted(dead)


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


def rows_live(a: Analysis) -> Iterator[tuple[bytes, ...]]:
    for p in sorted(a.all_live):
        yield (p,)


def rows_dead(a: Analysis) -> Iterator[tuple[bytes, ...]]:
    assert a.dead is not None
    for p in a.dead:
        yield (p,)


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
        if not os.path.lexists(a.layout.real_path(store_path)):  # a usage error, not a "no"
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
    with db.snapshot():
        g = store_graph(db, a.settings)
    return LiveGraph.from_store_graph(g, a.live, a.root_paths, a.settings)


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
    with db.snapshot() as snap:
        live_bytes = sum(snap.nar_sizes(a.live).values())
        dead_bytes = sum(snap.nar_sizes(a.dead_valid).values()) if a.dead is not None else 0
    out = [("store_entries", str(a.store_entries)), ("valid_paths", str(a.valid_paths)),
           ("roots", str(len(a.roots))), ("root_paths", str(len(a.root_paths)))]
    out += [(f"roots_{k}", str(v)) for k, v in sorted(by_kind.items())]
    out += [("live_paths", str(len(a.all_live))), ("live_nar_bytes", str(live_bytes))]
    if a.dead is not None:
        out += [("dead_paths", str(len(a.dead))), ("dead_valid_paths", str(len(a.dead_valid))),
                ("dead_nar_bytes", str(dead_bytes))]
    out += [("stale_links", str(len(a.rootset.stale))),
            ("scan_warnings", str(len(a.rootset.warnings))),
            ("temp_root_files_stale", str(len(a.temp.stale_files))),
            ("keep_derivations", str(a.settings.keep_derivations).lower()),
            ("keep_outputs", str(a.settings.keep_outputs).lower()),
            ("ca_derivations", str(a.settings.ca_derivations).lower())]
    out += [(f"seconds_{k}", f"{v:.4f}") for k, v in a.timings.items()]
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
    """The rows of a read-only query (same for the daemon and --standalone)."""
    check_request(command, options, args)
    if command == "roots":
        return list(rows_roots(a, censor))
    if command == "live":
        return list(rows_live(a))
    if command == "dead":
        return list(rows_dead(a))
    if command == "why":
        if len(args) != 1:
            raise BadRequest("why takes exactly one store path")
        return list(rows_why(a, db, args[0], bool(options.get("all")), censor))
    if command == "cost":
        return list(rows_cost(a, db, _top(options), censor))
    if command == "stats":
        return [(k.encode(), v.encode()) for k, v in stats(a, db)]
    raise BadRequest(f"unknown command {command!r}")
