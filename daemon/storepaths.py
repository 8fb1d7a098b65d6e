"""Store path syntax only the daemon needs: parsing the paths it is handed
(by the helper, clients, Nix's temp roots and gc-socket) as Nix 2.8's
parseStorePath does, and hash parts.  What the helper needs too (base
names, toStorePath, canonical paths) is gcroots/storepath.py's; the helper
does not load this module."""

from __future__ import annotations

from gcroots.storepath import canon_path, dir_of, is_store_basename

HASH_LEN = 32
# Nix's base-32 alphabet: digits and lower-case letters without e, o, u, t.
BASE32_CHARS = b"0123456789abcdfghijklmnpqrsvwxyz"


def parse_store_path(path: bytes, store_dir: bytes) -> bytes | None:
    """parseStorePath: canonicalise, require the parent to be the store dir
    and the base name to be a store base name.  Returns the canonical store
    path, or None if it is not one."""
    if not path.startswith(b"/") or b"\0" in path:
        return None
    p = canon_path(path)
    if dir_of(p) != store_dir:
        return None
    return p if is_store_basename(p[len(store_dir) + 1:]) else None


def hash_part(store_path: bytes) -> bytes:
    """The 32-character hash of a (parsed) store path."""
    return store_path[store_path.rfind(b"/") + 1:][:HASH_LEN]
