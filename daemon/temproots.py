"""Temporary roots: <state>/temproots/<pid>, NUL-terminated store paths,
written by running Nix processes, each holding an exclusive flock(2) on its
file for as long as it lives (Nix's lockFile() is flock, not fcntl: the two
lock kinds do not see each other on Linux).

Nix's GC takes the exclusive lock non-blocking: if it gets it, the owner is
dead and Nix deletes the file.  Queries must not modify anything, so we ask
for a *shared* lock, non-blocking, and drop it at once: a live owner's
exclusive lock refuses it; getting it means the owner is dead and the file
is ignored.  Nothing is written.  The collector removes such files later,
re-checking under its own exclusive lock.

Nix matches temp roots by *hash part*: any store entry with the same
32-character hash as a temp root is alive, valid or not (a build in
progress writes its outputs' paths before registering them).

A Nix process run by another user (root) writes its file mode 0600: we
cannot read it.  Then we do not know its roots, and fail closed -- except
during a collection for files made after we took gc.lock: Nix announces
every temp root on gc-socket before writing it while a collector holds the
lock, so those hold nothing we were not told.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator

from gcroots import log
from gcroots.flock import lock_exclusive
from gcroots.layout import StoreLayout
from .storepaths import BASE32_CHARS, HASH_LEN, hash_part, parse_store_path
from gcroots.users import user_name

_MAX_FILE = 64 << 20
_log = log.get("gcroots.gc")


@dataclass
class TempRoots:
    roots: list[tuple[bytes, bytes]] = field(default_factory=list)  # (label "{temp:PID}", path)
    hashes: set[bytes] = field(default_factory=set)                  # hash parts that are alive
    warnings: list[str] = field(default_factory=list)
    stale_files: list[bytes] = field(default_factory=list)           # owners dead


class UnreadableTempRoots(Exception):
    """A temp roots file we may not read: its process's roots are unknown."""


def temp_root_files(layout: StoreLayout) -> frozenset[tuple[bytes, int]]:
    """(name, inode) of every temp roots file there now (Nix replaces a
    file named after a reused pid: a new inode)."""
    try:
        with os.scandir(layout.temproots_dir) as it:
            return frozenset((e.name, e.inode()) for e in it)
    except FileNotFoundError:
        return frozenset()


def owner_alive(fd: int) -> bool:
    """Does a process hold this temp roots file's exclusive flock?"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _hash_of(raw: bytes, store_dir: bytes) -> bytes | None:
    prefix = store_dir + b"/"
    if raw.startswith(prefix):
        h = raw[len(prefix):len(prefix) + HASH_LEN]
        if len(h) == HASH_LEN and all(c in BASE32_CHARS for c in h):
            return h
    return None


def _files(layout: StoreLayout, warnings: list[str] | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(name, path) of each temp roots file, by name: those named after a
    process id (others are said in `warnings`); hidden ones are Nix's to
    ignore (portage keeps the dir alive with one)."""
    try:
        names = os.listdir(layout.temproots_dir)
    except FileNotFoundError:
        return
    for name in sorted(names):
        path = layout.temproots_dir + b"/" + name
        if name.isdigit():
            yield name, path
        elif warnings is not None and not name.startswith(b"."):
            warnings.append(f"ignoring {os.fsdecode(path)}: not named after a process id")


def remove_stale(layout: StoreLayout) -> int:
    """The collector's (holding gc.lock): the files whose owner is dead,
    taken exclusively, unlinked, and marked with "d" for a process that
    might still hold the old fd (Nix).  How many."""
    removed = 0
    for _, path in _files(layout):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            continue  # gone; or not ours (read_temp_roots then refuses to go on)
        try:
            if not lock_exclusive(fd, 0.0):
                continue  # alive
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue  # its process removed it on exit, after our open
            os.write(fd, b"d")
            removed += 1
            _log.info("stale_temproots_removed", file=path)
        finally:
            os.close(fd)
    return removed


def read_temp_roots(layout: StoreLayout,
                    at_lock: frozenset[tuple[bytes, int]] | None = None) -> TempRoots:
    """Every temp roots file must be readable, but with `at_lock` (the files
    there when our collection took gc.lock) those made since may not be."""
    return TempRootsReader(layout, at_lock).read()


class TempRootsReader:
    """Reads the temp roots files; read() again gives only what was added
    since: Nix only ever appends to its file (a new process with the same
    pid makes a new file, a new inode), so a collection that re-checks
    before each batch reads the few new bytes, not every file again."""

    def __init__(self, layout: StoreLayout,
                 at_lock: frozenset[tuple[bytes, int]] | None = None) -> None:
        self.layout, self.at_lock = layout, at_lock
        self._seen: dict[bytes, tuple[int, int]] = {}   # name -> (inode, bytes read)

    def read(self) -> TempRoots:
        out = TempRoots()
        for name, path in _files(self.layout, out.warnings):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                continue  # the owner finished and removed it
            except PermissionError:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if self.at_lock is not None and (name, st.st_ino) not in self.at_lock:
                    continue  # made under our gc.lock: all of it came over gc-socket first
                raise UnreadableTempRoots(
                    f"cannot read the temporary roots file {os.fsdecode(path)}: a Nix process of "
                    f"{user_name(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o}) uses paths we "
                    "cannot know, so there is no complete root set until it ends (Nix must run as "
                    "the store's owner, as gcrootsd does)") from None
            try:
                st = os.fstat(fd)
                ino, done = self._seen.get(name, (None, 0))
                start = done if ino == st.st_ino else 0
                if start and st.st_size == start:
                    continue  # nothing new (an owner that died is no news either)
                if not owner_alive(fd):
                    out.stale_files.append(path)
                    continue
                os.lseek(fd, start, os.SEEK_SET)
                data = os.read(fd, _MAX_FILE + 1 - start)
                if start + len(data) > _MAX_FILE:
                    raise OSError(errno.EFBIG, f"temp roots file {os.fsdecode(path)} is too large")
            finally:
                os.close(fd)
            # The last entry is NUL-terminated too; a trailing piece without NUL
            # is a write in progress and ignored, exactly as Nix does (and read
            # again next time).
            end = data.rfind(b"\0") + 1
            self._seen[name] = (st.st_ino, start + end)
            _parse(data[:end], b"{temp:" + name + b"}", path, self.layout, out)
        return out


def _parse(data: bytes, label: bytes, path: bytes, layout: StoreLayout, out: TempRoots) -> None:
    for raw in data.split(b"\0")[:-1]:
        store_path = parse_store_path(raw, layout.store_dir)
        if store_path is not None:
            out.roots.append((label, store_path))
            out.hashes.add(hash_part(store_path))
            continue
        # Nix would abort on this; we keep what it could protect instead.
        h = _hash_of(raw, layout.store_dir)
        if h is not None:
            out.hashes.add(h)
        out.warnings.append(f"{os.fsdecode(path)}: not a store path: {raw[:300]!r}")
