"""Nix store path syntax, exactly as Nix 2.8 parses it (src/libstore/path.cc,
store-api.cc).  Everything is `bytes`: file names may hold any byte but NUL
and '/', and a store path we cannot parse is simply "not a store path".

Used by the helper (to decide what a link points at), the daemon (to
re-validate everything the helper sends) and the client.  Standard library
only: the helper imports it.
"""

from __future__ import annotations

import re

HASH_LEN = 32
MAX_NAME_LEN = 211
# Nix's base-32 alphabet: digits and lower-case letters without e, o, u, t.
BASE32_CHARS = b"0123456789abcdfghijklmnpqrsvwxyz"



def canon_path(path: bytes) -> bytes:
    """Lexical canonicalisation as Nix's canonPath(path, resolveSymlinks=false):
    collapse '//' and '.', resolve '..' textually, no trailing slash.
    Symlinks are *not* consulted (that is the point: Nix does not either)."""
    if not path.startswith(b"/"):
        raise ValueError(f"not an absolute path: {path!r}")
    out: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        out.append(part)
    return b"/" + b"/".join(out)


def abs_path(target: bytes, base_dir: bytes) -> bytes:
    """Nix's absPath(target, dir): relative targets are taken relative to dir,
    then canonicalised lexically."""
    if not target.startswith(b"/"):
        target = base_dir + b"/" + target
    return canon_path(target)


def dir_of(path: bytes) -> bytes:
    i = path.rfind(b"/")
    if i <= 0:
        return b"/"
    return path[:i]


def base_name(path: bytes) -> bytes:
    path = path.rstrip(b"/")
    return path[path.rfind(b"/") + 1:]


# 32 base-32 chars; any byte at index 32 (Nix 2.8 does not check it); then a
# name of 1..211 allowed chars.
_BASENAME = re.compile(rb"[0-9a-df-np-sv-z]{32}.[A-Za-z0-9+\-._?=]{1,211}", re.S)


def is_store_basename(name: bytes) -> bool:
    """StorePath::StorePath(baseName) accepts it."""
    return _BASENAME.fullmatch(name) is not None


def is_in_dir(path: bytes, directory: bytes) -> bool:
    """Nix's isInDir: strictly below `directory`, textually."""
    return (
        path.startswith(b"/")
        and path.startswith(directory)
        and len(path) >= len(directory) + 2
        and path[len(directory)] == 0x2F  # '/'
    )


def parse_store_path(path: bytes, store_dir: bytes) -> bytes | None:
    """parseStorePath: canonicalise, require the parent to be the store dir
    and the base name to be a store base name.  Returns the canonical store
    path, or None if it is not one."""
    if not path.startswith(b"/") or b"\0" in path:
        return None
    p = canon_path(path)
    if dir_of(p) != store_dir:
        return None
    name = p[len(store_dir) + 1:]
    return p if is_store_basename(name) else None


def to_store_path(target: bytes, store_dir: bytes) -> bytes | None:
    """toStorePath: the top-level store path containing `target` (which may
    be a sub-path), or None when target is not inside the store or the first
    component does not parse (Nix's BadStorePath, which callers ignore).

    Nix canonicalises `store_dir/first-component` before parsing it; for a
    component that is a valid base name (>= 34 chars, no '/') that is the
    identity, and every other component fails either way, so we skip it."""
    if not is_in_dir(target, store_dir):
        return None
    start = len(store_dir) + 1
    slash = target.find(b"/", start)
    name = target[start:] if slash == -1 else target[start:slash]
    if _BASENAME.fullmatch(name) is None or b"\0" in name:
        return None
    return target[:start + len(name)]


def hash_part(store_path: bytes) -> bytes:
    """The 32-character hash of a (parsed) store path."""
    return base_name(store_path)[:HASH_LEN]


def is_derivation(store_path: bytes) -> bool:
    return store_path.endswith(b".drv")


def environ_regex(store_dir: bytes) -> re.Pattern[bytes]:
    """The pattern Nix 2.8 runs over /proc/<pid>/environ (and we over
    cmdline): the store dir, then a slash, then [0-9a-z]+ and the name chars."""
    return re.compile(re.escape(store_dir) + rb"/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")


# A /proc/<pid>/maps line: five fields, then a path with no whitespace and
# nothing after it but whitespace.  "(deleted)" mappings do not match, as in
# Nix.
MAPS_LINE = re.compile(rb"^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)\s*$")
