"""tests/storegen.py against the real Nix 2.8: what it writes is what Nix
would have written, and it is the same every time."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from . import storegen as sg
from . import support
from .support import REPO, oracle, tree_snapshot

NIX_COMMAND = "experimental-features = nix-command"


def rows(db: Path, query: str) -> list:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def db_of(root: Path) -> Path:
    return root / "nix/var/nix/db/db.sqlite"


def test_hashes_and_nars_equal_nix(scratch):
    """Base 32 as nix-hash prints it; NARs as nix-store --dump writes them;
    source, flat and text paths as nix-store --add, --add-fixed and
    builtins.toFile make them."""
    for data in (b"", b"x", b"gcroots" * 100):
        for algo in ("sha1", "sha256"):
            digest = hashlib.new(algo, data).digest()
            nix = subprocess.run(["nix-hash", "--type", algo, "--to-base32", digest.hex()],
                                 capture_output=True, check=True).stdout.decode().strip()
            assert sg.b32(digest) == nix
    tree = ("d", {"bin": ("d", {"run": ("x", b"#!/bin/sh\n")}), "empty": ("d", {}),
                  "link": ("l", "bin/run"), "z": ("f", b"z" * 13), "a b": ("f", b"")})
    sg.write_tree(str(scratch / "tree"), tree)
    assert sg.nar(tree) == oracle("/", "nix-store", "--dump", str(scratch / "tree")).stdout
    store = scratch / "store"
    added = oracle(store, "nix-store", "--add", str(scratch / "tree")).stdout.decode().strip()
    assert added == sg.fixed_path("tree", hashlib.sha256(sg.nar(tree)).digest(), True, "/nix/store")
    (scratch / "f.tar.gz").write_bytes(b"tarball")
    flat = oracle(store, "nix-store", "--add-fixed", "sha256", str(scratch / "f.tar.gz")).stdout
    assert flat.decode().strip() == sg.fixed_path("f.tar.gz", hashlib.sha256(b"tarball").digest(),
                                                  False, "/nix/store")
    expr = 'let a = builtins.toFile "a" "x"; in builtins.toFile "b.nix" "import ${a}"'
    a = oracle(store, "nix-instantiate", "--eval", "-E", 'builtins.toFile "a" "x"').stdout
    b = oracle(store, "nix-instantiate", "--eval", "-E", expr).stdout
    a, b = a.decode().strip().strip('"'), b.decode().strip().strip('"')
    assert a == sg.text_path("a", hashlib.sha256(b"x").digest(), [], "/nix/store")
    assert b == sg.text_path("b.nix", hashlib.sha256(f"import {a}".encode()).digest(), [a],
                             "/nix/store")


DERIVATIONS = r"""
let
  system = "x86_64-linux";
  builder = builtins.toFile "builder.sh" "echo \"building\" > $out\n";
  fetched = derivation {
    name = "src-1.0.tar.gz"; inherit system; builder = "builtin:fetchurl";
    urls = "https://example.invalid/src-1.0.tar.gz"; preferLocalBuild = "1";
    outputHash = "@HASH@"; outputHashAlgo = "sha256"; outputHashMode = "flat";
  };
  dep = derivation {
    name = "dep-1.0"; inherit system; builder = "/bin/sh"; args = [ "-e" builder ];
    outputs = [ "out" "dev" ]; src = fetched; note = "tab\there \"quoted\" back\\slash";
  };
in derivation {
  name = "app-2.0"; inherit system; builder = "/bin/sh"; args = [ "-e" builder ];
  outputs = [ "lib" "out" ]; buildInputs = "${dep.dev} ${dep}";
}
"""


def test_derivations_equal_nix_instantiate(scratch):
    """A fixed-output fetch, a two-output derivation using it (with strings
    that need escaping) and one using both of its outputs: the same .drv
    bytes, .drv paths and output paths as nix-instantiate makes."""
    blob = b"tarball contents\n"
    h = hashlib.sha256(blob)
    g = sg.Graph(random.Random(0), "/nix/store")
    P = lambda n: g.nodes[n].path  # noqa: E731
    builder = g.text("builder.sh", b'echo "building" > $out\n')
    src = g.fetched("src-1.0.tar.gz", blob)
    fod, _ = g.derivation("src-1.0.tar.gz", {}, [], "builtin:fetchurl", [], {
        "builder": "builtin:fetchurl", "name": "src-1.0.tar.gz", "system": sg.PLATFORM,
        "urls": "https://example.invalid/src-1.0.tar.gz", "preferLocalBuild": "1",
        "outputHash": sg.b32(h.digest()), "outputHashAlgo": "sha256", "outputHashMode": "flat"},
        fixed=(src, "sha256", h.hexdigest()))
    dep, dep_outs = g.derivation("dep-1.0", {fod: {"out"}}, [builder], "/bin/sh", ["-e", P(builder)], {
        "builder": "/bin/sh", "name": "dep-1.0", "system": sg.PLATFORM, "outputs": "out dev",
        "src": P(src), "note": 'tab\there "quoted" back\\slash'}, outs=("out", "dev"))
    app, app_outs = g.derivation("app-2.0", {dep: {"dev", "out"}}, [builder], "/bin/sh",
                                 ["-e", P(builder)], {
        "builder": "/bin/sh", "name": "app-2.0", "system": sg.PLATFORM, "outputs": "lib out",
        "buildInputs": f"{P(dep_outs['dev'])} {P(dep_outs['out'])}"}, outs=("lib", "out"))
    (scratch / "drv.nix").write_text(DERIVATIONS.replace("@HASH@", sg.b32(h.digest())))
    store = scratch / "store"
    drv = oracle(store, "nix-instantiate", str(scratch / "drv.nix")).stdout.decode().strip()
    assert drv.split("!")[0] == P(app)  # Nix names the first output: ...drv!lib
    for d, outs in ((app, app_outs), (dep, dep_outs), (fod, {"out": src})):
        assert (store / P(d).lstrip("/")).read_bytes() == g.nodes[d].tree[1]
        theirs = oracle(store, "nix-store", "-q", "--outputs", P(d)).stdout.split()
        assert sorted(theirs) == sorted(P(o).encode() for o in outs.values())


@pytest.fixture(scope="module")
def generated():
    top = support.scratch_dir()
    summary = sg.generate(top / "store", 2000, 5, roots=30, indirect=8, stale=3, quirks=2,
                          profiles=3, generations=4, users=2)
    yield top / "store", summary
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


def test_a_generated_store_passes_nix_s_checks(generated, scratch):
    """--verify --check-contents is clean (real NAR hashes and sizes);
    `nix store verify` finds every content-addressed path to be what its
    `ca` says (the rest, substituted outputs, are merely unsigned); and
    --load-db, which recomputes every .drv's outputs, accepts the DB."""
    root, _ = generated
    out = oracle(root, "nix-store", "--verify", "--check-contents")
    assert [line for line in out.stderr.decode().splitlines()
            if not line.startswith(("checking", "reading"))] == []
    out = oracle(root, "nix", "store", "verify", "--all", extra_config=NIX_COMMAND, check=False)
    untrusted = set(re.findall(rb"path '(\S+)' is untrusted", out.stderr))
    problems = [line for line in out.stderr.splitlines()
                if not line.startswith(b"checking") and b"is untrusted" not in line
                and b"paths are untrusted" not in line]
    assert problems == []
    plain = {r[0].encode() for r in rows(db_of(root), "SELECT path FROM ValidPaths WHERE ca IS "
                                                      "NULL AND ultimate IS NULL")}
    assert untrusted == plain and plain
    dump = oracle(root, "nix-store", "--dump-db").stdout
    for broken in (False, True):
        copy = scratch / f"load-{broken}"
        (copy / "nix").mkdir(parents=True)
        subprocess.run(["cp", "-a", str(root / "nix/store"), str(copy / "nix")], check=True)
        if broken:  # a control: one .drv whose outputs no longer match
            drv = next((copy / "nix/store").glob("*-curl-8.4.0.drv"))
            drv.chmod(0o644)
            drv.write_bytes(drv.read_bytes().replace(b'"x86_64-linux"', b'"x86_64-linuy"'))
        out = oracle(copy, "nix-store", "--load-db", input=dump, check=False)
        if broken:
            assert out.returncode != 0 and b"incorrect output" in out.stderr, out.stderr
        else:
            assert out.returncode == 0, out.stderr
            assert oracle(copy, "nix-store", "--dump-db").stdout == dump


def normalised_schema(db: Path) -> list:
    def norm(sql: str) -> str:  # without comments, and spaces only where they matter
        sql = re.sub(r"\s+", " ", re.sub(r"--[^\n]*", "", sql)).strip().lower()
        return re.sub(r" ?([(),;]) ?", r"\1", sql)
    return sorted((t, n, norm(sql or "")) for t, n, sql in rows(db, "SELECT type, name, sql "
                                                                    "FROM sqlite_master"))


def test_the_db_is_what_nix_creates(generated, scratch):
    root, _ = generated
    oracle(scratch / "empty", "nix-store", "--verify")  # Nix initialises a store
    ours, nix = db_of(root), db_of(scratch / "empty")
    assert normalised_schema(ours) == normalised_schema(nix)
    for pragma in ("journal_mode", "user_version", "page_size"):
        assert rows(ours, f"PRAGMA {pragma}") == rows(nix, f"PRAGMA {pragma}")
    assert (root / "nix/var/nix/db/schema").read_text() == "10"


def test_the_shape_of_a_workstation_store(generated):
    """Exactly N valid paths, of every kind, with the features the
    collector must get right."""
    root, summary = generated
    db = db_of(root)
    q = lambda sql: rows(db, sql)[0][0]  # noqa: E731
    assert q("SELECT count(*) FROM ValidPaths") == 2000 == summary["paths"]
    assert all(summary["by_kind"][k] > 0 for k in sg.KINDS)
    assert q("SELECT count(*) FROM Refs WHERE referrer = reference") > 10        # self-references
    assert q("SELECT count(*) FROM ValidPaths WHERE ultimate = 1") > 50          # built here
    assert q("SELECT count(*) FROM ValidPaths v WHERE deriver IS NOT NULL AND NOT EXISTS "
             "(SELECT 1 FROM ValidPaths d WHERE d.path = v.deriver)") > 50       # substituted
    assert q("SELECT count(*) FROM (SELECT path FROM DerivationOutputs GROUP BY path "
             "HAVING count(*) > 1)") >= 1                                        # duplicate fetches
    fan_in = sorted(r[0] for r in rows(db, "SELECT count(*) FROM Refs GROUP BY reference"))
    assert fan_in[-1] > 100 * fan_in[len(fan_in) // 2]                           # heavy-tailed
    state = root / "nix/var/nix"
    assert len(os.listdir(state / "gcroots/auto")) == 8 + 3 + 3 * 2
    assert sorted(p.relative_to(state / "profiles").as_posix() for p in (state / "profiles").rglob("*")
                  if p.is_symlink() and not p.name.endswith("-link")) == [
        "default", "per-user/alice/profile", "per-user/root/channels"]
    assert os.readlink(root / "home/alice/.nix-profile") == str(state / "profiles/per-user/alice/profile")
    out = oracle(root, "nix-env", "-p", str(state / "profiles/default"), "--list-generations")
    assert len(out.stdout.splitlines()) == 4 and b"(current)" in out.stdout.splitlines()[-1]


def test_the_smallest_store_and_refusals(scratch):
    sg.generate(scratch / "small", 40, 3, roots=2, indirect=0, stale=0, quirks=0)
    assert rows(db_of(scratch / "small"), "SELECT count(*) FROM ValidPaths") == [(40,)]
    for kw, message in ((dict(paths=39), "at least 40"),
                        (dict(paths=40, profiles=30, generations=30), "too few"),
                        (dict(paths=100, root=scratch / "small"), "exists already")):
        args = dict(root=scratch / "x", seed=1) | kw
        with pytest.raises(ValueError, match=message):
            sg.generate(args.pop("root"), args.pop("paths"), **args)
    with pytest.raises(ValueError, match="real /nix/store"):
        sg.generate("/", 100)


def test_same_seed_same_store(scratch):
    """Byte for byte, whatever Python's hash seed; only the root's own path
    (and the gcroots/auto names made from it) differ."""
    def snapshot(root: Path) -> dict:
        snap = {}
        for path, (mode, _, _, size, mtime, extra) in tree_snapshot(root).items():
            rel = path[len(os.fsencode(root)):]
            canonical = rel.startswith(b"/nix/store/") and not rel.startswith(b"/nix/store/.links")
            if isinstance(extra, bytes):
                extra = extra.replace(os.fsencode(root), b"ROOT")
            if b"/gcroots/auto/" in rel:  # named after the link's physical path
                rel = b"auto -> " + extra
            snap[rel] = (mode, size, mtime if canonical or b"-link" in rel else None, extra)
        return snap
    for root, hashseed in ((scratch / "a", "1"), (scratch / "b", "2")):
        subprocess.run([sys.executable, str(REPO / "tests/storegen.py"), "--root", str(root),
                        "--paths", "1500", "--seed", "7", "--quirks", "1"], check=True,
                       env=dict(os.environ, PYTHONHASHSEED=hashseed), stdout=subprocess.DEVNULL)
    dump = [oracle(scratch / r, "nix-store", "--dump-db").stdout for r in "ab"]
    assert dump[0] == dump[1]
    assert rows(db_of(scratch / "a"), "SELECT * FROM ValidPaths ORDER BY id") == \
        rows(db_of(scratch / "b"), "SELECT * FROM ValidPaths ORDER BY id")
    assert snapshot(scratch / "a") == snapshot(scratch / "b")


def test_expected_sets_are_nix_s_answers(scratch):
    """--expected runs nix-store on a copy: the store keeps its stale links
    and temp roots files, and the sets equal what Nix answers on the store."""
    root, expected = scratch / "store", scratch / "expected"
    summary = sg.generate(root, 600, 11, roots=20, indirect=5, stale=3, quirks=1,
                          expected=str(expected))
    before = tree_snapshot(root)
    theirs = {w: oracle(root, "nix-store", "--gc", f"--print-{w}").stdout for w in ("dead", "live")}
    roots = oracle(root, "nix-store", "--gc", "--print-roots").stdout
    theirs["roots"] = b"".join(line + b"\n" for line in roots.split(b"\n")[:-1]
                               if not line.startswith(b"/proc/"))
    for w in ("roots", "live", "dead"):
        assert (expected / f"{w}.txt").read_bytes() == theirs[w]
        assert summary["expected"][w] == theirs[w].count(b"\n") > 0
    assert len([p for p in before if b"/gcroots/auto/" in p]) > \
        len(os.listdir(root / "nix/var/nix/gcroots/auto"))  # Nix just removed the stale ones


SHARED = Path(os.environ.get("GCROOTS_SHARED", REPO.parent / "shared"))


@pytest.mark.skipif(not (SHARED / "tools/make_store.py").exists(),
                    reason=f"optional cross-check: {SHARED}/tools/make_store.py is absent")
def test_conventions_equal_make_store(scratch):
    """Where ../shared exists (set GCROOTS_SHARED to point elsewhere): its
    make_store.py hashes as we do, and lays out a store with the same
    parameters the same way (profiles, root directories, users' homes)."""
    spec = importlib.util.spec_from_file_location("make_store", SHARED / "tools/make_store.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    rng = random.Random(3)
    h = ms.Hasher("/nix/store")
    for _ in range(200):
        data = rng.randbytes(rng.randrange(1, 64))
        d = hashlib.sha256(data).digest()
        assert sg.b32(d) == ms.b32(d) and sg.b32(d[:20]) == ms.b32(d[:20])
        assert sg.text_path("t", d, [], "/nix/store") == h.text_path("t", data, [])[0]
        assert sg.fixed_path("s", d, True, "/nix/store") == h.source_path("s", d)
        assert sg.fixed_path("f", d, False, "/nix/store") == h.fixed_flat_path("f", d)
        tree = ("d", {"a": ("f", data), "b": ("x", data), "c": ("l", "a")})
        theirs = ("d", [("a", ("f", data, False)), ("b", ("f", data, True)), ("c", ("l", "a"))])
        assert sg.nar(tree) == ms.nar_bytes(theirs)
    args = dict(paths=800, roots=20, indirect=6, stale=2, quirks=1, profiles=4, generations=3, users=2)
    sg.generate(scratch / "ours", seed=1, **args)
    subprocess.run([sys.executable, str(SHARED / "tools/make_store.py"), "--root",
                    str(scratch / "theirs"), "--seed", "1"] + [f"--{k}={v}" for k, v in args.items()],
                   check=True, stdout=subprocess.DEVNULL)

    def layout(root: Path) -> set:
        state = root / "nix/var/nix"
        dirs = {p.relative_to(root).as_posix() for p in (root / "nix/var/nix").rglob("*") if p.is_dir()
                and not p.is_symlink()}
        profiles = {p.relative_to(state).as_posix() for p in (state / "profiles").rglob("*")
                    if p.is_symlink() and not p.name.endswith("-link")}
        return dirs | profiles | {p.name for p in (root / "home").iterdir()} | {
            len(os.listdir(state / "gcroots/auto")), len(rows(db_of(root), "SELECT id FROM ValidPaths"))}
    assert layout(scratch / "ours") == layout(scratch / "theirs")
