"""Nix >= 2.34's `nix store roots-daemon` wire format.

On each connection the server writes every root's store path followed by one
NUL byte, then closes: no header, no end marker.  (An unprivileged
nix-daemon with `use-roots-daemon = true` reads it.)  Because that format
cannot say "incomplete", our server sends nothing at all unless the scan
succeeded: it buffers the (small, de-duplicated) set of store paths and
writes it only after the trailer-equivalent decision.  The reading side
(tests, diagnostics) is receive.decode_nix_roots.
"""

from .framing import BAD_PATH, LocalProtocolError


def encode_nix_roots(store_paths: list[bytes]) -> bytes:
    if not all(store_paths) or any(b"\0" in p for p in store_paths):
        raise LocalProtocolError(f"cannot send a store path: {BAD_PATH}")
    return b"".join(p + b"\0" for p in store_paths)
