"""The store graph in memory.

`StoreGraph` holds all of ValidPaths/Refs/DerivationOutputs as int lists,
loaded in one pass and kept by gcrootsd until the DB changes.  Its edges
are those of liveness (see daemon/store.py): references, deriver
(keep-derivations), outputs (keep-outputs).  With ca-derivations, the
outputs Nix finds through Realisations (daemon/derivation.py) are kept
apart in `realised`: Nix's closure follows them, its referrer search only
for keep-derivations.

`LiveGraph` is the live part of it, renumbered, for `why` and `cost`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from gcroots import log

from .nixconf import GCSettings

_log = log.get("gcroots.graph")


@dataclass
class StoreGraph:
    version: int                      # PRAGMA data_version it was loaded at
    paths: list[bytes]                # node -> store path
    sizes: list[int]                  # node -> narSize
    refs: list[tuple[int, ...]]       # node -> referenced nodes (no self)
    deriver: list[int]                # node -> its valid deriver node that lists it, or -1
    outputs: dict[int, list[int]]     # drv node -> valid output nodes (DerivationOutputs)
    index: dict[bytes, int]
    realised: dict[int, list[int]] = field(default_factory=dict)  # ... through Realisations
    ca: bool = False                  # loaded following Realisations (realised filled in)
    _referrers: list[list[int]] | None = field(default=None, repr=False)
    _by_hash: dict[bytes, list[int]] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, conn, version: int,
             realised_pairs: list[tuple[int, int]] | None = None) -> "StoreGraph":
        """`realised_pairs`: (drv id, output id) from Realisations, given
        when Nix would follow them (GCSettings.follows_realisations)."""
        rows = conn.execute("SELECT id, path, narSize, deriver FROM ValidPaths").fetchall()
        node_of_id: dict[int, int] = {}
        paths: list[bytes] = []
        sizes: list[int] = []
        for node, (vid, path, nar, _) in enumerate(rows):
            node_of_id[vid] = node
            paths.append(path)
            sizes.append(nar or 0)
        index = {p: i for i, p in enumerate(paths)}
        refs: list[list[int]] = [[] for _ in paths]
        # Rows naming an id that is not in ValidPaths (a DB written with
        # foreign keys off) join with nothing in Nix's queries, nor in ours.
        dangling = 0
        for a, b in conn.execute("SELECT referrer, reference FROM Refs"):
            if a != b:
                try:
                    refs[node_of_id[a]].append(node_of_id[b])
                except KeyError:
                    dangling += 1
        get = index.get
        # keep-derivations keeps a .drv for an output that names it as its
        # deriver and that the .drv lists in DerivationOutputs or, with
        # ca-derivations, in Realisations (both, as Nix's referrer search
        # checks); keep-outputs keeps every output a .drv lists.
        deriver = [-1] * len(paths)
        outputs: dict[int, list[int]] = {}
        realised: dict[int, list[int]] = {}
        for drv, out in conn.execute("SELECT drv, path FROM DerivationOutputs"):
            o, d = get(out), node_of_id.get(drv)
            if o is not None and d is not None:
                outputs.setdefault(d, []).append(o)
                if rows[o][3] == paths[d]:
                    deriver[o] = d
            elif d is None:
                dangling += 1
        for drv, out in realised_pairs or ():
            d, o = node_of_id[drv], node_of_id[out]
            realised.setdefault(d, []).append(o)
            if rows[o][3] == paths[d]:
                deriver[o] = d
        if dangling:
            _log.warning("db_dangling_rows", count=dangling)
        # Tuples: a third smaller than lists, which matters at a million paths.
        return cls(version, paths, sizes, [tuple(r) for r in refs], deriver, outputs, index,
                   realised, realised_pairs is not None)

    def successors(self, node: int, settings: GCSettings) -> Iterable[int]:
        yield from self.refs[node]
        if settings.keep_derivations and self.deriver[node] >= 0:
            yield self.deriver[node]
        if settings.keep_outputs:
            yield from self.outputs.get(node, ())
            yield from self.realised.get(node, ())

    def closure(self, start: Iterable[int], settings: GCSettings) -> set[int]:
        refs, deriver, outputs, realised = self.refs, self.deriver, self.outputs, self.realised
        kd, ko = settings.keep_derivations, settings.keep_outputs
        seen = set(start)
        todo = list(seen)
        pop, push, add = todo.pop, todo.append, seen.add
        while todo:
            n = pop()
            for m in refs[n]:
                if m not in seen:
                    add(m)
                    push(m)
            if kd:
                d = deriver[n]
                if d >= 0 and d not in seen:
                    add(d)
                    push(d)
            if ko:
                for m in (*outputs.get(n, ()), *realised.get(n, ())):
                    if m not in seen:
                        add(m)
                        push(m)
        return seen

    def referrers(self) -> list[list[int]]:
        """node -> the nodes that reference it (built on first use)."""
        if self._referrers is None:
            rev: list[list[int]] = [[] for _ in self.paths]
            for a, bs in enumerate(self.refs):
                for b in bs:
                    rev[b].append(a)
            self._referrers = rev
        return self._referrers

    def nodes_with_hash(self, h: bytes, store_dir: bytes) -> list[int]:
        """Valid paths whose hash part is `h` (Nix matches temp roots so)."""
        if self._by_hash is None:
            start = len(store_dir) + 1
            by_hash: dict[bytes, list[int]] = {}
            for i, p in enumerate(self.paths):
                by_hash.setdefault(p[start:start + 32], []).append(i)
            self._by_hash = by_hash
        return self._by_hash.get(h, [])

    def referrer_closure(self, start: Iterable[int], settings: GCSettings) -> set[int]:
        """What Nix's referrer search visits: referrers; for a .drv, its
        outputs whose deriver is that .drv (keep-derivations); the .drvs
        that list a path as output in DerivationOutputs (keep-outputs:
        queryValidDerivers, which does not look at Realisations)."""
        referrers = self.referrers()
        derivers_of: dict[int, list[int]] = {}
        if settings.keep_outputs:
            for drv, outs in self.outputs.items():
                for o in outs:
                    derivers_of.setdefault(o, []).append(drv)
        seen = set(start)
        todo = list(seen)
        while todo:
            n = todo.pop()
            nxt = list(referrers[n])
            if settings.keep_derivations:
                nxt += [o for o in (*self.outputs.get(n, ()), *self.realised.get(n, ()))
                        if self.deriver[o] == n]
            if settings.keep_outputs:
                nxt += derivers_of.get(n, ())
            for m in nxt:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen


SUPER = -1


@dataclass
class LiveGraph:
    paths: list[bytes]                      # node -> store path
    sizes: list[int]                        # node -> narSize
    succ: list[list[int]]                   # forward edges (within the live set)
    roots: list[int]                        # root nodes
    index: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def from_store_graph(cls, g: StoreGraph, live: Iterable[bytes], root_paths: Iterable[bytes],
                         settings: GCSettings) -> "LiveGraph":
        old_nodes = sorted(g.index[p] for p in live if p in g.index)
        renumber = {old: new for new, old in enumerate(old_nodes)}
        succ = [sorted({renumber[m] for m in g.successors(old, settings) if m in renumber})
                for old in old_nodes]
        paths = [g.paths[o] for o in old_nodes]
        index = {p: i for i, p in enumerate(paths)}
        roots = sorted(index[p] for p in root_paths if p in index)
        return cls(paths, [g.sizes[o] for o in old_nodes], succ, roots, index)

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
