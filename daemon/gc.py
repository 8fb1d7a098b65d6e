"""Garbage collection, with Nix 2.8's concurrency protocol.

One collection, in this order (gc.cc collectGarbage):

1. Remove <state>/db/reserved (as Nix: room to work on a full disk).
   Take <state>/gc.lock exclusively (flock, as Nix).  From now on a Nix
   process that wants a new temporary root cannot take its shared lock and
   tells us over <state>/gc-socket/socket instead.
2. Serve that socket: a client sends `path\\n`; we protect the path's hash
   part and its closure, wait until no deletion of it is in progress, and
   answer `1` (the client re-creates the path if it was deleted).
3. Read the temp roots files (removing those whose owner is dead, under
   their exclusive lock, as Nix does) and get a *complete* root set.
4. Compute the dead set (engine.analyze) and an order: referrers before
   references.
5. In batches: re-check temp roots; invalidate the batch in the DB in one
   transaction, with what the DB's foreign keys do to the rows that
   belong to it (Refs, DerivationOutputs, Realisations...; a still-valid
   path that refers to one refuses it: a last guard); then delete the batch from
   disk, in parallel.  A crash between the two leaves unregistered paths on
   disk, which the next collection removes; never a valid path without its
   files.
6. Remove `.links` entries nobody else links to; then, still under
   gc.lock, the gcroots/auto links found stale: set aside if unchanged,
   judged again by a new helper scan, removed or put back
   (remove_stale_auto_links).

A dry run only computes: what would go and exactly how many bytes that
frees, counting a file only if all of its hard links go.

Limits, as Nix's: --max-freed (bytes) and --ensure-free (bytes or N% of
the store's file system, free space wanted: the bytes still missing when
the collection plans become the limit) stop right after the path that
passes them, counted as Nix counts (nix_bytes_freed); --keep-recent keeps
the paths registered within a duration and their closure.  Progress is
reported as admin.Progress: phase, done, total, bytes freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import socket
import sqlite3
import stat
import struct
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from gcroots import cliargs, log
from gcroots.flock import lock_exclusive
from gcroots.layout import StoreLayout
from gcroots.nixdb import describe_error
from gcroots.protocol.admin import Progress
from gcroots.protocol.rootstream import StaleLink, link_identity
from gcroots.sockets import listen_unix
from gcroots.storepath import abs_path, dir_of, is_in_dir

from .storepaths import hash_part, parse_store_path

from . import engine
from .engine import Analysis, IncompleteRoots, RootSet
from .graph import CSR, StoreGraph
from .nixconf import GCSettings
from .store import StoreDB

if TYPE_CHECKING:
    from .listing import StoreListing
from .temproots import TempRootsReader, UnreadableTempRoots, remove_stale, temp_root_files

LOCK_WAIT = 60.0          # for a Nix GC or a client that holds gc.lock
# SQLite retries a locked DB this long (Nix retries SQLITE_BUSY for as long
# as it takes; we hold gc.lock meanwhile, so not for ever).
DB_BUSY_TIMEOUT = 600.0
# Paths per invalidation transaction: the first small, so that deletion
# starts at once; then four times larger each time up to BATCH (few commits:
# each rewrites most index pages; at 80k dead paths 7 instead of 12, which
# saves a tenth of the DB work), not larger: the last batch's deletion is
# what is left to do once the DB work is over.  (Growing by half instead
# measured slower at 100k paths: 17 commits, 4.2-4.6 s against 3.0-3.1 s;
# by 8, or up to 65,536, no better than by 4.)
FIRST_BATCH = 64
GROWTH = 4
BATCH = 32768
MAX_FREED_BATCH = 256     # ... when stopping at a limit (each cut where it stops)
DELETE_CHUNK = 512        # paths a deleter takes at a time (progress this often)
_log = log.get("gcroots.gc")


class GCError(Exception):
    pass


class Busy(GCError):
    pass


class SafetyError(GCError):
    """A check that must never fail did: stop before deleting anything more."""


class DBError(GCError):
    """The Nix DB failed (full disk, read-only, locked...): said as what it is."""


class DeletionError(GCError):
    """Removing files failed (EPERM, EROFS, EIO...) after the batch was
    invalidated: it is unregistered garbage on disk, which `nix-store
    --verify` accepts and the next collection removes."""


class Refused(GCError):
    """Paths asked for by name may not be deleted (nix-store --delete
    would refuse too): nothing is deleted."""


def _number(opts: dict, name: str, lo: float, hi: float, what: str, *, integer: bool = False,
            low_open: bool = False):
    """opts[name]: None, or a number in range (ValueError saying which)."""
    value = opts.get(name)
    if value is None:
        return None
    ok = type(value) is int or not integer and type(value) is float and math.isfinite(value)
    if not ok or not lo <= value <= hi or low_open and value == lo:
        raise ValueError(f"{name} must be {what}")
    return value


@dataclass
class GCOptions:
    dry_run: bool = False
    max_freed: int | None = None      # stop once this many bytes are freed (Nix's count)
    throttle: float = 0.0             # seconds to sleep between batches (I/O politeness)
    paths: tuple[bytes, ...] | None = None  # delete exactly these (nix-store --delete)
    keep_recent: float | None = None  # seconds: keep paths registered this recently (+ closure)
    ensure_free: int | cliargs.Percent | None = None  # free space wanted on the store's fs

    @classmethod
    def from_request(cls, opts: dict) -> "GCOptions":
        """A client's options (the CLI checked them, but anyone may send
        anything): ValueError unless each is of its type and in range."""
        dry_run = opts.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValueError("dry_run must be true or false")
        max_freed = _number(opts, "max_freed", 0, cliargs.MAX_SIZE,
                            f"a number of bytes from 0 to {cliargs.MAX_SIZE}", integer=True)
        throttle = _number(opts, "throttle", 0, cliargs.MAX_THROTTLE,
                           f"a number of seconds from 0 to {cliargs.MAX_THROTTLE:g}") or 0.0
        keep_recent = _number(opts, "keep_recent", 0, cliargs.MAX_DURATION,
                              "a number of seconds above 0 (at most 100 years)", low_open=True)
        ensure_free = _number(opts, "ensure_free", 1, cliargs.MAX_SIZE,
                              f"a number of bytes from 1 to {cliargs.MAX_SIZE}", integer=True)
        percent = _number(opts, "ensure_free_percent", 0, 100,
                          "a percentage above 0, at most 100", low_open=True)
        if ensure_free is not None and percent is not None:
            raise ValueError("ensure_free and ensure_free_percent exclude each other")
        return cls(dry_run, max_freed, float(throttle), None,
                   None if keep_recent is None else float(keep_recent),
                   cliargs.Percent(float(percent)) if percent is not None else ensure_free)


def free_space(path: bytes) -> tuple[int, int]:
    """(bytes free for unprivileged users, size) of the file system of
    `path`, as Nix's auto-GC measures free space."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def resolve_size(value: int | cliargs.Percent, size: int) -> int:
    """Bytes, or a percentage of a file system of `size` bytes."""
    return int(size * value.value / 100) if isinstance(value, cliargs.Percent) else value


def recent_closure(db: StoreDB, graph: StoreGraph, settings: GCSettings,
                   seconds: float) -> np.ndarray:
    """The valid paths registered within `seconds` (ValidPaths'
    registrationTime, as fast-nix-gc's --keep-recent) and their closure,
    as a mask of the graph's nodes."""
    cutoff = int(time.time() - seconds)
    with db.snapshot():
        recent = [r[0] for r in db.conn.execute(
            "SELECT path FROM ValidPaths WHERE registrationTime >= ?", (cutoff,))]
    return graph.closure_mask([graph.index[p] for p in recent if p in graph.index], settings)


@dataclass
class GCResult:
    """Sizes, one meaning each (README: "Sizes")."""
    dry_run: bool
    paths: int = 0
    disk_bytes_freed: int = 0         # blocks freed on disk, du-style: a file's once its last
                                      # hard link went, directories', .links included
    nar_bytes_freed: int = 0          # the DB's narSize of the deleted valid paths
    nix_bytes_freed: int = 0          # as Nix counts (and stops --max-freed): see deleter.py
    stale_links_removed: int = 0      # a dry run: found stale (would be removed)
    temproots_removed: int = 0
    stopped_at_limit: bool = False    # a limit left dead paths (a dry run: would leave)
    limit: str | None = None          # the limit in force: "max-freed" or "ensure-free"
    limit_bytes: int | None = None    # ... in bytes as Nix counts them
    paths_over_limit: int = 0         # dead paths the limit left
    free_bytes: int | None = None     # --ensure-free: the file system's free space at planning
    kept_recent: int = 0              # dead paths --keep-recent kept
    protected_during_gc: int = 0      # paths kept because a client announced them
    seconds: float = 0.0
    deleted: list[bytes] = field(default_factory=list)

    def summary(self) -> dict:
        # Not asdict(): it would deep-copy every deleted path (0.1-0.2 s at 80k).
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "deleted"}


# -- the lock and the socket --------------------------------------------------

class GCLock:
    """<state>/gc.lock, exclusively, like Nix's collectGarbage.

    Nix makes the file (0600, as whoever runs it) on first use and never
    re-owns it: were a root Nix process first, the store's owner could never
    lock it.  So gcrootsd makes it when it starts (create()), and root here
    gives it to the state dir's owner."""

    def __init__(self, layout: StoreLayout) -> None:
        self.path = layout.real_state_dir + b"/gc.lock"
        self.fd: int | None = None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if os.geteuid() == 0:
            owner = os.stat(dir_of(self.path))
            if os.fstat(fd).st_uid != owner.st_uid:
                os.fchown(fd, owner.st_uid, owner.st_gid)
        return fd

    def create(self) -> None:
        """Make it now if it is missing; say so if we could not collect with it."""
        try:
            os.close(self._open())
        except OSError as e:
            _log.warning("gc_lock_unusable", path=self.path, error=e.strerror,
                         hint="collecting needs gc.lock to belong to gcrootsd's user")

    def acquire(self, wait: float | None = None,
                on_wait: Callable[[], None] | None = None) -> None:
        """`on_wait` is called once if another process holds it."""
        fd = self._open()
        deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
        held = lock_exclusive(fd, time.monotonic())  # one try first, to say we wait
        if not held and on_wait is not None:
            on_wait()
        if not (held or lock_exclusive(fd, deadline)):
            os.close(fd)
            raise Busy(f"{os.fsdecode(self.path)} is held by another process "
                       "(a Nix garbage collection?); try again later")
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class RootsServer:
    """<state>/gc-socket/socket while we hold gc.lock (Nix's protocol).

    A Nix process keeps its connection for its whole life and announces
    each path it is about to use; our "1" promises that *this* collection
    will not delete it.  So the promise must never come from a collection
    that is over: stop() shuts every connection down (the client sees EOF,
    retakes gc.lock shared, and talks to whichever collector comes next, as
    with Nix's own), and no "1" is sent after stop() has begun."""

    SEND_TIMEOUT = 10.0  # a client that does not read its "1"s is dropped

    def __init__(self, layout: StoreLayout, on_root: Callable[[bytes], None]) -> None:
        self.path = layout.real_state_dir + b"/gc-socket/socket"
        self.on_root = on_root
        self.store_dir = layout.store_dir
        self.store_owner = os.stat(layout.real_store_dir).st_uid
        self._stop = threading.Event()
        self._lock = threading.Lock()            # orders replies against stop()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.received = 0

    def start(self) -> None:
        # Any user's Nix may announce roots (0666, as Nix does).  Under
        # gc.lock a socket left there is a finished collection's.  Its
        # directory may also belong to the store's owner (root collecting a
        # store it does not own): that user can delete the store anyway.
        try:
            sock, _ = listen_unix(self.path, 0o666, dir_owners=(self.store_owner,))
        except OSError as e:
            raise GCError(str(e)) from None
        self._sock = sock  # blocking: stop() wakes accept() by shutting the socket down
        t = threading.Thread(target=self._accept_loop, name="gc-socket", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            t = threading.Thread(target=self._client, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(None)  # recv blocks until data, EOF or stop()'s shutdown
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(self.SEND_TIMEOUT), 0))
        buf = b""
        try:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data or self._stop.is_set():
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    path = parse_store_path(line, self.store_dir)
                    if path is None:
                        _log.warning("gc_socket_garbage", line=line[:200])
                    else:
                        self.received += 1
                        self.on_root(path)  # protected; waits out a deletion in progress
                    with self._lock:
                        if self._stop.is_set():
                            return  # no promise from a finished collection: EOF instead
                        try:
                            conn.sendall(b"1")
                        except OSError:
                            return
                if len(buf) > 65536:
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def stop(self) -> None:
        # The socket file stays, as Nix leaves it: a client that connects
        # after we are gone gets ECONNREFUSED and retries the shared lock
        # (ENOENT would make it fail).
        with self._lock:
            self._stop.set()
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop now
            except OSError:
                pass
            self._sock.close()
        for t in self._threads:
            t.join(timeout=5)


def _remount_refusal(store: bytes) -> str | None:
    """Why make_store_writable() cannot work here, or None."""
    if threading.active_count() > 1:
        # Namespaces belong to the calling thread: in a threaded process (the
        # daemon) a remount would not even reach the deletion worker.
        return (f"{os.fsdecode(store)} is mounted read-only; gcrootsd does not remount it "
                "(that needs CAP_SYS_ADMIN and a single-threaded process): mount the store "
                "read-write (NixOS: boot.nixStoreMountOpts = [ \"nodev\" \"nosuid\" ]) "
                "or collect with `gcroots-query --standalone gc` as root")
    if not effective_caps() >> CAP_SYS_ADMIN & 1:
        return (f"{os.fsdecode(store)} is mounted read-only, and remounting it needs "
                "CAP_SYS_ADMIN: mount the store read-write (NixOS: boot.nixStoreMountOpts = "
                "[ \"nodev\" \"nosuid\" ])")
    return None


def make_store_writable(store: bytes) -> None:
    """What Nix does on a read-only store mount (NixOS): in a private mount
    namespace of this process, remount the store read-write.  Needs
    CAP_SYS_ADMIN, which gcrootsd does not have; then a clear error.  Call
    before any thread starts (the deletion worker inherits the namespace)."""
    if (why := _remount_refusal(store)):
        raise GCError(why)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_REMOUNT, MS_BIND = 0x20000, 0x4000, 0x40000, 0x20, 0x1000
    steps = [("unshare the mount namespace", lambda: libc.unshare(CLONE_NEWNS)),
             ("make mounts private", lambda: libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)),
             ("remount the store read-write",
              lambda: libc.mount(None, store, None, MS_REMOUNT | MS_BIND, None))]
    for what, step in steps:
        if step() != 0:
            err = ctypes.get_errno()
            raise GCError(f"{os.fsdecode(store)} is mounted read-only and we cannot {what} "
                          f"({os.strerror(err)}); remounting needs CAP_SYS_ADMIN: mount the store "
                          "read-write (NixOS: boot.nixStoreMountOpts = [ \"nodev\" \"nosuid\" ])")
    if os.statvfs(store).f_flag & os.ST_RDONLY:
        raise GCError(f"{os.fsdecode(store)} is still read-only after remounting")
    _log.info("store_remounted_read_write", store=store)


# -- deleting ------------------------------------------------------------------------

from .deleter import (CAP_SYS_ADMIN, DeleterProcess, Freed, _count, effective_caps,  # noqa: E402
                      estimate_tree, open_dir, walk_trees, why_undeletable)


def predict_freed(store: bytes, names: list[bytes], links_dir: bytes,
                  limit: int | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[bytes], int, int, int]:
    """What deleting these entries of the store dir in order (and then the
    .links entries left with one link) would free, stopping as a limit
    `limit` stops (after the entry that passes it; 0: none): (the entries
    that go, bytes in the trees, bytes in .links, bytes as Nix counts
    them).  A file counts once, and only if every one of its links goes.
    One walk, by directory fds, like the deletion: nothing followed.
    `progress(n)`: n of the entries walked."""
    with _links_dir(links_dir) as entries:
        links = {(st.st_dev, st.st_ino): st for _, _, st in entries}
    seen: dict[tuple[int, int], list] = {}  # inode -> [stat, links found in the trees]
    freed = nix = top = 0
    going = 0 if limit == 0 else len(names)
    for path, st, _, depth in walk_trees(store, names[:going]):
        if depth == 0:
            if limit is not None and nix > limit:
                going = names.index(path[len(store) + 1:])
                break  # Nix stops after the entry that passed the limit
            top += 1
            if progress is not None and top % 64 == 0:
                progress(top)
        if stat.S_ISDIR(st.st_mode):
            freed += _count(st)
            continue
        key = (st.st_dev, st.st_ino)
        entry = seen.setdefault(key, [st, 0])
        entry[1] += 1
        if st.st_nlink - entry[1] + 1 <= 2:  # as deleter.Freed.file, links gone before counted
            nix += st.st_size
    links_freed = 0
    for key, (st, n) in seen.items():
        in_links = 1 if key in links else 0
        if n + in_links == st.st_nlink:
            if in_links:
                links_freed += _count(st)
            else:
                freed += _count(st)
    # .links entries nobody links to already go too.
    for key, st in links.items():
        if st.st_nlink == 1 and key not in seen:
            links_freed += _count(st)
    return names[:going], freed, links_freed, nix


@contextlib.contextmanager
def _links_dir(links_dir: bytes) -> Iterator[list[tuple[int, bytes, os.stat_result]]]:
    """(fd, name, lstat) of each .links entry, listed through an fd of the
    directory (a `.links` swapped for a symlink is not followed)."""
    try:
        fd = open_dir(links_dir)
    except FileNotFoundError:
        yield []
        return
    try:
        with os.scandir(fd) as it:
            yield [(fd, os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
    finally:
        os.close(fd)


def clean_links(links_dir: bytes) -> int:
    """Unlink .links entries with a link count of 1 (Nix does the same; it
    races with optimisePath as Nix's does)."""
    freed = 0
    with _links_dir(links_dir) as entries:
        for fd, name, st in entries:
            if st.st_nlink == 1:
                try:
                    os.unlink(name, dir_fd=fd)
                    freed += _count(st)
                except FileNotFoundError:
                    pass
    return freed


class DeleterPool:
    """Deletion worker processes (daemon/deleter.py) fed from one queue
    of chunks: as many as there are cores the collector's own process does
    not use -- all but one while it invalidates batches, all of them once
    it is done -- each with a thread here that feeds it.  The worker the
    check started for the collector's core waits (reserve) until
    all_cores().  A failure stops them all: what was queued then is left
    on disk (invalidated, so unregistered garbage the next collection
    removes)."""

    def __init__(self, c: "Collection") -> None:
        self.c = c
        self.queue: queue.Queue[tuple[int, list[bytes], np.ndarray] | None] = queue.Queue()
        self.failure: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.workers: list[DeleterProcess] = []
        self._all = threading.Event()   # the collector's core is free: reserves may work
        self._chunks = 0                # chunks submitted (their sequence numbers)
        try:
            for _ in range(max(1, _cores() - 1)):
                self._add()
            if len(self.workers) < _cores():  # for the check (see there), started now too
                self._add(reserve=True)
        except BaseException:  # (e.g. no process could be started): none left running
            self.close()
            raise

    def check(self, store: bytes, names: list[bytes]) -> str | None:
        """why_undeletable, a share of `names` to each worker (the collector
        waits meanwhile, so the reserve worker takes its core); the first
        share's first reason, so the same path as in one process."""
        if not names:
            return None
        helpers = self.workers
        step = -(-len(names) // len(helpers))
        shares = [names[i:i + step] for i in range(0, len(names), step)] or [[]]
        for w, share in zip(helpers, shares):
            w.start_check(store, share)
        reasons = [w.check_result() for w, _ in zip(helpers, shares)]
        return next((r for r in reasons if r), None)

    def _add(self, reserve: bool = False) -> None:
        worker = DeleterProcess()
        self.workers.append(worker)
        t = threading.Thread(target=self._feed, args=(worker, reserve), name="gc-delete",
                             daemon=True)
        t.start()
        self.threads.append(t)

    def submit(self, batch: list[bytes], nodes: np.ndarray) -> None:
        """`batch`, invalidated; `nodes`: their graph nodes (-1: no valid path)."""
        for i in range(0, len(batch), DELETE_CHUNK):
            self.queue.put((self._chunks, batch[i:i + DELETE_CHUNK], nodes[i:i + DELETE_CHUNK]))
            self._chunks += 1

    def all_cores(self) -> None:
        """No more DB work: the collector's core is the deletion's too."""
        self._all.set()
        if len(self.threads) < _cores() and self.queue.qsize() > 1 and not self.failure:
            self._add()

    def join(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self._all.set()
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def _feed(self, worker: DeleterProcess, reserve: bool) -> None:
        try:
            if reserve:
                self._all.wait()
            while (chunk := self.queue.get()) is not None:
                try:
                    self._delete(worker, *chunk)
                finally:
                    self.queue.task_done()  # after the result is in: join() may return
            self.queue.task_done()
        finally:
            worker.close()

    def _delete(self, worker: DeleterProcess, seq: int, chunk: list[bytes],
                nodes: np.ndarray) -> None:
        c = self.c
        if self.failure:
            # Drain: the main thread stops at the next batch.  These were
            # invalidated but stay on disk (unregistered, collected next
            # time); a Nix process waiting for one may go on.
            c._release(chunk)
            return
        try:
            freed, nix = worker.delete([c.layout.physical(p) for p in chunk])
        except BaseException as e:  # reported by execute(); nothing more is deleted
            if isinstance(e, OSError):
                e = DeletionError(f"{e}. The collection stopped there: the paths it was deleting "
                                  "are no longer registered in the Nix DB, and what is left of "
                                  "them on disk is garbage that the next collection removes once "
                                  "the cause is fixed")
            self.failure.append(e)
            freed = nix = 0
        c._deleted(seq, chunk, nodes, freed, nix)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def newest_first(refs: CSR, dead: np.ndarray, n: int) -> np.ndarray:
    """`dead` (nodes of a graph of `n`, in ValidPaths id order) ordered
    for deletion: every node after each of its referrers in `dead`, and
    otherwise the highest node first.  Nix registers a path after its
    references, so a referrer almost always has the higher id: then the
    order is just descending.  Where one does not (nix-store
    --register-validity registers a batch in hash order), a node gets as
    key the lowest node among itself and its referrers in `dead`,
    transitively, and the order is by key, highest first, then by depth
    below the referrers that have none in `dead`: a referrer's key is never
    lower than its reference's, and with the same key its depth is lower.
    SafetyError if those references form a cycle."""
    in_dead = np.zeros(n, dtype=bool)
    in_dead[dead] = True
    src, dst = refs.pairs()
    keep = in_dead[src] & in_dead[dst]
    src, dst = src[keep], dst[keep].astype(np.int64)
    if not (src < dst).any():  # ids already say it (self references are not edges)
        return np.sort(dead)[::-1].copy()
    within = CSR.from_pairs(n, src, dst)
    pending = np.bincount(dst, minlength=n)  # dead referrers not yet placed
    key = np.arange(n, dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    frontier, placed, level = dead[pending[dead] == 0], 0, 0
    while len(frontier):
        depth[frontier] = level
        placed += len(frontier)
        nxt = within.gather(frontier)
        lens = within.start[frontier + 1] - within.start[frontier]
        np.minimum.at(key, nxt, np.repeat(key[frontier], lens))
        np.subtract.at(pending, nxt, 1)
        frontier = np.unique(nxt[pending[nxt] == 0])
        level += 1
    if placed != len(dead):
        raise SafetyError("the dead paths' references form a cycle; refusing to collect")
    return dead[np.lexsort((-dead, depth[dead], -key[dead]))]


# gcroots/auto/<name> entries set aside for removal get this suffix (Nix
# names them by a 32-character hash only, so it never writes such a name).
SET_ASIDE = b".gcroots-stale"


def remove_stale_auto_links(layout: StoreLayout, judged: list[StaleLink],
                            rescan: Callable[[], RootSet]) -> int:
    """Remove the gcroots/auto links that the helper judged stale (their
    target absent), only where that is certain at the moment of removal.
    Call under gc.lock.  The helper's view decides, never ours: gcrootsd
    cannot look into 0700 homes (EACCES is no proof of absence).

    Nix 2.8 makes an indirect root in addPermRoot: addTempRoot(path), then
    the result link T (a temporary link renamed over T), then
    addIndirectRoot: a temporary link renamed over A = auto/<hash of T>,
    whose content is always T.  So whenever Nix (re)creates T, it replaces A
    afterwards by a new inode.  We remove A in three steps:

    1. A is set aside: renamed (RENAME_NOREPLACE) to A + SET_ASIDE, the
       name "held", if it is still the link the helper judged: same
       (dev, ino, ctime) -- taken by the helper *before* it found T absent
       -- and same target.  If Nix replaced A after that lstat, the
       identity differs and A stays.  If Nix replaces A between our check
       and the rename, we hold Nix's new link: its inode is not the judged
       one (a rename changes the ctime, never the inode), so it goes back
       at once -- A must not be missing after Nix wrote it, even for the
       length of a scan.  (Were the inode number reused meanwhile, step 2
       finds T alive and step 3 puts it back.)  Held, a link is still in
       gcroots/auto and points to T: a root for Nix and for us all along.
    2. The helper scans again (a complete scan that starts now).
    3. Each held link that this scan found stale, and that is unchanged
       since (identity and target), is unlinked; any other is put back as
       A (RENAME_NOREPLACE: if Nix made A anew meanwhile, that one stays and
       the held twin, with the same target, goes; one with another target
       stays held).  If the scan fails, every held link is put back.

    Why nothing live is lost: a held link is only ever written by us, so
    the link unlinked in step 3 is the one the scan of step 2 saw with T
    absent.  If Nix creates T after that scan looked, it then writes A --
    not the held name -- so T stays rooted; if it created T before, the scan
    saw T (not stale) unless T was removed again before the scan looked, in
    which case it is no root.  A crash between the steps leaves a held link
    in gcroots/auto: a root while T exists, removed like any stale link once
    T is gone.  The window Nix 2.8 itself has (lstat T, then unlink A, as
    root) is closed: the unlink never races with Nix's rename."""
    held: list[tuple[bytes, StaleLink]] = []   # (name to restore, as judged)
    for s in judged:
        if not is_in_dir(s.link, layout.auto_dir):
            continue
        if s.identity is None:
            _log.warning("stale_link_kept", link=s.link, reason="the helper gave no identity "
                         "(root-stream protocol 1): upgrade gcroots-helper")
            continue
        if _target_seen(s.target) or not _is_link_to(s.link, s.target, s.identity):
            continue  # changed since the helper judged it
        if s.link.endswith(SET_ASIDE):
            held.append((s.link[:-len(SET_ASIDE)], s))  # set aside by a run that crashed
        elif _rename_noreplace(s.link, s.link + SET_ASIDE):
            if _same_inode(s.link + SET_ASIDE, s.identity):
                held.append((s.link, s))
            else:
                _log.info("stale_link_replaced_meanwhile", link=s.link, target=s.target)
                _put_back(s.link, s.target)
    if not held:
        return 0
    try:
        again = {(s.link, s.target): s for s in rescan().stale}
    except IncompleteRoots as e:
        _log.warning("stale_links_kept", count=len(held), reason=str(e))
        again = {}
    removed = 0
    for name, s in held:
        aside = name + SET_ASIDE
        now = again.get((aside, s.target))
        if (now is not None and now.identity is not None and not _target_seen(s.target)
                and _is_link_to(aside, s.target, now.identity)):
            try:
                os.unlink(aside)
                removed += 1
                _log.info("stale_link_removed", link=name, target=s.target)
                continue
            except OSError as e:
                _log.warning("stale_link_not_removed", link=aside, error=e.strerror)
        _put_back(name, s.target)
    return removed


def _put_back(name: bytes, target: bytes) -> None:
    """Rename the held link back to `name`, unless Nix made `name` anew
    meanwhile: then, same target, one is enough."""
    aside = name + SET_ASIDE
    if not _rename_noreplace(aside, name) and _is_link_to(name, target):
        _unlink_quietly(aside)


def _same_inode(path: bytes, identity: tuple[int, int, int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity[:2]


def _is_link_to(path: bytes, target: bytes, identity: tuple[int, int, int] | None = None) -> bool:
    """`path` is a link to `target` (and, given an identity, that very link)."""
    try:
        st = os.lstat(path)
        return (stat.S_ISLNK(st.st_mode) and (identity is None or link_identity(st) == identity)
                and abs_path(os.readlink(path), dir_of(path)) == target)
    except OSError:
        return False


def _target_seen(target: bytes) -> bool:
    """We see it exist.  (Not seeing it proves nothing: EACCES in a home.)"""
    try:
        os.lstat(target)
        return True
    except OSError:
        return False


def _rename_noreplace(src: bytes, dst: bytes) -> bool:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    if libc.renameat2(AT_FDCWD, src, AT_FDCWD, dst, RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err != errno.EEXIST:
        _log.warning("stale_link_rename_failed", src=src, dst=dst, error=os.strerror(err))
    return False


def _unlink_quietly(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        _log.warning("stale_link_not_removed", link=path, error=e.strerror)


# -- one collection ----------------------------------------------------------------

class Collection:
    """begin() -> plan(rootset) -> execute() -> end(); see the module doc."""

    def __init__(self, layout: StoreLayout, settings: GCSettings, options: GCOptions,
                 progress: Callable[[Progress], None] | None = None,
                 on_deleted: Callable[[list[bytes]], None] | None = None) -> None:
        self.layout = layout
        self.settings = settings
        self.options = options
        self.progress = progress or (lambda msg: None)
        self.on_deleted = on_deleted or (lambda paths: None)
        self.lock = GCLock(layout)
        self.links_dir = layout.real_store_dir + b"/.links"   # Nix's hard links of equal files
        self.server: RootsServer | None = None
        self.result = GCResult(dry_run=options.dry_run)
        self._cond = threading.Condition()
        # Must not be deleted: live and announced valid paths (a mask of the
        # graph's nodes), and entries no valid path that a temp root keeps.
        self._protected = None
        self._protected_other: set[bytes] = set()
        self._temp_hashes: set[bytes] = set()
        self._pending: set[bytes] = set()        # hash parts being deleted right now
        self._graph: StoreGraph | None = None
        self._db: StoreDB | None = None
        self._analysis: Analysis | None = None
        self._temp_files_at_lock: frozenset[tuple[bytes, int]] | None = None
        self._temp_reader: TempRootsReader | None = None
        self._dead_nodes = None                  # what goes: valid paths (nodes)...
        self._dead_other: list[bytes] = []       # ... and entries that are no valid path
        self._fks = ForeignKeys()
        self._deleted_rows: dict[str, int] = {}
        self._deleted_chunks: dict[int, list[bytes]] = {}  # chunk number -> paths deleted
        self.timings: dict[str, float] = {}      # phase -> seconds (the gc_finished log line)
        self._total = 0                          # paths the deletion goes through
        self._t0 = time.monotonic()
        self._pool: DeleterPool | None = None    # start_deleters()'s, for execute()

    # phase 1
    def begin(self) -> None:
        if self.options.dry_run:
            return  # a dry run is a query: no lock, no socket, nothing removed
        self._check_writable()
        # As Nix: free the space kept in reserve for a full disk, so that the
        # collection has room to work; the next Nix to open the store (any
        # Nix command, a nix-daemon connection) reserves it again.
        try:
            os.unlink(self.layout.real_state_dir + b"/db/reserved")  # Nix's gc-reserved-space
        except FileNotFoundError:
            pass
        self.lock.acquire(on_wait=lambda: self.progress(Progress(
            f"waiting for {os.fsdecode(self.lock.path)} (another garbage collection holds it)",
            "lock")))
        self._temp_files_at_lock = temp_root_files(self.layout)
        self._temp_reader = TempRootsReader(self.layout, self._temp_files_at_lock)
        self.server = RootsServer(self.layout, self._announced)
        self.server.start()
        self.result.temproots_removed = remove_stale(self.layout)

    def start_deleters(self) -> None:
        """The deletion workers, started now (a Python each, ~40 ms), to be
        ready once the roots are scanned and the plan made: gcrootsd and
        --standalone call it right after begin().  execute() takes them;
        end() stops them if it never did."""
        if not self.options.dry_run and self._pool is None:
            self._pool = DeleterPool(self)

    def _check_writable(self, *, remount: bool = True) -> None:
        store = self.layout.real_store_dir
        if os.statvfs(store).f_flag & os.ST_RDONLY:
            if remount:
                make_store_writable(store)
            elif (why := _remount_refusal(store)):
                raise GCError(why)
        state = self.layout.real_state_dir
        for d in (store, state + b"/db", self.layout.db_path, state, state + b"/gc-socket",
                  self.layout.temproots_dir, self.lock.path):
            if os.path.lexists(d) and not os.access(d, os.W_OK):
                st = os.lstat(d)
                why = ("it is on a read-only file system" if os.statvfs(d).f_flag & os.ST_RDONLY
                       else f"its mode is {stat.S_IMODE(st.st_mode):o}" if st.st_uid == os.geteuid()
                       else "gcrootsd must run as the store's owner (and own the state dir) to "
                            "collect garbage")
                raise GCError(f"no write access to {os.fsdecode(d)}: {why}")

    def _announced(self, path: bytes) -> None:
        """A Nix process needs `path` (gc-socket).  Protect it and its
        closure, and return only once none of it is being deleted."""
        with self._cond:
            hashes = self._protect([path])
            while self._pending & hashes:
                self._cond.wait()
        _log.info("gc_socket_root", path=path)

    def _protect(self, paths: list[bytes]) -> set[bytes]:
        return self._protect_hashes({hash_part(p) for p in paths})

    def _protect_hashes(self, hashes: set[bytes]) -> set[bytes]:
        """Under self._cond.  Invariant, from plan() on: for every temp-root
        hash part, every valid path with it and their closures are protected
        (Nix matches temp roots by hash part).  Before plan() there is no
        graph yet: the hashes are kept and plan() protects their closures.
        Returns the hash parts now protected, for waiting on `_pending`."""
        self._temp_hashes |= hashes
        g = self._graph
        if g is None:
            return set(hashes)
        starts = [n for h in hashes for n in g.nodes_with_hash(h, self.layout.store_dir)]
        closure = g.closure_mask(starts, self.settings)
        new = closure & ~self._protected
        self.result.protected_during_gc += int(new.sum())
        self._protected |= closure
        return set(hashes) | {hash_part(g.paths[n]) for n in np.flatnonzero(closure)}

    # phase 2
    def plan(self, rootset: RootSet, db: StoreDB, listing: "StoreListing | None" = None) -> Analysis:
        """`listing`: gcrootsd's view of the store dir (else it is listed)."""
        with db.snapshot():  # the daemon's graph if it is still current
            if db.cached_graph(self.settings.follows_realisations) is None:
                self.progress(Progress("loading the store graph", "load"))
        self.progress(Progress("computing the live set", "plan"))
        asked = self.options.paths
        a = engine.analyze(self.layout, db, rootset, self.settings, want_dead=asked is None,
                           temp_files_at_lock=self._temp_files_at_lock, listing=listing, load=True)
        g = a.graph
        self._set_limit()
        protected = a.live_mask
        if asked is None:
            dead, other = np.flatnonzero(a.dead_mask), list(a.dead_extra)
            if self.options.keep_recent is not None:
                kept = recent_closure(db, g, self.settings, self.options.keep_recent)
                self.result.kept_recent = int(kept[dead].sum())
                dead = dead[~kept[dead]]
                protected = protected | kept
        else:
            refusals = engine.delete_refusals(a, db, g, list(asked))
            if refusals:
                raise Refused(f"refusing to delete ({len(set(asked))} paths asked for; nothing "
                              "was deleted):\n  " + "\n  ".join(refusals))
            nodes = {p: g.index.get(p) for p in set(asked)}
            dead = np.array(sorted(n for n in nodes.values() if n is not None), dtype=np.int64)
            other = sorted(p for p, n in nodes.items() if n is None)
        with self._cond:
            self._graph, self._db, self._analysis = g, db, a
            self._dead_nodes, self._dead_other = dead, other
            self._protected = protected.copy()
            self._protected_other = set(a.live_unregistered)
            # Including the paths announced on gc-socket since begin(), whose
            # closures could not be computed without the graph.
            self._protect_hashes(self._temp_hashes | a.temp.hashes)
        return a

    def _set_limit(self) -> None:
        """--max-freed and --ensure-free as one limit, in bytes as Nix counts
        them (the tighter one); --ensure-free from the free space now, under
        gc.lock, as Nix's auto-GC computes its max-freed."""
        limits = []
        if self.options.max_freed is not None:
            limits.append((self.options.max_freed, "max-freed"))
        if self.options.ensure_free is not None:
            free, size = free_space(self.layout.real_store_dir)
            want = resolve_size(self.options.ensure_free, size)
            self.result.free_bytes = free
            limits.append((max(0, want - free), "ensure-free"))
        if limits:
            self.result.limit_bytes, self.result.limit = min(limits)

    def _order(self) -> tuple[list[bytes], "np.ndarray"]:
        """What goes, in order: the entries that are no valid path (no DB
        rows), then the dead valid paths, referrers before references (as
        Nix deletes), otherwise newest first: highest ValidPaths id first
        (graph nodes are in id order).  Each batch is then a run of
        neighbouring ids, whose rows and index entries share pages.
        (paths, nodes; -1 for the former)."""
        g, dead = self._graph, self._dead_nodes
        order = newest_first(g.refs, np.asarray(dead, dtype=np.int64), len(g))
        others = sorted(self._dead_other)
        return (others + [g.paths[n] for n in order],
                np.concatenate([np.full(len(others), -1, dtype=np.int64), order]))

    # phase 3
    def execute(self, db_path: bytes) -> GCResult:
        """The DB work for batch k+1 overlaps with deleting batch k from disk,
        which worker processes do (daemon/deleter.py): in this process the
        two would fight over the GIL.  Batches grow: the first is small so
        that deletion starts at once, the later ones big (each commit
        rewrites the DB's index pages).  Phase timings: self.timings."""
        t = time.perf_counter()
        order, nodes = self._order()
        t = self._took("order", t)
        self._total = len(order)
        if self.options.dry_run:
            self._check_deletable(order)
            names, freed, links, self.result.nix_bytes_freed = predict_freed(
                self.layout.real_store_dir, self._names(order), self.links_dir,
                self.result.limit_bytes, lambda n: self.progress(
                    Progress("measuring what would be freed", "measure", n, len(order))))
            self._stopped(len(order) - len(names))
            self.result.paths = len(names)
            self.result.disk_bytes_freed = freed + links
            self.result.nar_bytes_freed = self._nar_bytes(nodes[:len(names)])
            self.result.deleted = order[:len(names)]
            self.result.stale_links_removed = len(self._analysis.rootset.stale)
            self.result.seconds = time.monotonic() - self._t0
            return self.result
        pool, self._pool = self._pool or DeleterPool(self), None
        try:
            self._check_deletable(order, pool)
            t = self._took("check", t)
            writer = _writer(db_path)
        except sqlite3.Error as e:
            pool.close()
            raise DBError(f"nothing was deleted: {describe_error(e, db_path)}") from None
        except BaseException:
            pool.close()
            raise
        g = self._graph
        done = np.zeros(len(g), dtype=bool)  # invalidated, in order
        done_count = 0
        unlinked: dict[tuple[int, int], int] = {}  # links the --max-freed forecast saw go
        # Small batches when stopping at a size or pacing the I/O.
        limited = self.result.limit_bytes is not None
        fixed = MAX_FREED_BATCH if limited else 64 if self.options.throttle else None
        size = fixed or FIRST_BATCH
        self.progress(Progress("deleting", "delete", 0, len(order)))
        batch: list[bytes] = []  # claimed, not yet handed to the deleters
        try:
            start = 0
            while start < len(order):
                if pool.failure or self._limit_reached():
                    break
                chunk, chunk_nodes = order[start:start + size], nodes[start:start + size]
                start += len(chunk)
                size = fixed or min(int(size * GROWTH), BATCH)
                t = self._took("db", t)
                batch, batch_nodes = self._claim(chunk, chunk_nodes)
                t = self._took("claim", t)
                if not batch:
                    continue
                if limited:
                    # Nix stops right after the path that frees more than the
                    # limit: invalidate nothing beyond it (the rest comes back).
                    cut, _ = self._within_limit(batch, self.result.nix_bytes_freed, unlinked)
                    if len(cut) < len(batch):
                        start -= len(chunk) - chunk.index(cut[-1]) - 1
                        self._release(batch[len(cut):])
                        batch, batch_nodes = cut, batch_nodes[:len(cut)]
                self._check_referrer_nodes(batch_nodes, done)
                t = self._took("referrers", t)
                kept = self._invalidate(writer, batch, batch_nodes)
                if len(kept) < len(batch):
                    self._release([p for p in batch if p not in kept])
                    batch_nodes = batch_nodes[[p in kept for p in batch]]
                    batch = [p for p in batch if p in kept]
                valid = batch_nodes[batch_nodes >= 0]
                done[valid] = True
                done_count += len(batch)
                if self._db is not None:
                    self._db.forget((int(i) for i in g.ids[valid]),
                                    self._deleted_rows.get("realisations", 0))
                pool.submit(batch, batch_nodes)
                batch = []
                if limited:
                    pool.join()  # the limit is checked on what is really gone
                if self.options.throttle:
                    time.sleep(self.options.throttle)
            t = self._took("db", t)
            pool.all_cores()  # no more DB work: the deletion may have this core too
        except sqlite3.Error as e:  # that transaction rolled back: nothing of it is deleted
            raise DBError((f"the collection stopped after {done_count} paths: " if done_count else
                           "nothing was deleted: ") + describe_error(e, db_path)) from None
        finally:
            if batch:  # failed between claiming and queueing: nothing of it is deleted
                self._release(batch)
            pool.close()
            writer.close()
        t = self._took("delete_after_db", t)
        self.result.deleted = [p for k in sorted(self._deleted_chunks)
                               for p in self._deleted_chunks[k]]  # in plan order
        if pool.failure:
            raise pool.failure[0]
        if self._limit_reached():
            self._stopped(len(order) - start)
        self.progress(Progress("cleaning .links", "links"))
        self.result.disk_bytes_freed += clean_links(self.links_dir)
        self._took("links", t)
        self.result.seconds = time.monotonic() - self._t0
        return self.result

    def _took(self, phase: str, since: float) -> float:
        """Adds the time since `since` to the phase's; returns now."""
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - since
        return now

    def _stopped(self, left: int) -> None:
        self.result.stopped_at_limit = left > 0
        self.result.paths_over_limit = left

    def _nar_bytes(self, nodes: "np.ndarray") -> int:
        """The DB's NAR sizes of the valid paths among `nodes` (-1: none)."""
        return int(self._graph.sizes[nodes[nodes >= 0]].sum())

    def _check_deletable(self, order: list[bytes], pool: "DeleterPool | None" = None) -> None:
        """Collection never starts what it cannot finish: before the plan is
        shown (a dry run) and before the first row is invalidated, refuse
        if the worker could not delete one of these paths (why_undeletable;
        in the deleter processes, a share each, when there are some)."""
        if self.options.dry_run:
            self._check_writable(remount=False)  # begin() checked a real run's
        names = self._names(order)
        if pool is None:
            why = why_undeletable(self.layout.real_store_dir, names, lambda n: self.progress(
                Progress("checking that it can be deleted", "check", n, len(order))))
        else:
            self.progress(Progress("checking that it can be deleted", "check", 0, len(order)))
            why = pool.check(self.layout.real_store_dir, names)
        if why is not None:
            raise GCError(f"refusing to collect, nothing was deleted: cannot delete {why}")

    def _names(self, paths: list[bytes]) -> list[bytes]:
        """Store paths -> their names in the store dir."""
        skip = len(self.layout.store_dir) + 1
        return [p[skip:] for p in paths]

    def _limit_reached(self) -> bool:
        """More than the limit freed, as Nix counts (and checks after each
        path); a limit of 0 collects nothing, as --max-freed 0 with Nix."""
        limit = self.result.limit_bytes
        with self._cond:
            return limit is not None and (limit == 0 or self.result.nix_bytes_freed > limit)

    def _within_limit(self, paths: list[bytes], total: int,
                      unlinked: dict[tuple[int, int], int],
                      progress: Progress | None = None) -> tuple[list[bytes], int]:
        """Where the limit stops when deleting `paths` in order with
        `total` bytes freed so far (Nix's count, forecast from the files):
        after the path that passes the limit.  Returns those paths and the
        total after them (all of them without a limit)."""
        limit = self.result.limit_bytes
        if limit == 0:
            return [], total
        for i, p in enumerate(paths):
            if limit is not None and total > limit:
                return paths[:i], total
            if progress is not None and i % 64 == 0:
                self.progress(Progress(progress.message, progress.phase, i, progress.total))
            freed = Freed()
            estimate_tree(self.layout.physical(p), freed, unlinked)
            total += freed.nix
        return paths, total

    def _deleted(self, seq: int, batch: list[bytes], nodes: "np.ndarray", freed: int,
                 nix: int) -> None:
        """A deleter finished (or, after a failure, skipped) `batch`, the
        chunk `seq` of the plan (deleters finish them in any order)."""
        with self._cond:
            self.result.paths += len(batch)
            self.result.disk_bytes_freed += freed
            self.result.nix_bytes_freed += nix
            self.result.nar_bytes_freed += self._nar_bytes(nodes)
            self._deleted_chunks[seq] = batch
            self._pending -= {hash_part(p) for p in batch}
            self._cond.notify_all()
            done = self.result.paths, self.result.disk_bytes_freed
        self.progress(Progress("deleting", "delete", done[0], self._total, done[1]))
        self.on_deleted(batch)

    def _release(self, batch: list[bytes]) -> None:
        """No longer being deleted: wake Nix processes waiting on gc-socket."""
        with self._cond:
            self._pending -= {hash_part(p) for p in batch}
            self._cond.notify_all()

    def _claim(self, batch: list[bytes], nodes: "np.ndarray") -> tuple[list[bytes], "np.ndarray"]:
        """Read what the temp roots files gained since (TempRootsReader),
        drop what became protected, mark the rest as being deleted (until
        a deleter is done with it)."""
        try:
            fresh = self._temp_reader.read()
        except UnreadableTempRoots as e:
            raise GCError(str(e)) from None
        with self._cond:
            new_hashes = fresh.hashes - self._temp_hashes
            if new_hashes:
                self._protect_hashes(new_hashes)
            free = np.ones(len(batch), dtype=bool)
            valid = nodes >= 0
            free[valid] = ~self._protected[nodes[valid]]
            temp, other = self._temp_hashes, self._protected_other
            keep = [ok and hash_part(p) not in temp and (v or p not in other)
                    for p, ok, v in zip(batch, free.tolist(), valid.tolist())]
            kept = [p for p, k in zip(batch, keep) if k]
            self._pending |= {hash_part(p) for p in kept}
            return kept, nodes[np.array(keep, dtype=bool)]

    def _check_referrers(self, batch: list[bytes], done: set[bytes]) -> None:
        """Never delete a path that something not (being) deleted refers to."""
        g = self._graph
        nodes = np.array([g.index.get(p, -1) for p in batch], dtype=np.int64)
        mask = np.zeros(len(g), dtype=bool)
        mask[[n for n in (g.index.get(p) for p in done) if n is not None]] = True
        self._check_referrer_nodes(nodes, mask)

    def _check_referrer_nodes(self, nodes: "np.ndarray", done: "np.ndarray") -> None:
        """... for the valid ones of `nodes`, given those already invalidated."""
        g = self._graph
        nodes = nodes[nodes >= 0]
        rev = g.referrers()
        ok = done.copy()
        ok[nodes] = True
        ok |= g.gone
        referrers = rev.gather(nodes)
        bad = np.flatnonzero(~ok[referrers])
        if len(bad):
            r = int(referrers[bad[0]])
            victim = next(int(n) for n in nodes if r in rev[n])
            raise SafetyError(f"{g.paths[victim].decode(errors='replace')} is still referenced by "
                              f"{g.paths[r].decode(errors='replace')}; refusing to delete it")

    def _invalidate(self, writer: sqlite3.Connection, batch: list[bytes],
                    nodes: "np.ndarray") -> list[bytes]:
        """One transaction: drop the batch's ValidPaths rows and do what
        the DB's foreign keys make Nix's row-by-row invalidation do (see
        _delete_cascading), in bulk inside our write transaction -- no
        other writer can slip in -- the same guarantee at half the cost.
        Rows go by the graph's ids (never reused: AUTOINCREMENT).  Entries
        that were no valid path when we planned but are valid now
        (registered meanwhile) are not ours to delete: returns the batch
        without them."""
        g = self._graph
        ids = g.ids[nodes[nodes >= 0]].tolist()
        others = [p for p, n in zip(batch, nodes.tolist()) if n < 0]
        try:
            writer.execute("BEGIN IMMEDIATE")
            newly = {p for _, p in _valid_rows(writer, others)} if others else set()
            if newly:
                _log.warning("gc_skipping_newly_registered", count=len(newly))
            writer.execute("DELETE FROM temp.gc_batch")
            writer.execute("INSERT INTO temp.gc_batch SELECT value FROM json_each(?)",
                           (json.dumps(ids),))
            self._deleted_rows = _delete_cascading(writer, _PathOfId(g), self._fks)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise
        return [p for p in batch if p not in newly]

    def remove_stale_links(self, rescan: Callable[[], RootSet]) -> int:
        """After execute(), still under gc.lock: the auto links our scan found
        stale, if `rescan` (a new complete helper scan) agrees; see
        remove_stale_auto_links."""
        if self.options.dry_run or self._analysis is None or not self._analysis.rootset.stale:
            return 0
        self.result.stale_links_removed = remove_stale_auto_links(
            self.layout, self._analysis.rootset.stale, rescan)
        return self.result.stale_links_removed

    # phase 4
    def end(self) -> None:
        if self._pool is not None:  # start_deleters()'s workers, never used
            self._pool, pool = None, self._pool
            pool.close()
        if self.server is not None:
            self.server.stop()
        self.lock.release()


def _valid_rows(conn: sqlite3.Connection, paths: list[bytes]) -> list[tuple[int, bytes]]:
    """(id, path) of those of `paths` that are in ValidPaths.  Store paths
    are ASCII, and JSON carries them to SQLite in one statement; other
    names (junk entries; a DB is input too) are matched byte for byte."""
    rows = conn.execute("SELECT v.id, v.path FROM json_each(?) j JOIN ValidPaths v "
                        "ON v.path = j.value", (json.dumps([p.decode("ascii") for p in paths
                                                            if p.isascii()]),)).fetchall()
    for p in paths:
        if not p.isascii():
            rows += conn.execute("SELECT id, path FROM ValidPaths WHERE path = CAST(? AS TEXT)",
                                 (p,)).fetchall()
    return rows


class _PathOfId:
    """id -> path of a graph's valid path (for messages: looked up on use)."""

    def __init__(self, graph: StoreGraph) -> None:
        self.graph = graph

    def __getitem__(self, i: int) -> bytes:
        return self.graph.paths[int(self.graph.nodes_of(np.array([i], dtype=np.int64))[0])]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _foreign_keys(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str, bool]]]:
    """parent table -> [(child table, column, cascade?)] for every foreign
    key of the DB: in Nix 2.8 through today's schemas Refs and
    DerivationOutputs on ValidPaths, and with ca-derivations Realisations
    on ValidPaths and RealisationsRefs on Realisations (tables that stay
    when a newer Nix moves on).  Read from the DB itself, inside the
    transaction: a Nix that first runs with ca-derivations creates its
    tables whenever it likes.  A kind of key no Nix schema has stops the
    collection: we would not know what deleting a row must do."""
    fks: dict[str, list[tuple[str, str, bool]]] = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        child = table.decode()
        for row in conn.execute(f"PRAGMA foreign_key_list({_ident(child)})"):
            parent, column, to, on_delete = row[2].decode(), row[3].decode(), row[4], row[6]
            if to not in (None, b"id") or on_delete not in (b"CASCADE", b"RESTRICT", b"NO ACTION"):
                raise SafetyError(f"the Nix DB's table {child} has a foreign key ({column} -> "
                                  f"{parent}.{to}, ON DELETE {on_delete.decode()}) that no Nix "
                                  "schema has; refusing to collect")
            fks.setdefault(parent.lower(), []).append((child, column, on_delete == b"CASCADE"))
    return fks


class ForeignKeys:
    """_foreign_keys(), read again only when the schema changed (one
    collection runs many transactions)."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._fks: dict = {}

    def get(self, conn: sqlite3.Connection) -> dict[str, list[tuple[str, str, bool]]]:
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version != self._version:
            self._fks, self._version = _foreign_keys(conn), version
        return self._fks


def _delete_cascading(conn: sqlite3.Connection, paths: "dict[int, bytes] | _PathOfId",
                      fks: ForeignKeys | None = None) -> dict[str, int]:
    """Delete the ValidPaths rows whose ids are in temp.gc_batch, then
    what their foreign keys say, as SQLite does for Nix's deletions
    (foreign keys on): ON DELETE CASCADE rows go too (and theirs, and so
    on); a RESTRICT row left pointing at a deleted row refuses the whole
    transaction.  The schema's triggers fire as for Nix (DeleteSelfRefs,
    and DeleteSelfRefsViaRealisations of Nix >= 2.9, which turns a
    restricting RealisationsRefs row into a deleted one).  `paths`: id ->
    path of the rows, for messages.  `fks`: a collection's cache.
    Returns how many rows of each table (but ValidPaths) went."""
    fks = (fks or ForeignKeys()).get(conn)
    deleted: dict[str, int] = {}  # table -> rows (for StoreDB.forget)
    conn.execute("DELETE FROM ValidPaths WHERE id IN temp.gc_batch")
    gone = {"validpaths": "temp.gc_batch"}  # table -> temp table of its deleted ids
    todo, restrict, rounds = ["validpaths"], [], 0
    while todo:
        parent = todo.pop(0)
        rounds += 1
        if rounds > 64:  # Nix's keys are two levels deep
            raise SafetyError("the Nix DB's foreign keys form a cycle; refusing to collect")
        for child, column, cascade in fks.get(parent, ()):
            if not cascade:
                restrict.append((child, column, parent))
                continue
            where = f"FROM {_ident(child)} WHERE {_ident(column)} IN {gone[parent]}"
            if child.lower() in fks:  # its own children follow: remember which ids go
                tmp = gone.setdefault(child.lower(), f"temp.gc_gone_{len(gone)}")
                conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp[5:]} (id INTEGER PRIMARY KEY)")
                conn.execute(f"INSERT OR IGNORE INTO {tmp} SELECT id {where}")
                todo.append(child.lower())
            deleted[child.lower()] = deleted.get(child.lower(), 0) + \
                conn.execute(f"DELETE {where}").rowcount
    for child, column, parent in restrict:
        bad = conn.execute(f"SELECT rowid, {_ident(column)} FROM {_ident(child)} "
                           f"WHERE {_ident(column)} IN {gone[parent]} LIMIT 1").fetchone()
        if bad is None:
            continue
        if child.lower() == "refs":
            (referrer,) = conn.execute("SELECT referrer FROM Refs WHERE rowid = ?",
                                       (bad[0],)).fetchone()
            path = conn.execute("SELECT path FROM ValidPaths WHERE id = ?", (referrer,)).fetchone()
            who = (path[0].decode(errors="replace") if path is not None
                   else f"a Refs row of id {referrer}, which is not a valid path,")
            raise SafetyError(f"the Nix DB says {who} refers to "
                              f"{paths[bad[1]].decode(errors='replace')}, which we were about "
                              "to delete (registered during this collection, or a damaged DB); "
                              "stopping")
        raise SafetyError(f"the Nix DB's table {child} still refers ({column} = {bad[1]}) to a "
                          f"row of {parent} that goes with the paths we were about to delete; "
                          "stopping")
    for tmp in gone.values():
        if tmp != "temp.gc_batch":
            conn.execute(f"DELETE FROM {tmp}")
    return deleted


def _writer(db_path: bytes) -> sqlite3.Connection:
    _mend_wal_modes(db_path)
    conn = sqlite3.connect(os.fsdecode(db_path), timeout=DB_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    # Foreign keys off: _delete_cascading() does what they would, in bulk.
    conn.text_factory = bytes  # paths as bytes, like every other read
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("PRAGMA synchronous = NORMAL")  # as Nix (WAL: durable at checkpoints)
    # The pages of Refs' three indexes that a batch touches, kept between
    # statements and batches (2 MB by default: each batch read them anew).
    conn.execute("PRAGMA cache_size = -131072")
    conn.execute(f"PRAGMA busy_timeout = {int(DB_BUSY_TIMEOUT * 1000)}")
    conn.execute("CREATE TEMP TABLE gc_batch (id INTEGER PRIMARY KEY)")
    return conn


def _mend_wal_modes(db_path: bytes) -> None:
    """SQLite creates the -shm and -wal files with the mode the DB file has
    at that moment.  Made while the DB was read-only (0444), they stay so
    after it is made writable again, and every write then fails with
    SQLITE_READONLY until SQLite happens to recreate them.  Ours get the DB
    file's mode back.  Through an O_PATH fd: closing any other fd of the
    -shm file would drop every POSIX lock this process holds on it (fcntl
    locks are per process), our readers' included -- then a Nix process may
    think itself the first and truncate the -shm they have mapped (SIGBUS).
    Closing an O_PATH fd leaves locks alone; O_NOFOLLOW keeps a link a link."""
    try:
        mode = stat.S_IMODE(os.stat(db_path).st_mode)
    except OSError:
        return  # connect() says why
    if not mode & stat.S_IWUSR:
        return  # still read-only: nothing to mend yet
    for suffix in (b"-shm", b"-wal"):
        try:
            fd = os.open(db_path + suffix, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() \
                    and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(f"/proc/self/fd/{fd}", mode)   # fchmod refuses an O_PATH fd
                _log.info("db_file_mode_mended", path=db_path + suffix,
                          mode=f"{stat.S_IMODE(st.st_mode):o} -> {mode:o}")
        finally:
            os.close(fd)
