"""Nix >= 2.34's `nix store roots-daemon` wire format.

On each connection the server writes every root's store path followed by one
NUL byte, then closes: no header, no end marker.  (An unprivileged
nix-daemon with `use-roots-daemon = true` reads it.)  Because that format
cannot say "incomplete", our server sends nothing at all unless the scan
succeeded: it buffers the (small, de-duplicated) set of store paths and
writes it only after the trailer-equivalent decision.
"""

from __future__ import annotations

from typing import Iterable

from .framing import LocalProtocolError, RemoteProtocolError


def encode_nix_roots(store_paths: Iterable[bytes]) -> bytes:
    out = []
    for p in store_paths:
        if not p or b"\0" in p:
            raise LocalProtocolError(f"cannot encode {p!r}: empty or contains NUL")
        out.append(p + b"\0")
    return b"".join(out)


def decode_nix_roots(data: bytes) -> list[bytes]:
    """The client side (used by our tests and by `gcroots-query` diagnostics)."""
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise RemoteProtocolError("roots-daemon stream does not end with a NUL byte (truncated?)")
    paths = data[:-1].split(b"\0")
    if any(not p for p in paths):
        raise RemoteProtocolError("roots-daemon stream contains an empty path")
    return paths
