"""Derivations as Nix 2.8 reads them, for content-addressed derivations.

With `experimental-features = ca-derivations`, Nix finds a derivation's
outputs not only in DerivationOutputs but also in the Realisations table
(queryPartialDerivationOutputMap), keyed by the derivation's *hash modulo*
(staticOutputHashes = hashDerivationModulo, derivations.cc).  A floating
content-addressed derivation -- the one instantiated and the resolved one
that was really built -- has no DerivationOutputs rows at all: Realisations
is the only link between it and its outputs, and so the only way the
collector keeps a live output's deriver (keep-derivations) or a live
derivation's outputs (keep-outputs).

Derivation files are immutable (their path is a hash of their text), so
the hashes are memoised by file for the life of the process.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

from gcroots.layout import StoreLayout


class DerivationError(Exception):
    """A derivation Nix would need to read cannot be read or parsed: Nix's
    collector stops there too."""


@dataclass
class Output:
    path: bytes
    hash_algo: bytes        # "" | "sha256" | "r:sha256" ...
    hash: bytes             # "" | hex | "impure"


@dataclass
class Derivation:
    outputs: dict[bytes, Output]
    input_drvs: dict[bytes, list[bytes]]
    input_srcs: list[bytes]
    platform: bytes
    builder: bytes
    args: list[bytes]
    env: dict[bytes, bytes]


_UNESCAPE = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}


class _Reader:
    """parseDerivation: the ATerm `Derive(...)` of a .drv file."""

    def __init__(self, text: bytes) -> None:
        self.s, self.i = text, 0

    def expect(self, token: bytes) -> None:
        if not self.s.startswith(token, self.i):
            raise DerivationError(f"expected {token.decode()!r} at byte {self.i}")
        self.i += len(token)

    def string(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        s, i = self.s, self.i
        while True:
            if i >= len(s):
                raise DerivationError("unterminated string")
            c = s[i]
            i += 1
            if c == 0x22:  # '"'
                break
            if c == 0x5C:  # '\\'
                if i >= len(s):
                    raise DerivationError("unterminated string")
                out += _UNESCAPE.get(s[i], bytes((s[i],)))
                i += 1
            else:
                out.append(c)
        self.i = i
        return bytes(out)

    def end_of_list(self) -> bool:
        c = self.s[self.i:self.i + 1]
        if c in (b",", b"]"):
            self.i += 1
        return c == b"]"

    def strings(self) -> list[bytes]:
        out = []
        while not self.end_of_list():
            out.append(self.string())
        return out


def parse_derivation(text: bytes) -> Derivation:
    r = _Reader(text)
    r.expect(b"Derive([")
    outputs = {}
    while not r.end_of_list():
        r.expect(b"(")
        name = r.string()
        fields = []
        for _ in range(3):
            r.expect(b",")
            fields.append(r.string())
        r.expect(b")")
        outputs[name] = Output(*fields)
    r.expect(b",[")
    input_drvs = {}
    while not r.end_of_list():
        r.expect(b"(")
        path = r.string()
        r.expect(b",[")
        input_drvs[path] = sorted(set(r.strings()))
        r.expect(b")")
    r.expect(b",[")
    input_srcs = sorted(set(r.strings()))
    r.expect(b",")
    platform = r.string()
    r.expect(b",")
    builder = r.string()
    r.expect(b",[")
    args = r.strings()
    r.expect(b",[")
    env = {}
    while not r.end_of_list():
        r.expect(b"(")
        key = r.string()
        r.expect(b",")
        env[key] = r.string()
        r.expect(b")")
    r.expect(b")")
    if not outputs:
        raise DerivationError("a derivation must have at least one output")
    return Derivation(outputs, input_drvs, input_srcs, platform, builder, args, env)


def _quote(s: bytes) -> bytes:
    """printString"""
    return b'"' + (s.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n")
                   .replace(b"\r", b"\\r").replace(b"\t", b"\\t")) + b'"'


def _list(items, quote=_quote) -> bytes:
    return b"[" + b",".join(quote(x) for x in items) + b"]"


def _unquoted(s: bytes) -> bytes:
    """printUnquotedString"""
    return b'"' + s + b'"'


def unparse(drv: Derivation, mask_outputs: bool, inputs: dict[bytes, list[bytes]]) -> bytes:
    """Derivation::unparse with `actualInputs` (the input derivations
    replaced by their hashes modulo)."""
    outs = []
    for name in sorted(drv.outputs):
        o = drv.outputs[name]
        path = b"" if mask_outputs else o.path  # floating and deferred ones have none
        outs.append(b"(" + b",".join(map(_unquoted, (name, path, o.hash_algo, o.hash))) + b")")
    ins = [b"(" + _unquoted(h) + b"," + _list(inputs[h], _unquoted) + b")" for h in sorted(inputs)]
    env = [b"(" + _quote(k) + b"," + _quote(b"" if mask_outputs and k in drv.outputs else v) + b")"
           for k, v in sorted(drv.env.items())]
    return (b"Derive([" + b",".join(outs) + b"],[" + b",".join(ins) + b"],"
            + _list(drv.input_srcs, _unquoted) + b"," + _unquoted(drv.platform) + b","
            + _quote(drv.builder) + b"," + _list(drv.args) + b",[" + b",".join(env) + b"])")


_IMPURE = hashlib.sha256(b"impure").digest()


class ModuloHashes:
    """hashDerivationModulo, memoised per derivation file.  Values are
    (output name -> sha256 digest, deferred?)."""

    _memo: dict[bytes, tuple[dict[bytes, bytes], bool]] = {}  # by real path, process-wide

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    def read(self, drv_path: bytes) -> Derivation:
        try:
            with open(self.layout.physical(drv_path), "rb") as f:
                return parse_derivation(f.read())
        except OSError as e:
            raise DerivationError(f"cannot read the derivation "
                                  f"{drv_path.decode(errors='replace')}: {e.strerror}") from None
        except DerivationError as e:
            raise DerivationError(f"cannot parse the derivation "
                                  f"{drv_path.decode(errors='replace')}: {e}") from None

    def static_output_hashes(self, drv_path: bytes) -> dict[bytes, bytes]:
        """staticOutputHashes: output name -> "sha256:<base16>", the key of
        the output's row in Realisations."""
        hashes, _ = self._modulo(self.read(drv_path), mask_outputs=True)
        return {name: b"sha256:" + h.hex().encode() for name, h in hashes.items()}

    def _of_path(self, drv_path: bytes) -> tuple[dict[bytes, bytes], bool]:
        """pathDerivationModulo"""
        key = self.layout.physical(drv_path)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = self._modulo(self.read(drv_path), mask_outputs=False)
        return got

    def _modulo(self, drv: Derivation, mask_outputs: bool) -> tuple[dict[bytes, bytes], bool]:
        kinds = {("fixed" if o.hash and o.hash != b"impure" else "impure" if o.hash == b"impure"
                  else "floating") if o.hash_algo else ("deferred" if not o.path else "input")
                 for o in drv.outputs.values()}
        if len(kinds) != 1:
            raise DerivationError("a derivation cannot mix output types")
        kind = kinds.pop()
        if kind == "fixed":
            # The output's path as written: a valid .drv passed Nix's
            # checkDerivationOutputs, so it is the one Nix would compute.
            return {name: hashlib.sha256(b"fixed:out:" + o.hash_algo + b":" + o.hash + b":"
                                         + o.path).digest()
                    for name, o in drv.outputs.items()}, False
        if kind == "impure":
            return {name: _IMPURE for name in drv.outputs}, True
        deferred = kind == "floating"
        inputs: dict[bytes, set[bytes]] = {}
        for path, names in drv.input_drvs.items():
            hashes, input_deferred = self._of_path(path)
            deferred |= input_deferred
            for name in names:
                if name not in hashes:
                    raise DerivationError(f"{path.decode(errors='replace')} has no output "
                                          f"{name.decode(errors='replace')!r}")
                inputs.setdefault(hashes[name].hex().encode(), set()).add(name)
        digest = hashlib.sha256(unparse(drv, mask_outputs, {h: sorted(n) for h, n in
                                                            inputs.items()})).digest()
        return {name: digest for name in drv.outputs}, deferred


def realised_outputs(conn: sqlite3.Connection, layout: StoreLayout,
                     above: int = 0) -> list[tuple[int, int]]:
    """(derivation id, output id) for the outputs Nix finds through
    Realisations, with ca-derivations on, of the derivations with ids
    above `above` (StoreGraph.follow: those registered since).  Only derivations without
    DerivationOutputs rows are read: those whose outputs have no static
    path (floating content-addressed, deferred, impure).  Input-addressed
    and fixed-output derivations list every output there, and a
    realisation of one names the same path (its path is a function of the
    very hash the realisation is keyed by)."""
    try:
        rows = conn.execute("SELECT r.drvPath, r.outputName, r.outputPath FROM Realisations r "
                            "JOIN ValidPaths v ON v.id = r.outputPath ORDER BY r.id").fetchall()
    except sqlite3.OperationalError:  # no such table: the feature was never on
        return []
    if not rows:
        return []
    found: dict[tuple[bytes, bytes], int] = {}
    for drv_hash, name, out in rows:
        found.setdefault((drv_hash, name), out)  # Nix takes the first match
    hashes = ModuloHashes(layout)
    pairs = []
    for drv_id, drv_path in conn.execute(
            "SELECT v.id, v.path FROM ValidPaths v WHERE v.id > ? AND v.path LIKE '%.drv' AND "
            "NOT EXISTS (SELECT 1 FROM DerivationOutputs d WHERE d.drv = v.id)", (above,)):
        for name, h in hashes.static_output_hashes(drv_path).items():
            out = found.get((h, name))
            if out is not None:
                pairs.append((drv_id, out))
    return pairs
