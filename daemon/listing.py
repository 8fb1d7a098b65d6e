"""What is in the store dir: Nix's dead set is every entry that is not
live, so each answer needs the listing -- a million entries take ~0.7 s
to list on these machines, longer than everything else of a warm query.

`StoreListing` keeps it against a StoreGraph: a mask of the graph's nodes
that are on disk, and the names of the entries that are no valid path
(unregistered, junk, paths we invalidated whose files are still there).
gcrootsd keeps it current with inotify: every entry created, removed or
renamed in the store dir is an event, read before each answer; events
apply in order, so applying all of those since the watch began to a
listing made after it began gives the directory as it is now.  An
overflowed event queue (a collection deleting thousands of paths), a new
graph, or no inotify at all means listing anew.  One-shot runs
(`--standalone gc`) list once.
"""

from __future__ import annotations

import ctypes
import os
import struct

import numpy as np

from gcroots import log

from .graph import StoreGraph
from .store import list_store

_log = log.get("gcroots.listing")

_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_ONLYDIR, _IN_DONT_FOLLOW = 0x1000000, 0x2000000
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")
_WATCH = (_IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE_SELF
          | _IN_MOVE_SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW)
# Past this many events, listing anew is cheaper than looking each name up.
_MAX_EVENTS = 20000


_IN_MODIFY = 0x2


class _Inotify:
    def __init__(self, path: bytes, mask: int = _WATCH) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, path, mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch({os.fsdecode(path)})")

    def read(self) -> list[tuple[int, bytes]] | None:
        """(mask, name) of the events queued since the last read; None if
        some were lost (overflow) or the directory itself went."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _, mask, _, size = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size
                name = data[pos:pos + size].rstrip(b"\0")
                pos += size
                if mask & (_IN_Q_OVERFLOW | _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    return None
                out.append((mask, name))
            if len(out) > _MAX_EVENTS:
                self.drain()
                return None

    def drain(self) -> None:
        try:
            while os.read(self.fd, 1 << 20):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class StoreListing:
    def __init__(self, real_store_dir: bytes, store_dir: bytes, *, watch: bool) -> None:
        self.real = real_store_dir
        self.prefix = store_dir + b"/"
        self._inotify: _Inotify | None = None
        if watch:
            try:
                self._inotify = _Inotify(real_store_dir)
            except OSError as e:  # e.g. the inotify instance limit: correct, only slower
                _log.warning("store_not_watched", store=real_store_dir, error=e.strerror,
                             consequence="the store dir is listed for every answer")
        self._graph: StoreGraph | None = None
        self.on_disk = np.zeros(0, dtype=bool)   # node -> its entry exists
        self.extra: set[bytes] = set()           # entries that are no valid path (full paths)
        self.relisted = 0

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def forget(self) -> None:
        """The graph went stale (answers come from SQLite until a reload):
        let it go -- kept here, it stayed resident beside the reloaded one
        (at a million paths ~200 MiB more until the reload, and the reload's
        peak that much higher).  The next sync() lists anew."""
        self._graph = None
        self.on_disk = np.zeros(0, dtype=bool)
        self.extra = set()

    def sync(self, g: StoreGraph) -> None:
        """Bring on_disk/extra up to date for `g` (call with the same or a
        newer graph each time)."""
        old = self._graph
        events = self._inotify.read() if self._inotify is not None else None
        if events is None or old is None or old.paths.blob is not g.paths.blob:
            self._relist(g)
            return
        # Analyses keep the arrays they were given: change a copy.
        n0, n = len(old), len(g)
        on_disk = np.concatenate([self.on_disk, np.zeros(n - n0, dtype=bool)])
        for node in range(n0, n):  # registered since: their entries may be among the extras
            path = g.paths[node]
            if path in self.extra:
                self.extra.discard(path)
                on_disk[node] = True
        newly_gone = np.flatnonzero(g.gone & on_disk)
        on_disk[newly_gone] = False  # invalidated by us: unregistered entries until deleted
        self.extra.update(g.paths[x] for x in newly_gone)
        events = [(mask, self.prefix + name) for mask, name in events if name != b".links"]
        # One batch: a build's thousand paths (and their .lock files) are
        # not a thousand bisections of the path table.
        nodes = g.index.get_many([path for _, path in events])
        for (mask, path), node in zip(events, nodes):
            present = bool(mask & (_IN_CREATE | _IN_MOVED_TO))
            if node is not None:
                on_disk[node] = present
            elif present:
                self.extra.add(path)
            else:
                self.extra.discard(path)
        self.on_disk = on_disk
        self._graph = g

    def _relist(self, g: StoreGraph) -> None:
        if self._inotify is not None:
            self._inotify.drain()  # the listing below covers them
        names = list_store(self.real)
        names.sort()
        prefix, t = self.prefix, g.paths
        on_disk = np.zeros(len(g), dtype=bool)
        joined = prefix + (b"\0" + prefix).join(names) + b"\0" if names else b""
        if joined == t.blob and not t.tail and not g.gone.any():
            on_disk[:] = True   # the usual store: exactly its valid paths
            self.extra = set()
        else:
            entries = {prefix + n for n in names}
            for node in range(len(g)):
                if not g.gone[node] and g.paths[node] in entries:
                    on_disk[node] = True
                    entries.discard(g.paths[node])
            self.extra = entries
        del joined
        self.on_disk = on_disk
        self._graph = g
        self.relisted += 1


class DBWatch:
    """Writes to the Nix DB (its directory: the DB, its -wal and -journal
    files, however often they are made anew): gcrootsd follows the DB
    when Nix commits, not when the next query comes."""

    def __init__(self, db_path: bytes) -> None:
        self.dir, self.name = os.path.split(db_path)
        self._inotify = _Inotify(self.dir, _IN_MODIFY | _WATCH)

    @property
    def fd(self) -> int:
        return self._inotify.fd

    def written(self) -> bool:
        """Whether the DB was written since the last call (or events were
        lost: then it may have been)."""
        events = self._inotify.read()
        ours = (self.name, self.name + b"-wal", self.name + b"-journal")  # not -shm: readers' too
        return events is None or any(name in ours for _, name in events)

    def close(self) -> None:
        self._inotify.close()
