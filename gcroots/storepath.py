"""Nix store path syntax, exactly as Nix 2.8 parses it (src/libstore/path.cc,
store-api.cc).  Everything is `bytes`: file names may hold any byte but NUL
and '/', and a store path we cannot parse is simply "not a store path".

Used by the helper (to decide what a link points at), the daemon and the
client; parsing what the daemon is sent (parseStorePath) and hash parts are
daemon/storepaths.py's.  Standard library only: the helper imports it.
"""

from __future__ import annotations

import os
import re


def canon_path(path: bytes) -> bytes:
    """Lexical canonicalisation as Nix's canonPath(path, resolveSymlinks=false):
    collapse '//' and '.', resolve '..' textually (above "/" is "/"), no
    trailing slash.  Symlinks are *not* consulted (that is the point: Nix does
    not either), nor are they by normpath -- but it keeps a leading '//'."""
    if not path.startswith(b"/"):
        raise ValueError(f"not an absolute path: {path!r}")
    return os.path.normpath(b"/" + path.lstrip(b"/"))


def abs_path(target: bytes, base_dir: bytes) -> bytes:
    """Nix's absPath(target, dir): relative targets are taken relative to dir,
    then canonicalised lexically."""
    return canon_path(target if target.startswith(b"/") else base_dir + b"/" + target)


def dir_of(path: bytes) -> bytes:
    return path[:i] if (i := path.rfind(b"/")) > 0 else b"/"


# 32 base-32 chars; any byte at index 32 (Nix 2.8 does not check it); then a
# name of 1..211 allowed chars.
_BASENAME = re.compile(rb"[0-9a-df-np-sv-z]{32}.[A-Za-z0-9+\-._?=]{1,211}", re.S)


def is_store_basename(name: bytes) -> bool:
    """StorePath::StorePath(baseName) accepts it."""
    return _BASENAME.fullmatch(name) is not None


def is_in_dir(path: bytes, directory: bytes) -> bool:
    """Nix's isInDir: strictly below `directory`, textually."""
    return path.startswith(b"/") and len(path) > len(directory) + 1 and path.startswith(directory + b"/")


def to_store_path(target: bytes, store_dir: bytes) -> bytes | None:
    """toStorePath: the top-level store path containing `target` (which may
    be a sub-path), or None when target is not inside the store or the first
    component does not parse (Nix's BadStorePath, which callers ignore).

    Nix canonicalises `store_dir/first-component` before parsing it; for a
    component that is a valid base name (>= 34 chars, no '/') that is the
    identity, and every other component fails either way, so we skip it."""
    if not is_in_dir(target, store_dir):
        return None
    name = target[len(store_dir) + 1:].split(b"/", 1)[0]
    return store_dir + b"/" + name if is_store_basename(name) and b"\0" not in name else None
