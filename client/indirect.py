"""Indirect roots (`result` links, direnv roots) and removing the caller's
stale ones.

Nix registers an indirect root as `<state>/gcroots/auto/<hash>` -> the link
(`~/src/x/result`), which points into the store.  Its age is the link's
lstat mtime (when it was last (re)made).  We only ever remove links the
caller owns, with the caller's rights.  On a multi-user system
`gcroots/auto` belongs to root: a user removes the `result` link, and the
auto entry is then a stale link that gcrootsd (or Nix's GC) removes.

The link's path is someone else's to shape (the auto entry only names it):
its directory is reached from "/" without following any symlink, and the
lstat, the readlink and the unlink all happen relative to that directory.
A link whose directory path goes through a symlink is kept: where such a
path leads is up to whoever owns the symlink (`~/x -> /run` made
`~/x/booted-system` root's /run/booted-system).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from dataclasses import dataclass, field

from gcroots import nofollow, opendir
from gcroots.layout import StoreLayout
from gcroots.storepath import abs_path, dir_of, to_store_path

from .profiles import _GEN_NAME, base_name, parse_generation_name



@dataclass(frozen=True)
class IndirectRoot:
    auto_entry: bytes           # <state>/gcroots/auto/<name> (physical)
    link: bytes                 # what it points at: the `result` link (a host path)
    store_path: bytes
    uid: int
    mtime: int
    ino: tuple[int, int]
    target: bytes               # the link's readlink
    current_of: bytes | None = None   # the profile this link is the current generation of
    via_symlink: bool = False   # its directory path goes through a symlink: never removed

    @property
    def kind(self) -> str:
        if _GEN_NAME.fullmatch(base_name(self.link)):
            return "profile"    # a generation of a profile outside the state dir (nix-env -p)
        return "direnv" if b"/.direnv/" in self.link else "result"


@dataclass
class Scan:
    roots: list[IndirectRoot] = field(default_factory=list)
    stale: int = 0              # auto entries whose link is gone (gcrootsd/Nix remove them)
    unreadable: int = 0         # links we may not even lstat (someone else's private home)


def scan(layout: StoreLayout) -> Scan:
    """Every indirect root, as Nix's findRoots sees one: the auto entry's
    target (made absolute) is a symlink whose raw target is in the store."""
    out = Scan()
    auto = layout.auto_dir
    try:
        names = sorted(os.listdir(auto))
    except FileNotFoundError:
        return out
    for name in names:
        entry = os.path.join(auto, name)
        try:
            link = abs_path(os.readlink(entry), auto)
        except OSError:
            continue  # not a symlink: not an indirect root
        if to_store_path(link, layout.store_dir) is not None:
            continue  # a direct root that happens to sit in auto/
        try:
            found = _lstat_link(link)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                out.stale += 1
            else:
                out.unreadable += 1
            continue
        st, target, current_of, via_symlink = found
        sp = None if target is None else to_store_path(target, layout.store_dir)
        if sp is None:
            continue
        out.roots.append(IndirectRoot(entry, link, sp, st.st_uid, st.st_mtime_ns // 1_000_000_000,
                                      (st.st_dev, st.st_ino), target, current_of, via_symlink))
    return out


def _lstat_link(link: bytes) -> tuple[os.stat_result, bytes | None, bytes | None, bool]:
    """(lstat, readlink or None, profile it is current of, via a symlink) of
    the link, its directory walked without following symlinks.  One whose
    directory path has a symlink is still read (through it, to be listed),
    but only ever kept."""
    try:
        dfd = opendir.open_dir(dir_of(link))
    except nofollow.SymlinkInPath:
        st = os.lstat(link)
        return st, os.readlink(link) if stat.S_ISLNK(st.st_mode) else None, None, True
    try:
        name = base_name(link)
        st = os.lstat(name, dir_fd=dfd)
        if not stat.S_ISLNK(st.st_mode):
            return st, None, None, False
        return st, os.readlink(name, dir_fd=dfd), _current_of(link, dfd), False
    finally:
        os.close(dfd)


def _current_of(link: bytes, dfd: int) -> bytes | None:
    """If `link` is `<X>-<N>-link` and the sibling profile `X` points at
    it, the profile X: removing its current generation would break it."""
    m = _GEN_NAME.fullmatch(base_name(link))
    if m is None:
        return None
    profile = os.path.join(dir_of(link), m.group(1))
    try:
        target = os.readlink(m.group(1), dir_fd=dfd)
    except OSError:
        return None
    n = parse_generation_name(m.group(1), base_name(abs_path(target, dir_of(link))))
    return profile if n is not None and n == int(m.group(2)) else None


VIA_SYMLINK = "its directory path goes through a symbolic link"


@dataclass(frozen=True)
class Verdict:
    root: IndirectRoot
    delete: bool
    reasons: tuple[str, ...]


def plan(scan: Scan, *, older_than: float, now: float, match: bytes | None, uid: int | None,
         runtime: dict[bytes, list[bytes]], in_profiles: set[bytes],
         older_text: str) -> list[Verdict]:
    """Only the links of `uid` are candidates (others' are not listed at
    all; None: everyone's, for root); of those, every old one goes unless
    it is running or part of a current profile generation."""
    out = []
    cutoff = now - older_than
    for r in scan.roots:
        if uid is not None and r.uid != uid:
            continue
        if match is not None and not fnmatch.fnmatchcase(r.link, match):
            continue
        keep = []
        if r.via_symlink:
            keep.append(VIA_SYMLINK)
        if r.mtime >= cutoff:
            keep.append(f"newer than {older_text}")
        if r.store_path in runtime:
            keep.append("running (runtime root)")
        if r.store_path in in_profiles:
            keep.append("in a current profile generation")
        if r.current_of is not None:
            keep.append("current generation of its profile (see profiles prune)")
        out.append(Verdict(r, not keep, tuple(keep) if keep else (f"older than {older_text}",)))
    return out


@dataclass
class Removal:
    root: IndirectRoot
    removed: bool
    auto_removed: bool
    error: str | None = None
    changed: bool = False       # left alone because it is no longer what was planned


def remove(v: Verdict) -> Removal:
    """Remove the link, if it is still the one planned, then its auto entry
    if we may (the caller owns the store, or is root).  The directory is
    walked again, without following symlinks: one swapped in since the plan
    is not followed."""
    r = v.root
    if r.via_symlink:
        return Removal(r, False, False, f"{VIA_SYMLINK}; left alone", True)
    try:
        dfd = opendir.open_dir(dir_of(r.link))
    except nofollow.SymlinkInPath:
        return Removal(r, False, False, f"{VIA_SYMLINK} now; left alone", True)
    except FileNotFoundError:
        return Removal(r, False, False, "changed since the plan; left alone", True)
    except OSError as e:
        return Removal(r, False, False, f"cannot open {os.fsdecode(dir_of(r.link))}: {e.strerror}")
    name = base_name(r.link)
    try:
        try:
            st = os.lstat(name, dir_fd=dfd)
            same = (stat.S_ISLNK(st.st_mode) and (st.st_dev, st.st_ino) == r.ino
                    and os.readlink(name, dir_fd=dfd) == r.target)
        except FileNotFoundError:
            same = False
        if not same:
            return Removal(r, False, False, "changed since the plan; left alone", True)
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError as e:
            return Removal(r, False, False, f"cannot remove: {e.strerror}")
    finally:
        os.close(dfd)
    return Removal(r, True, _remove_auto_entry(r))


def _remove_auto_entry(r: IndirectRoot) -> bool:
    try:
        if abs_path(os.readlink(r.auto_entry), dir_of(r.auto_entry)) != r.link:
            return False
        os.unlink(r.auto_entry)
        return True
    except OSError:
        return False  # root-owned gcroots/auto: a stale link now, gcrootsd/Nix remove it
