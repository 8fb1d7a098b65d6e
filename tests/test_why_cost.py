"""`why` chains checked edge by edge against the DB; `cost` against a
brute-force recomputation.  The reference implementation here reads the DB
itself and shares no code with the daemon."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
from collections import deque
from pathlib import Path

import pytest

from . import support
from .support import standalone


class RefGraph:
    """Straight from the DB: the GC's edges under keep-derivations/-outputs."""

    def __init__(self, root: Path, keep_derivations=True, keep_outputs=False):
        db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
        db.text_factory = bytes
        rows = db.execute("SELECT id, path, deriver, narSize FROM ValidPaths").fetchall()
        path_of = {i: p for i, p, _, _ in rows}
        self.size = {p: n or 0 for _, p, _, n in rows}
        valid = set(path_of.values())
        self.edges: dict[bytes, set[bytes]] = {p: set() for p in valid}
        for a, b in db.execute("SELECT referrer, reference FROM Refs"):
            if a != b:
                self.edges[path_of[a]].add(path_of[b])
        if keep_derivations:
            for _, p, d, _ in rows:
                if d in valid:
                    self.edges[p].add(d)
        if keep_outputs:
            for drv, out in db.execute("SELECT drv, path FROM DerivationOutputs"):
                if out in valid:
                    self.edges[path_of[drv]].add(out)
        db.close()

    def closure(self, start) -> set[bytes]:
        seen = set(start)
        todo = list(seen)
        while todo:
            for m in self.edges[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    def distances(self, start) -> dict[bytes, int]:
        dist = {s: 0 for s in start}
        q = deque(start)
        while q:
            n = q.popleft()
            for m in self.edges[n]:
                if m not in dist:
                    dist[m] = dist[n] + 1
                    q.append(m)
        return dist


def query_json(root: Path, *args: str, env=None):
    return json.loads(standalone(root, "--json", *args, env=env).stdout)


@pytest.mark.parametrize("seed,keep_outputs", [(51, False), (52, True)])
def test_why_chains_are_real_shortest_edges(scratch, seed, keep_outputs):
    root = scratch / "store"
    support.make_store(root, paths=1200, seed=seed, quirks=1, roots=40, indirect=8, stale=0)
    env = {"NIX_CONFIG": "keep-outputs = true"} if keep_outputs else None
    g = RefGraph(root, keep_outputs=keep_outputs)
    roots = query_json(root, "roots", env=env)
    labels: dict[bytes, set[bytes]] = {}
    for r in roots:
        labels.setdefault(r["path"].encode(), set()).add(r["link"].encode())
    root_paths = set(labels)
    dist = g.distances(root_paths)
    live = [p.encode() for p in query_json(root, "live", env=env)]
    assert set(live) == set(dist)
    for target in random.Random(seed).sample(live, 25):
        one = query_json(root, "why", target.decode(), env=env)
        all_ = query_json(root, "why", "--all", target.decode(), env=env)
        assert len(one["chains"]) == 1
        assert one["chains"][0] in all_["chains"]
        for c in all_["chains"]:
            chain = [p.encode() for p in c["chain"]]
            assert chain[0] in root_paths and c["root"].encode() in labels[chain[0]]
            assert chain[-1] == target
            for a, b in zip(chain, chain[1:]):
                assert b in g.edges[a], f"{a!r} -> {b!r} is not an edge of the store graph"
            # shortest from that root
            assert len(chain) - 1 == g.distances([chain[0]])[target]
        assert len(one["chains"][0]["chain"]) - 1 == dist[target]  # shortest from any root
        keepers = {r for r in root_paths if target in g.closure([r])}
        assert {c["chain"][0].encode() for c in all_["chains"]} == keepers


def test_why_dead_path_says_no(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=53, quirks=0, roots=10, indirect=0, stale=0)
    dead = standalone(root, "dead").stdout.split()
    out = standalone(root, "why", dead[0].decode(), check=False)
    assert out.returncode == 5 and b"is not alive" in out.stderr and out.stdout == b""
    out = standalone(root, "why", "/etc/passwd", check=False)
    assert out.returncode == 2 and b"is not in the Nix store" in out.stderr  # issue 15: was 5


def test_why_accepts_what_nix_store_q_roots_accepts(scratch, users, pipelines):
    """A `result` link (a chain of links into the store), a file or a
    directory inside a store path, and a bare <hash>-<name> name the store
    path, as `nix-store -q --roots` takes the first three; a malformed
    argument or a path that is not in the store is a usage error (exit 2);
    5 stays "in the store but not alive"; with --json errors are JSON."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=57, quirks=0, roots=10, indirect=0, stale=0)
    live = standalone(root, "live").stdout.split()
    target = next(p for p in live if (root / p.decode().lstrip("/")).is_dir()
                  and any((root / p.decode().lstrip("/")).iterdir()))
    inside = sorted((root / target.decode().lstrip("/")).iterdir())[0].name
    links = scratch / "links"
    links.mkdir()
    (links / "result").symlink_to(links / "hop")
    (links / "hop").symlink_to(target.decode())   # dangling on the host: never opened
    name = target.decode().rsplit("/", 1)[1]
    expected = query_json(root, "why", target.decode())
    forms = {"link": str(links / "result"), "relative link": "result",
             "file inside": f"{target.decode()}/{inside}", "dir inside": f"{target.decode()}/",
             "bare name": name}
    for what, form in forms.items():
        out = subprocess.run([support.QUERY, "--standalone", "--root", str(root), "--no-runtime",
                              "--json", "why", form], capture_output=True, cwd=links)
        assert out.returncode == 0, (what, out.stderr)
        assert json.loads(out.stdout) == expected, what
    # Nix takes the link and the path inside too (its roots: the same root paths).
    for form in (str(links / "result"), f"{target.decode()}/{inside}"):
        nix = support.oracle(root, "nix-store", "-q", "--roots", form, check=False)
        assert nix.returncode == 0, nix.stderr
    absent = "/nix/store/" + "0" * 32 + "-never-there"
    for bad, code, says in [("", 2, b"is not a path"), ("/etc/passwd", 2, b"not in the Nix store"),
                            (absent, 2, b"is not in the store"),
                            ("0" * 32 + "-never-there", 2, b"is not in the store"),
                            ("/nix/store/tooshort", 2, b"not a valid store path"),
                            (str(links / "nowhere"), 2, b"No such file")]:
        out = standalone(root, "why", bad, check=False)
        assert out.returncode == code and says in out.stderr, (bad, out.stderr)
        doc = json.loads(standalone(root, "--json", "why", bad, check=False).stdout)
        assert doc["exit"] == code and says.decode() in doc["error"], (bad, doc)

    p = support.Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    out = p.query("--json", "why", str(links / "result"))
    assert out.returncode == 0 and json.loads(out.stdout) == expected, out.stderr
    assert p.query("why", absent).returncode == 2
    dead = standalone(root, "dead").stdout.split()[0].decode()
    assert p.query("why", dead).returncode == 5
    out = p.query("--root", str(root), "why", target.decode())   # issue 15: answered about /nix
    assert out.returncode == 2 and b"--root needs --standalone" in out.stderr, out.stderr


@pytest.mark.parametrize("seed,keep_outputs", [(54, False), (55, True), (56, False)])
def test_cost_equals_brute_force(scratch, seed, keep_outputs):
    root = scratch / "store"
    support.make_store(root, paths=600, seed=seed, quirks=1, roots=25, indirect=5, stale=0,
                       profiles=2, generations=3)
    env = {"NIX_CONFIG": "keep-outputs = true"} if keep_outputs else None
    g = RefGraph(root, keep_outputs=keep_outputs)
    root_paths = {r["path"].encode() for r in query_json(root, "roots", env=env)}
    everything = g.closure(root_paths)
    costs = {c["store_path"].encode(): c for c in query_json(root, "cost", "--top", "0", env=env)}
    assert set(costs) == root_paths
    nonzero = 0
    for r in root_paths:
        freed = everything - g.closure(root_paths - {r})
        assert costs[r]["paths"] == len(freed), r
        assert costs[r]["nar_bytes"] == sum(g.size[p] for p in freed), r
        nonzero += bool(freed)
    assert nonzero > 5
    ranked = [c["nar_bytes"] for c in query_json(root, "cost", "--top", "5", env=env)]
    assert ranked == sorted((c["nar_bytes"] for c in costs.values()), reverse=True)[:5]
