"""Nix >= 2.34's `nix store roots-daemon` wire format.

On each connection the server writes every root's store path followed by one
NUL byte, then closes: no header, no end marker.  (An unprivileged
nix-daemon with `use-roots-daemon = true` reads it.)  Because that format
cannot say "incomplete", our server sends nothing at all unless the scan
succeeded: it buffers the (small, de-duplicated) set of store paths and
writes it only after the trailer-equivalent decision.  The reading side
(tests, diagnostics) is receive.decode_nix_roots.
"""

from __future__ import annotations

from typing import Iterable

from .framing import LocalProtocolError


def encode_nix_roots(store_paths: Iterable[bytes]) -> bytes:
    paths = list(store_paths)
    if not all(paths) or any(b"\0" in p for p in paths):
        raise LocalProtocolError("cannot encode an empty store path or one that contains a NUL byte")
    return b"".join(p + b"\0" for p in paths)
