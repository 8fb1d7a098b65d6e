#!/usr/bin/env python3
"""storegen: realistic, deterministic Nix 2.8 stores for the tests and benchmarks.

    python3 tests/storegen.py --root DIR --paths N [--seed S] [--roots R]
        [--indirect I] [--stale K] [--quirks Q] [--profiles P --generations G]
        [--users U] [--expected OUTDIR]

writes a store of exactly N valid paths to DIR/nix/store and its state to
DIR/nix/var/nix (Nix's chroot store: `nix-store --store DIR`; the logical
store dir stays /nix/store), and prints a JSON summary.  With `--root /
--store-dir D --state-dir V` the store lives where it claims to (Nix's
NIX_STORE_DIR/NIX_STATE_DIR; hashes then differ, as the store dir is part of
every store path).  Standard library only; as root (store dirs are 0555).

What Nix 2.8 can check is real: store paths are computed as Nix computes
them (`text:` for .drv files, builtins.toFile and manifests, `source:` for
path literals, fixed-output fetches, and input-addressed outputs through
hashDerivationModulo), so `nix-store --load-db` accepts every .drv and `nix
store verify` every content-addressed path; NAR hashes and sizes in the DB
are those of the files written (`nix-store --verify --check-contents` is
clean); the DB is schema 10 with Nix's tables, indices and trigger, in WAL
mode.

The shape is that of a workstation's store: bootstrap packages, language
families, heavy-tailed build dependencies (popular packages early),
multiple outputs, self-references, duplicate fixed-output fetches, and the
store filled with what people do -- substituted outputs (whose deriver is
not in the store), local builds (.drv closure, outputs, build inputs),
instantiations, nix-shells, and profiles of real nix-env user environments.
Roots: direct links (gcroots/hydra, gcroots/per-user/USER, top level),
indirect ones (gcroots/auto -> HOME/USER/src/.../result), stale ones,
profiles' generations, and with --quirks Q, Q of each of Nix's edge cases: a
link to an invalid path, a relative link into the store, a link into a
store path, a regular file named like a store path, auto links to a regular
file, to a link out of the store and to a link to a link, an unregistered
path on disk, and a temp roots file whose process is gone.

Expected roots/live/dead sets (--expected) are the real nix-store's answers
on a copy of the store (tests/nix-oracle), never this generator's opinion.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time

ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nix-oracle")
PLATFORM = "x86_64-linux"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")

# -- Nix's hashing (src/libutil/hash.cc, src/libstore/store-api.cc) ------------------------

B32_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"   # no e, o, u, t
_PAIRS = [a + b for a in B32_CHARS for b in B32_CHARS]


def b32(digest: bytes) -> str:
    """Nix's base-32: the 5-bit digits of the little-endian number, most
    significant first (two digits per table lookup)."""
    n = (len(digest) * 8 - 1) // 5 + 1
    v = int.from_bytes(digest, "little")
    pairs = "".join([_PAIRS[(v >> k) & 1023] for k in range(10 * (n // 2) - 10, -1, -10)])
    return B32_CHARS[v >> (n - 1) * 5] + pairs if n % 2 else pairs


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_path(kind: str, hex_digest: str, name: str, store_dir: str) -> str:
    """makeStorePath: the sha256 of "kind:sha256:HEX:STOREDIR:NAME", XOR-folded
    to 20 bytes (compressHash), in base 32."""
    h = hashlib.sha256(f"{kind}:sha256:{hex_digest}:{store_dir}:{name}".encode()).digest()
    folded = (int.from_bytes(h[:20], "little") ^ int.from_bytes(h[20:], "little")).to_bytes(20, "little")
    return f"{store_dir}/{b32(folded)}-{name}"


def text_path(name: str, digest: bytes, refs: list[str], store_dir: str) -> str:
    """makeTextPath (builtins.toFile, .drv files), from the sha256 of the contents."""
    return store_path("text" + "".join(":" + r for r in sorted(refs)), digest.hex(), name, store_dir)


def fixed_path(name: str, digest: bytes, recursive: bool, store_dir: str) -> str:
    """makeFixedOutputPath for sha256, without references: `source` for a NAR
    hash (path literals, nix-store --add, recursive fetches), else a flat file."""
    if recursive:
        return store_path("source", digest.hex(), name, store_dir)
    return store_path("output:out", sha256_hex(f"fixed:out:sha256:{digest.hex()}:".encode()), name,
                      store_dir)


def auto_root_name(link: str) -> str:
    """The gcroots/auto entry Nix's addIndirectRoot makes for `link`."""
    return b32(hashlib.sha1(link.encode()).digest())


# -- NAR (src/libutil/archive.cc) ------------------------------------------------------------
# A tree is ("f", bytes) a file, ("x", bytes) an executable, ("l", target) a
# symlink, or ("d", {name: tree}) a directory.

def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b + bytes(-len(b) % 8)


_MAGIC = _s(b"nix-archive-1")
_OPEN, _CLOSE = _s(b"("), _s(b")")
_FILE = _OPEN + _s(b"type") + _s(b"regular") + _s(b"contents")
_EXEC = _OPEN + _s(b"type") + _s(b"regular") + _s(b"executable") + _s(b"") + _s(b"contents")
_LINK = _OPEN + _s(b"type") + _s(b"symlink") + _s(b"target")
_DIR = _OPEN + _s(b"type") + _s(b"directory")
_ENTRY, _NODE = _s(b"entry") + _OPEN + _s(b"name"), _s(b"node")


def nar(tree) -> bytes:
    out = [_MAGIC]
    _nar(tree, out)
    return b"".join(out)


def _nar(tree, out: list) -> None:
    kind, body = tree
    if kind == "d":
        out.append(_DIR)
        for name in sorted(body):
            out += (_ENTRY, _s(name.encode()), _NODE)
            _nar(body[name], out)
            out.append(_CLOSE)
        out.append(_CLOSE)
    else:
        out += ({"f": _FILE, "x": _EXEC, "l": _LINK}[kind],
                _s(body.encode() if kind == "l" else body), _CLOSE)


def write_tree(path: str, tree) -> None:
    """Canonicalised as Nix leaves store paths: mtime 1, 0444/0555."""
    kind, body = tree
    if kind == "d":
        os.mkdir(path, 0o555)
        for name, child in body.items():
            write_tree(path + "/" + name, child)
    elif kind == "l":
        os.symlink(body, path)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o555 if kind == "x" else 0o444)
        os.write(fd, body)
        os.close(fd)
    os.utime(path, (1, 1), follow_symlinks=False)


# -- derivations (src/libstore/derivations.cc: unparse, hashDerivationModulo) ----------------

_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _str(s: str) -> str:
    if '"' in s or "\\" in s or "\n" in s or "\r" in s or "\t" in s:
        s = s.translate(_ESCAPES)
    return '"' + s + '"'


def _inputs(inputs: dict[str, set[str]]) -> str:
    """inputDrvs by path, or by their derivations' modulo hashes: key -> output names."""
    return ",".join([f'("{k}",[' + ",".join([f'"{x}"' for x in sorted(v)]) + "])"
                     for k, v in sorted(inputs.items())])


class ATerm:
    """Derivation::unparse of one derivation in its variants (outputs masked
    or not, inputs by path or modulo hash); the parts they share are escaped
    once.  Store paths, output names and the platform are printed unescaped,
    as Nix does."""

    def __init__(self, srcs: list[str], builder: str, args: list[str], env: dict[str, str],
                 outs, platform: str):
        self.mid = ("],[" + ",".join([f'"{x}"' for x in sorted(srcs)]) + f'],"{platform}",'
                    + _str(builder) + ",[" + ",".join([_str(a) for a in args]) + "],[")
        self.keys = sorted({*env, *outs})
        self.env = {k: f"({_str(k)},{_str(v)})" for k, v in env.items() if k not in outs}

    def text(self, outputs: list[tuple[str, str, str, str]], inputs: str) -> str:
        """outputs: (name, path or "" when masked, method:algo, hex); inputs: from _inputs()."""
        paths = {o[0]: o[1] for o in outputs}
        env = self.env
        return ("Derive([" + ",".join([f'("{o}","{p}","{a}","{h}")' for o, p, a, h in sorted(outputs)])
                + "],[" + inputs + self.mid
                + ",".join([env[k] if k in env else f'({_str(k)},"{paths[k]}")' for k in self.keys])
                + "])")


# -- the graph ------------------------------------------------------------------------------

DRV, OUT, FOD, SRC, TEXT, ENV = range(6)
KINDS = ("drv", "output", "fixed_output", "source", "text", "user_env")


class Node:
    __slots__ = ("path", "kind", "refs", "self_ref", "deriver", "ca", "tree", "outputs", "ultimate",
                 "pkg", "oname")

    def __init__(self, path, kind, refs=(), tree=None, ca=None, deriver=-1, oname=None):
        self.path, self.kind, self.refs, self.tree, self.ca = path, kind, refs, tree, ca
        self.deriver, self.oname, self.pkg = deriver, oname, None
        self.self_ref = False
        self.outputs: list[tuple[str, int]] = []   # a .drv's (output name, node)
        self.ultimate = None


class Package:
    __slots__ = ("name", "pname", "drv", "outs", "inputs", "src")

    def __init__(self, pname: str, version: str):
        self.pname = pname
        self.name = pname + ("-" + version if version else "")
        self.drv, self.outs, self.inputs, self.src = -1, {}, {}, -1

    def main(self) -> str:
        return "lib" if "lib" in self.outs else "out"


# name, version, indices of build inputs, outputs
CORE = [("bootstrap-tools", "", (), ("out",)), ("glibc", "2.37-8", (0,), ("bin", "dev", "out")),
        ("zlib", "1.3", (0, 1), ("dev", "out")), ("binutils", "2.40", (0, 1, 2), ("out",)),
        ("gcc", "12.3.0", (0, 1, 2, 3), ("lib", "man", "out")),
        ("bash", "5.2-p15", (0, 1), ("dev", "man", "out")),
        ("coreutils", "9.3", (0, 1), ("info", "out")), ("gnumake", "4.4.1", (0, 1), ("out",)),
        ("gnused", "4.9", (0, 1), ("out",)), ("gnugrep", "3.11", (0, 1), ("out",)),
        ("openssl", "3.0.10", (0, 1, 2), ("bin", "dev", "out")),
        ("curl", "8.4.0", (0, 1, 2, 10), ("bin", "dev", "out")),
        ("stdenv-linux", "", (0, 1, 3, 4, 5, 6, 7, 8, 9), ("out",))]
BASH, GLIBC, CURL, STDENV = 5, 1, 11, 12
FAMILIES = [("python3.11-", "python3", "3.11.6", 0.35), ("haskell-", "ghc", "9.4.7", 0.2),
            ("perl5.38.0-", "perl", "5.38.0", 0.15), ("node-", "nodejs", "20.9.0", 0.15),
            ("ocaml4.14.1-", "ocaml", "4.14.1", 0.08), ("lua5.4-", "lua", "5.4.6", 0.07)]
OUTPUT_SETS = [(55, ("out",)), (17, ("dev", "out")), (10, ("dev", "lib", "out")),
               (8, ("bin", "dev", "out")), (5, ("dev", "man", "out")),
               (5, ("bin", "dev", "doc", "lib", "man", "out"))]
RANK = {"lib": 0, "out": 1, "bin": 2, "dev": 3, "man": 4, "doc": 4, "info": 4}  # refs go down only
_ONSET = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl pr sk sl sp st tr".split()
_NUCLEUS = "a e i o u ai ea io ou y".split()
_CODA = ["", "", "n", "r", "s", "x", "m", "ck", "ng", "rd", "lt", "sh", "p", "z"]


class Graph:
    """Every path that could be in the store; the store is a closed subset."""

    def __init__(self, rng: random.Random, store_dir: str):
        self.rng, self.sd = rng, store_dir
        self.nodes: list[Node] = []
        self.index: dict[str, int] = {}
        self.modulo: dict[int, str] = {}     # .drv -> hashDerivationModulo (unmasked), hex
        self.pkgs: list[Package] = []
        self.names: set[str] = set()
        self.fods: list[int] = []            # fetched outputs another fetch may duplicate

    def populate(self, n_packages: int) -> None:
        rng = self.rng
        self.builder_sh = self.source("default-builder.sh", ("f", b"source $stdenv/setup\ngenericBuild\n"))
        self.fetch_sh = self.source("fetchurl-builder.sh", (
            "f", b"source $stdenv/setup\ncurl --fail --location \"$urls\" --output \"$out\"\n"))
        self.mirrors = self.text("mirrors-list", b"sourceforge=https://downloads.example.invalid/\n")
        self.setup = self.source("setup.sh", ("f", b"genericBuild() { :; }\n"))
        for pname, version, deps, outs in CORE:
            self.package(Package(pname, version), [self.pkgs[d] for d in deps], outs)
        families = []   # (prefix, base package, members, weight)
        for _ in range(n_packages - len(CORE)):
            family = base = None
            if len(self.pkgs) >= len(CORE) + 5 and len(families) < len(FAMILIES) and rng.random() < 0.2:
                prefix, pname, version, weight = FAMILIES[len(families)]
                pkg, outs = Package(pname, version), ("out",)
                base = (prefix, pkg, [], weight)
            else:
                if families and rng.random() < 0.5:
                    family = rng.choices(families, weights=[f[3] for f in families])[0]
                pkg = Package((family[0] if family else "") + self.fresh_name(), self.version())
                outs = rng.choices([o for _, o in OUTPUT_SETS], [w for w, _ in OUTPUT_SETS])[0]
            self.package(pkg, self.pick_deps(family), outs)
            if base:
                families.append(base)
            elif family:
                family[2].append(pkg)

    # -- paths
    def add(self, node: Node) -> int:
        """The node's id; the same path twice is one node (identical user environments)."""
        got = self.index.get(node.path)
        if got is None:
            got = self.index[node.path] = len(self.nodes)
            self.nodes.append(node)
        return got

    def text(self, name: str, content: bytes, refs: tuple = ()) -> int:
        digest = hashlib.sha256(content).digest()
        path = text_path(name, digest, [self.nodes[r].path for r in refs], self.sd)
        return self.add(Node(path, TEXT, tuple(sorted(set(refs))), ("f", content),
                             "text:sha256:" + b32(digest)))

    def source(self, name: str, tree, kind: int = SRC) -> int:
        digest = hashlib.sha256(nar(tree)).digest()
        return self.add(Node(fixed_path(name, digest, True, self.sd), kind, (), tree,
                             "fixed:r:sha256:" + b32(digest)))

    def fetched(self, name: str, data: bytes) -> int:
        """A flat fixed-output path (a fetched tarball); recursive ones are source()s."""
        digest = hashlib.sha256(data).digest()
        return self.add(Node(fixed_path(name, digest, False, self.sd), FOD, (), ("f", data),
                             "fixed:sha256:" + b32(digest)))

    def derivation(self, name: str, inputs: dict[int, set[str]], srcs: list[int], builder: str,
                   args: list[str], env: dict[str, str], outs=("out",), fixed=None,
                   platform: str = PLATFORM) -> tuple[int, dict[str, int]]:
        """A .drv and its outputs.  fixed: (output node, method:algo, hex) of a
        fixed-output derivation, whose output exists already."""
        nodes = self.nodes
        real_inputs = _inputs({nodes[d].path: v for d, v in inputs.items()})
        if fixed is not None:
            out, algo, hexd = fixed
            paths = {"out": nodes[out].path}
            env["out"] = paths["out"]
            outputs = [("out", paths["out"], algo, hexd)]
            content = ATerm([nodes[s].path for s in srcs], builder, args, env, (),
                            platform).text(outputs, real_inputs)
            modulo = sha256_hex(f"fixed:out:{algo}:{hexd}:{paths['out']}".encode())
        else:
            term = ATerm([nodes[s].path for s in srcs], builder, args, env, outs, platform)
            by_hash = {}     # inputs modulo their own derivations' hashes
            for d, names in inputs.items():
                by_hash.setdefault(self.modulo[d], set()).update(names)
            by_hash = _inputs(by_hash)
            h = sha256_hex(term.text([(o, "", "", "") for o in outs], by_hash).encode())
            paths = {o: store_path("output:" + o, h, name if o == "out" else f"{name}-{o}", self.sd)
                     for o in outs}
            env.update(paths)
            outputs = [(o, p, "", "") for o, p in paths.items()]
            modulo = sha256_hex(term.text(outputs, by_hash).encode())
            content = term.text(outputs, real_inputs)
        content = content.encode()
        refs = tuple(sorted({*inputs, *srcs}))
        drv = self.text(name + ".drv", content, refs)
        nodes[drv].kind = DRV
        self.modulo[drv] = modulo
        if fixed is None:
            out_ids = {o: self.add(Node(p, OUT, deriver=drv, oname=o)) for o, p in paths.items()}
        else:
            out_ids = {"out": fixed[0]}
            if nodes[fixed[0]].deriver < 0:
                nodes[fixed[0]].deriver = drv    # a duplicate fetch keeps the first deriver
        nodes[drv].outputs = sorted(out_ids.items())
        return drv, out_ids

    # -- packages
    def fresh_name(self) -> str:
        rng = self.rng
        while True:
            s = "".join(rng.choice(_ONSET) + rng.choice(_NUCLEUS) + rng.choice(_CODA)
                        for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.2:
                s = "lib" + s
            # nix-collect-garbage -d takes any link whose target contains "link" for a profile
            if "link" not in s and s not in self.names:
                self.names.add(s)
                return s

    def version(self) -> str:
        r = self.rng
        return (f"{r.randint(0, 12)}.{r.randint(0, 30)}.{r.randint(0, 20)}" if r.random() < 0.8
                else f"unstable-2023-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}")

    def pick_deps(self, family) -> list[Package]:
        """Heavy-tailed in number, preferring early (popular) packages."""
        rng, first, deps = self.rng, len(CORE), {}
        for _ in range(1 + min(30, int(rng.paretovariate(1.5)))):
            if family and family[2] and rng.random() < 0.6:
                d = family[2][int(len(family[2]) * rng.random() ** 2.5)]
            elif len(self.pkgs) > first:
                d = self.pkgs[first + int((len(self.pkgs) - first) * rng.random() ** 2.5)]
            else:
                continue
            deps[id(d)] = d
        if family:
            deps[id(family[1])] = family[1]
        return list(deps.values())

    def fetch(self, pkg: Package) -> tuple[int, int]:
        """The package's source: a fixed-output fetch of a tarball (flat) or a
        git checkout (recursive); now and then the same content from another
        URL (a second .drv, one output)."""
        rng, core = self.rng, len(self.pkgs) < len(CORE)
        salt = ""
        if self.fods and rng.random() < 0.02:
            out = rng.choice(self.fods)
            salt = f"?mirror={len(self.pkgs)}"
        else:
            blob = f"{pkg.name} source {rng.getrandbits(64)}\n".encode() * rng.randint(1, 8)
            if rng.random() < 0.3:
                tree = ("d", {"README": ("f", blob), "configure": ("x", b"#!/bin/sh\nexit 0\n")})
                out = self.source("source", tree, FOD)
            else:
                out = self.fetched(f"{pkg.name}.tar.{rng.choice(['gz', 'gz', 'xz', 'bz2'])}", blob)
            if rng.random() < 0.1:
                self.fods.append(out)
        node = self.nodes[out]
        recursive = node.ca.startswith("fixed:r:")
        hexd = (hashlib.sha256(nar(node.tree)) if recursive else hashlib.sha256(node.tree[1])).hexdigest()
        name = node.path[len(self.sd) + 34:]  # after "<store dir>/<hash>-"
        url = (f"https://git.example.invalid/{pkg.pname}.git" if recursive
               else f"mirror://sourceforge/{pkg.pname}/{name}") + salt
        env = {"name": name, "outputHash": b32(bytes.fromhex(hexd)), "outputHashAlgo": "sha256",
               "outputHashMode": "recursive" if recursive else "flat", "preferLocalBuild": "1",
               "system": PLATFORM, "urls": url}
        if core:
            inputs, srcs, builder, args = {}, [], "builtin:fetchurl", []
        else:
            curl, bash = self.pkgs[CURL], self.pkgs[BASH]
            inputs, srcs = {curl.drv: {"bin"}, self.pkgs[STDENV].drv: {"out"}}, [self.fetch_sh, self.mirrors]
            builder = self.nodes[bash.outs["out"]].path + "/bin/bash"
            args = ["-e", self.nodes[self.fetch_sh].path]
            env["nativeBuildInputs"] = self.nodes[curl.outs["bin"]].path
        env["builder"] = builder
        drv, _ = self.derivation(name, inputs, srcs, builder, args, env,
                                 fixed=(out, "r:sha256" if recursive else "sha256", hexd))
        return drv, out

    def package(self, pkg: Package, deps: list[Package], outs: tuple[str, ...]) -> None:
        rng, nodes = self.rng, self.nodes
        core = len(self.pkgs) < len(CORE)
        fetch_drv, src = self.fetch(pkg)
        inputs = {fetch_drv: {"out"}}
        if not core:
            inputs[self.pkgs[STDENV].drv] = {"out"}
            inputs[self.pkgs[BASH].drv] = {"out"}
        for d in deps:
            want = {"dev"} if "dev" in d.outs else {d.main()}
            if "dev" in d.outs and rng.random() < 0.3:
                want.add(d.main())
            inputs.setdefault(d.drv, set()).update(want)
        srcs = [self.builder_sh] + ([self.setup] if pkg.pname == "stdenv-linux" else [])
        while not core and rng.random() < 0.15 and len(srcs) < 4:
            patch = f"{pkg.pname}-fix-{len(srcs)}.patch"
            diff = f"--- a/{patch}\n+++ b/{patch}\n@@ {rng.getrandbits(32)} @@\n"
            srcs.append(self.source(patch, ("f", diff.encode())))
        if not self.pkgs:
            builder = "/bin/sh"
        else:
            builder = nodes[self.pkgs[0 if core else BASH].outs["out"]].path + "/bin/bash"
        env = {"builder": builder, "name": pkg.name, "pname": pkg.pname, "outputs": " ".join(outs),
               "src": nodes[src].path, "system": PLATFORM,
               "buildInputs": " ".join(nodes[d.outs[o]].path for d in deps for o in sorted(inputs[d.drv]))}
        if len(srcs) > 1:
            env["patches"] = " ".join(nodes[s].path for s in srcs[1:])
        if not core:
            env["stdenv"] = nodes[self.pkgs[STDENV].outs["out"]].path
        pkg.drv, pkg.outs = self.derivation(pkg.name, inputs, srcs, builder,
                                            ["-e", nodes[self.builder_sh].path], env, outs)
        pkg.inputs, pkg.src = inputs, src
        glibc = () if pkg.pname in ("bootstrap-tools", "glibc") else (self.pkgs[GLIBC].outs["out"],)
        for o, nid in pkg.outs.items():     # runtime references: what a scan of the build finds
            refs: set[int] = set()
            if RANK[o] <= 2:
                refs.update(d.outs[d.main()] for d in deps if rng.random() < 0.7)
                refs.update(g for g in glibc if rng.random() < 0.8)
                for lower in ("lib", "out"):
                    if RANK[lower] < RANK[o] and lower in pkg.outs and rng.random() < 0.8:
                        refs.add(pkg.outs[lower])
                nodes[nid].self_ref = rng.random() < 0.2
            elif o == "dev":
                refs.update(pkg.outs[x] for x in ("lib", "out") if x in pkg.outs)
                refs.update(d.outs["dev"] for d in deps if "dev" in d.outs and rng.random() < 0.3)
            refs.discard(nid)
            nodes[nid].refs, nodes[nid].pkg = tuple(sorted(refs)), pkg
        self.pkgs.append(pkg)

    def user_env(self, pkgs: list[Package]) -> tuple[int, int]:
        """What nix-env makes: env-manifest.nix, a builtin:buildenv .drv, and
        the environment (links to the packages and the manifest)."""
        nodes = self.nodes
        outs = [p.outs["bin" if "bin" in p.outs else "out"] for p in pkgs]
        manifest = "[ " + " ".join(
            f'{{ meta = {{ }}; name = "{p.name}"; out = {{ outPath = "{nodes[o].path}"; }}; '
            f'outPath = "{nodes[o].path}"; outputs = [ "out" ]; system = "{PLATFORM}"; '
            'type = "derivation"; }' for p, o in zip(pkgs, outs)) + " ]"
        man = self.text("env-manifest.nix", manifest.encode(), tuple(outs))
        env = {"builder": "builtin:buildenv", "manifest": nodes[man].path, "name": "user-environment",
               "derivations": " ".join(f"true 5 1 {nodes[o].path}" for o in outs),
               "preferLocalBuild": "1", "allowSubstitutes": "", "system": "builtin"}
        drv, out = self.derivation("user-environment", {}, [man], "builtin:buildenv", [], env,
                                   platform="builtin")
        node = nodes[out["out"]]
        node.kind, node.refs = ENV, tuple(sorted({*outs, man}))
        node.tree = ("d", {**{p.pname: ("l", nodes[o].path) for p, o in zip(pkgs, outs)},
                           "manifest.nix": ("l", nodes[man].path)})
        return drv, out["out"]

    def tree(self, node: Node):
        """What an output holds; its files name its references, as real binaries do."""
        if node.tree is not None:
            return node.tree
        pkg, o = node.pkg, node.oname
        refs = [self.nodes[r].path for r in node.refs] + ([node.path] if node.self_ref else [])
        body = (f"# {pkg.name} ({o})\n" + "".join(r + "\n" for r in refs)).encode()
        p = pkg.pname
        if o == "out":
            return ("d", {"bin": ("d", {p: ("x", b"#!/bin/sh\n" + body)})} if len(p) % 2
                    else {"lib": ("d", {f"lib{p}.so": ("f", body)})})
        if o == "lib":
            return ("d", {"lib": ("d", {f"lib{p}.so.1": ("f", body)})})
        if o == "bin":
            return ("d", {"bin": ("d", {p: ("x", b"#!/bin/sh\n" + body)})})
        if o == "dev":
            return ("d", {"include": ("d", {p + ".h": ("f", body)}),
                          "nix-support": ("d", {"propagated-build-inputs": ("f", body)})})
        return ("d", {"share": ("d", {o: ("d", {p + ".txt": ("f", body)})})})


class Selection:
    """A closed set of nodes, in registration order (references first)."""

    def __init__(self, graph: Graph, budget: int):
        self.g, self.budget = graph, budget
        self.present: set[int] = set()
        self.order: list[int] = []

    def left(self) -> int:
        return self.budget - len(self.order)

    def add(self, starts, ultimate=()) -> list[int] | None:
        """Add the closure of `starts`; None (and nothing added) if it does not fit."""
        nodes, present, limit = self.g.nodes, self.present, self.left()
        new: list[int] = []
        seen: set[int] = set()
        for s in starts:
            if s in present or s in seen:
                continue
            seen.add(s)
            stack = [(s, iter(nodes[s].refs))]
            while stack:
                nid, it = stack[-1]
                for r in it:
                    if r not in present and r not in seen:
                        seen.add(r)
                        stack.append((r, iter(nodes[r].refs)))
                        break
                else:
                    stack.pop()
                    new.append(nid)
                    if len(new) > limit:
                        return None
        present.update(new)
        self.order += new
        for u in ultimate:
            nodes[u].ultimate = 1
        return new


# -- the store ------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null,
  hash text not null, registrationTime integer not null, deriver text, narSize integer,
  ultimate integer, sigs text, ca text);
CREATE TABLE Refs (referrer integer not null, reference integer not null,
  primary key (referrer, reference),
  foreign key (referrer) references ValidPaths(id) on delete cascade,
  foreign key (reference) references ValidPaths(id) on delete restrict);
CREATE INDEX IndexReferrer on Refs(referrer);
CREATE INDEX IndexReference on Refs(reference);
CREATE TRIGGER DeleteSelfRefs before delete on ValidPaths
  begin delete from Refs where referrer = old.id and reference = old.id; end;
CREATE TABLE DerivationOutputs (drv integer not null, id text not null, path text not null,
  primary key (drv, id), foreign key (drv) references ValidPaths(id) on delete cascade);
CREATE INDEX IndexDerivationOutputs on DerivationOutputs(path);
"""


def _phys(root: str, logical: str) -> str:
    return logical if root == "/" else root + logical


def generate(root, paths: int, seed: int = 1, *, roots: int = 50, indirect: int = 10, stale: int = 3,
             quirks: int = 1, profiles: int = 2, generations: int = 3, users: int = 2,
             epoch: int = 1700000000, store_dir: str = "/nix/store", state_dir: str = "/nix/var/nix",
             home: str | None = None, expected: str | None = None) -> dict:
    """Write the store and return a summary; see the module doc."""
    enabled = gc.isenabled()
    gc.disable()  # the cyclic collector would walk the growing graph over and over: a third of the time
    try:
        return _generate(root, paths, seed, roots, indirect, stale, quirks, profiles, generations,
                         users, epoch, store_dir, state_dir, home, expected)
    finally:
        if enabled:
            gc.enable()


def _generate(root, paths, seed, roots, indirect, stale, quirks, profiles, generations, users, epoch,
              store_dir, state_dir, home, expected) -> dict:
    t0 = time.monotonic()
    root = os.path.abspath(root)
    if root == "/" and store_dir == "/nix/store":
        raise ValueError("refusing to generate into the real /nix/store")
    if root != "/" and (store_dir, state_dir) != ("/nix/store", "/nix/var/nix"):
        raise ValueError("--store-dir/--state-dir need --root /")
    if expected is not None and root == "/":
        raise ValueError("--expected needs a chroot store (--root DIR)")
    if paths < 40:
        raise ValueError("a store needs at least 40 paths (the bootstrap closure)")
    rng = random.Random(seed)
    g = Graph(rng, store_dir)
    g.populate(max(40, paths * 3 // 10))
    nodes, sel = g.nodes, Selection(g, paths)
    users_ = list(USERS[:max(1, users)])
    regular = g.pkgs[len(CORE):] or g.pkgs

    def app() -> Package:  # what people install: late, leaf-like packages
        return regular[min(len(regular) - 1, int(len(regular) * (1 - rng.random() ** 2)))]

    # Profiles first: their closures must fit.
    profile_links = [f"{state_dir}/profiles/default", f"{state_dir}/profiles/per-user/root/channels"]
    for k in range(2, profiles):
        u, j = users_[(k - 2) % len(users_)], (k - 2) // len(users_)
        profile_links.append(f"{state_dir}/profiles/per-user/{u}/"
                             + (("profile", "channels", "dev-env", "work")[j] if j < 4 else f"env-{j}"))
    gens = []   # (profile, number, env node, mtime)
    items = []  # (kind, node to root)
    for pi in range(profiles):
        installed = [app() for _ in range(rng.randint(2, 8))]
        for n in range(1, generations + 1):
            if n > 1:
                r = rng.random()
                if r < 0.45 or not installed:
                    installed.append(app())
                elif r < 0.65:
                    installed.pop(rng.randrange(len(installed)))
                else:
                    installed[rng.randrange(len(installed))] = app()
            installed = list({id(p): p for p in installed}.values())
            while True:
                mark = len(nodes)
                drv, env = g.user_env(installed)
                if sel.add([env, drv], [env]) is not None:
                    break
                if not installed:
                    raise ValueError(f"{paths} paths are too few for {profiles} profiles x "
                                     f"{generations} generations")
                for nd in nodes[mark:]:       # forget the environment that did not fit
                    if g.index.get(nd.path, -1) >= mark:
                        del g.index[nd.path]
                del nodes[mark:]
                installed = installed[:len(installed) // 2]
            gens.append((pi, n, env, epoch - (generations - n) * 3 * 86400 - pi * 3600))
            items.append(("profile", env))

    # What people did: substitute, build, instantiate, enter shells.
    fill = paths // 100
    misses = 0
    while sel.left() > fill and misses < 200:
        p = regular[rng.randrange(len(regular))] if rng.random() < 0.6 else app()
        r = rng.random()
        inputs = [oid for d, want in p.inputs.items() for o, oid in nodes[d].outputs if o in want]
        if r < 0.45:
            kind, starts, ultimate = "subst", [p.outs[p.main()]] + [
                v for v in p.outs.values() if rng.random() < 0.3], ()
        elif r < 0.7:
            kind, starts, ultimate = "built", [p.drv, *p.outs.values(), p.src, *inputs], p.outs.values()
        elif r < 0.85:
            kind, starts, ultimate = "inst", [p.drv], ()
        else:
            kind, starts, ultimate = "shell", [p.drv, *inputs], ()
        new = sel.add(starts, ultimate)
        if not new:
            misses += 1
            continue
        misses = 0
        items.append((kind, p.outs[p.main()] if kind in ("subst", "built") else p.drv))
    n_fill = 0
    while sel.left() > 0:   # the rest: builtins.toFile results and path literals
        n_fill += 1
        if rng.random() < 0.5:
            nid = g.text(rng.choice(["flake", "config", "options"]) + ".json",
                         f'{{"seed":{seed},"n":{n_fill}}}\n'.encode())
        else:
            nid = g.source("source", ("d", {"default.nix": ("f", f"{{ pkgs }}: pkgs.hello # {n_fill}\n".encode())}))
        sel.add([nid])
        items.append(("filler", nid))
    unregistered = [g.source(f"partial-build-{q}", ("d", {"log": ("f", b"interrupted\n")}))
                    for q in range(quirks)]
    t_graph = time.monotonic()

    # Files.
    real_store, state = _phys(root, store_dir), _phys(root, state_dir)
    home = home or os.path.join(root, "home")
    if os.path.exists(real_store + "/.links") or os.path.exists(state + "/db/db.sqlite"):
        raise ValueError(f"{real_store} or {state} exists already")
    for d in (real_store + "/.links", state + "/db", state + "/gcroots/per-user",
              state + "/gcroots/auto", state + "/profiles/per-user", state + "/temproots"):
        os.makedirs(d, exist_ok=True)
    os.symlink(state + "/profiles", state + "/gcroots/profiles")  # as a fresh LocalStore makes it
    try:
        import grp
        os.chown(real_store, 0, grp.getgrnam("nixbld").gr_gid)
        os.chmod(real_store, 0o1775)
    except (KeyError, PermissionError):
        pass
    id_of = {nid: i + 1 for i, nid in enumerate(sel.order)}
    rows, refs, drv_outs = [], [], []
    counts = [0] * len(KINDS)
    cut = len(store_dir)
    for i, nid in enumerate(sel.order):
        n = nodes[nid]
        tree = g.tree(n)
        data = nar(tree)
        write_tree(real_store + n.path[cut:], tree)
        rows.append((i + 1, n.path, "sha256:" + sha256_hex(data), epoch - paths + i,
                     nodes[n.deriver].path if n.deriver >= 0 else None, len(data), n.ultimate, n.ca))
        refs += [(i + 1, id_of[r]) for r in n.refs]
        if n.self_ref:
            refs.append((i + 1, i + 1))
        drv_outs += [(i + 1, o, nodes[oid].path) for o, oid in n.outputs]
        counts[n.kind] += 1
    for nid in unregistered:
        write_tree(real_store + nodes[nid].path[cut:], nodes[nid].tree)
    t_files = time.monotonic()

    db = sqlite3.connect(state + "/db/db.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    db.executescript(";\n".join(s for s in SCHEMA.split(";\n") if "INDEX" not in s))
    db.execute("BEGIN")
    db.executemany("INSERT INTO ValidPaths (id, path, hash, registrationTime, deriver, narSize, "
                   "ultimate, ca) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.executemany("INSERT INTO Refs VALUES (?, ?)", refs)
    db.executemany("INSERT INTO DerivationOutputs VALUES (?, ?, ?)", drv_outs)
    for s in SCHEMA.split(";\n"):   # indices after the rows: the same index, built at once
        if "INDEX" in s:
            db.execute(s)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with open(state + "/db/schema", "w") as f:
        f.write("10")
    os.close(os.open(state + "/db/big-lock", os.O_CREAT | os.O_WRONLY, 0o600))
    t_db = time.monotonic()

    # Roots.
    gcroots = state + "/gcroots"
    made_homes: set[str] = set()

    def link(path: str, target: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)

    def user_home(u: str) -> str:
        h = os.path.join(home, u)
        if h not in made_homes:
            os.makedirs(h, exist_ok=True)
            made_homes.add(h)
        return h

    for u in users_:
        user_home(u)
    rooted = [nid for kind, nid in items if kind != "profile"]
    rng.shuffle(rooted)

    def target(i: int) -> int:
        return rooted[i % len(rooted)] if rooted and rng.random() < 0.9 else rng.choice(sel.order)

    for r in range(roots):
        t = nodes[target(r)].path
        c = r % 10
        if c < 5:
            path = f"{gcroots}/hydra/{os.path.basename(t)}"
        elif c < 9:
            path = f"{gcroots}/per-user/{users_[r % len(users_)]}/{rng.choice(['shell', 'direnv', 'ci'])}-{r}"
        else:
            path = f"{gcroots}/{rng.choice(['current-system', 'booted-system', 'nixos'])}-{r}"
        if os.path.lexists(path):
            path += f"-{r}"
        link(path, t)
    for i in range(indirect):
        t = nodes[target(roots + i)].path
        proj = f"{user_home(users_[i % len(users_)])}/src/{rng.choice(['website', 'api', 'tool', 'thesis'])}-{i}"
        result = proj + ("/result" if rng.random() < 0.8 else f"/result-{rng.choice(['dev', 'bin', '2'])}")
        link(result, t)
        link(f"{gcroots}/auto/{auto_root_name(result)}", result)
    for k in range(stale):
        proj = f"{user_home(users_[k % len(users_)])}/src/old-{k}"
        if k % 2 == 0:
            os.makedirs(proj, exist_ok=True)
        link(f"{gcroots}/auto/{auto_root_name(proj + '/result')}", proj + "/result")
    for pi, logical in enumerate(profile_links):
        prof = _phys(root, logical)
        mine = [(n, env, mtime) for p, n, env, mtime in gens if p == pi]
        for n, env, mtime in mine:
            link(f"{prof}-{n}-link", nodes[env].path)
            os.utime(f"{prof}-{n}-link", (mtime, mtime), follow_symlinks=False)
        if mine:
            link(prof, f"{os.path.basename(prof)}-{mine[-1][0]}-link")
            os.utime(prof, (mine[-1][2],) * 2, follow_symlinks=False)
        if "/per-user/" in logical and logical.endswith("/profile"):
            link(user_home(logical.split("/")[-2]) + "/.nix-profile", prof)
    for q in range(quirks):
        u = user_home(users_[q % len(users_)])
        qdir = f"{gcroots}/quirks"
        some = [nodes[rng.choice(sel.order)] for _ in range(4)]
        # a root to a path that is not valid (Nix: "skipping invalid root")
        link(f"{qdir}/dangling-{q}", f"{store_dir}/{b32(hashlib.sha1(b'gone%d' % q).digest())}-gone")
        # a relative link into the store: no root for Nix 2.8
        link(f"{qdir}/relative-{q}", os.path.relpath(_phys(root, some[0].path), qdir))
        # a link into a store path: roots the path
        outs = [nodes[x] for x in (rng.choice(sel.order) for _ in range(20)) if nodes[x].kind in (OUT, ENV)]
        if outs:
            link(f"{qdir}/subpath-{q}", outs[0].path + "/" + sorted(g.tree(outs[0])[1])[0])
        # a regular file named like a valid path
        f = f"{qdir}/files/{os.path.basename(some[1].path)}"
        os.makedirs(os.path.dirname(f), exist_ok=True)
        open(f, "a").close()
        # auto links to a regular file, to a link out of the store, to a link to a link
        f = f"{u}/src/notalink-{q}/result"
        os.makedirs(os.path.dirname(f), exist_ok=True)
        open(f, "w").close()
        link(f"{gcroots}/auto/{auto_root_name(f)}", f)
        f = f"{u}/src/outside-{q}/result"
        link(f, f"/tmp/not-a-store-path-{q}")
        link(f"{gcroots}/auto/{auto_root_name(f)}", f)
        f = f"{u}/src/double-{q}/result"
        link(f + "-1", some[2].path)
        link(f, "result-1")
        link(f"{gcroots}/auto/{auto_root_name(f)}", f)
        # a temp roots file whose process is gone (no lock held)
        with open(f"{state}/temproots/{4000000 + q}", "wb") as fh:
            fh.write(some[3].path.encode() + b"\0")
    t_roots = time.monotonic()

    summary = {
        "root": root, "store_dir": store_dir, "state_dir": state, "seed": seed, "epoch": epoch,
        "paths": paths, "graph_nodes": len(nodes), "packages": len(g.pkgs),
        "by_kind": dict(zip(KINDS, counts)), "references": len(refs),
        "self_references": sum(1 for a, b in refs if a == b),
        "items": {k: sum(1 for it in items if it[0] == k)
                  for k in ("profile", "subst", "built", "inst", "shell", "filler")},
        "roots": {"direct": roots, "indirect": indirect, "stale": stale, "quirks": quirks,
                  "profiles": [_phys(root, p) for p in profile_links], "generations": generations,
                  "users": users_},
        "seconds": {"graph": round(t_graph - t0, 2), "files": round(t_files - t_graph, 2),
                    "db": round(t_db - t_files, 2), "roots": round(t_roots - t_db, 2)},
    }
    if expected is not None:
        summary["expected"] = write_expected(root, expected)
    summary["seconds"]["total"] = round(time.monotonic() - t0, 2)
    return summary


# -- the oracle -----------------------------------------------------------------------------

def nix(root, *args: str, extra_config: str = "", **kw) -> subprocess.CompletedProcess:
    """A Nix command through tests/nix-oracle: single-user, offline, as root."""
    env = dict(os.environ, NIX_ORACLE_EXTRA_CONFIG=extra_config)
    return subprocess.run([ORACLE, str(root), *args], capture_output=True, env=env, **kw)


def write_expected(root: str, out_dir: str) -> dict:
    """roots.txt, live.txt and dead.txt as nix-store --gc --print-* answer
    them (roots without /proc lines) -- on a copy, since Nix removes stale
    links and temp roots files while it looks."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    with tempfile.TemporaryDirectory(prefix="storegen-oracle-") as tmp:
        subprocess.run(["cp", "-a", os.path.join(root, "nix"), tmp], check=True)
        for what in ("roots", "live", "dead"):
            out = nix(tmp, "nix-store", "--gc", "--print-" + what)
            if out.returncode != 0:
                raise RuntimeError(f"nix-store --print-{what}: {out.stderr.decode(errors='replace')}")
            lines = [line.replace(tmp.encode() + b"/nix/", root.encode() + b"/nix/")
                     for line in out.stdout.split(b"\n")[:-1] if not line.startswith(b"/proc/")]
            with open(os.path.join(out_dir, what + ".txt"), "wb") as f:
                f.write(b"".join(line + b"\n" for line in lines))
            counts[what] = len(lines)
        subprocess.run(["rm", "-rf", "--one-file-system", tmp + "/nix"], check=True)
    return counts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="physical root: DIR/nix/store, DIR/nix/var/nix")
    ap.add_argument("--paths", type=int, required=True, help="valid store paths (at least 40)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--roots", type=int, default=50, help="direct roots (default 50)")
    ap.add_argument("--indirect", type=int, default=10, help="indirect roots (default 10)")
    ap.add_argument("--stale", type=int, default=3, help="stale gcroots/auto links (default 3)")
    ap.add_argument("--quirks", type=int, default=1, help="instances of each edge case (default 1)")
    ap.add_argument("--profiles", type=int, default=2, help="profiles (default 2)")
    ap.add_argument("--generations", type=int, default=3, help="generations each (default 3)")
    ap.add_argument("--users", type=int, default=2, help="users with homes (default 2)")
    ap.add_argument("--epoch", type=int, default=1700000000, help="'now' for times (default 1700000000)")
    ap.add_argument("--store-dir", default="/nix/store", help="logical store dir (with --root /)")
    ap.add_argument("--state-dir", default="/nix/var/nix", help="logical state dir (with --root /)")
    ap.add_argument("--home", help="where users' homes go (default ROOT/home)")
    ap.add_argument("--expected", help="write nix-store's roots/live/dead sets into this directory")
    return ap


def options(argv: list[str]) -> dict:
    """Keyword arguments for generate() from command-line options (only those given)."""
    ap = _parser()
    given = vars(ap.parse_args(["--root", "/", "--paths", "0", *argv]))
    return {k: v for k, v in given.items() if k not in ("root", "paths") and v != ap.get_default(k)}


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    a = vars(ap.parse_args(argv))
    try:
        summary = generate(a.pop("root"), a.pop("paths"), **a)
    except ValueError as e:
        ap.error(str(e))
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
