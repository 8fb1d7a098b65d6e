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
6. Remove `.links` entries nobody else links to; then the caller removes
   the gcroots/auto links that two helper scans found stale
   (remove_stale_auto_links).

A dry run only computes: what would go and exactly how many bytes that
frees, counting a file only if all of its hard links go.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import sqlite3
import stat
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from gcroots import log
from gcroots.layout import StoreLayout
from gcroots.storepath import abs_path, dir_of, hash_part, is_in_dir, parse_store_path

from . import engine
from .engine import Analysis, RootSet
from .graph import StoreGraph
from .nixconf import GCSettings
from .store import StoreDB
from .temproots import read_temp_roots

LOCK_WAIT = 60.0          # for a Nix GC or a client that holds gc.lock
BATCH = 2048              # paths per invalidation transaction (few commits: each rewrites index pages)
MAX_FREED_BATCH = 256     # ... when stopping at --max-freed (each cut where it stops)
_log = log.get("gcroots.gc")


class GCError(Exception):
    pass


class Busy(GCError):
    pass


class SafetyError(GCError):
    """A check that must never fail did: stop before deleting anything more."""


class Refused(GCError):
    """Paths asked for by name may not be deleted (nix-store --delete
    would refuse too): nothing is deleted."""


@dataclass
class GCOptions:
    dry_run: bool = False
    max_freed: int | None = None      # stop once this many bytes are freed
    throttle: float = 0.0             # seconds to sleep between batches (I/O politeness)
    paths: tuple[bytes, ...] | None = None  # delete exactly these (nix-store --delete)


@dataclass
class GCResult:
    dry_run: bool
    paths: int = 0
    bytes_freed: int = 0              # du-style: blocks of files whose last link went, dirs
    links_freed: int = 0              # bytes freed in .links
    nix_bytes_freed: int = 0          # as Nix counts (and stops --max-freed): see deleter.py
    stale_links_removed: int = 0
    temproots_removed: int = 0
    stopped_at_limit: bool = False
    protected_during_gc: int = 0      # paths kept because a client announced them
    seconds: float = 0.0
    deleted: list[bytes] = field(default_factory=list)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("deleted")
        return d


# -- the lock and the socket --------------------------------------------------

class GCLock:
    """<state>/gc.lock, exclusively, like Nix's collectGarbage."""

    def __init__(self, layout: StoreLayout) -> None:
        self.path = layout.gc_lock_path
        self.fd: int | None = None

    def acquire(self, wait: float = LOCK_WAIT) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise Busy(f"{os.fsdecode(self.path)} is held by another process "
                               "(a Nix garbage collection?); try again later") from None
                time.sleep(0.1)

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
        self.path = layout.gc_socket_path
        self.on_root = on_root
        self.store_dir = layout.store_dir
        self._stop = threading.Event()
        self._lock = threading.Lock()            # orders replies against stop()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.received = 0

    def start(self) -> None:
        os.makedirs(dir_of(self.path), mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.path)
        os.chmod(self.path, 0o666)  # any user's Nix may announce roots (as Nix does)
        sock.listen(64)
        sock.settimeout(0.2)
        self._sock = sock
        t = threading.Thread(target=self._accept_loop, name="gc-socket", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
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
            self._sock.close()
        for t in self._threads:
            t.join(timeout=5)


def make_store_writable(store: bytes) -> None:
    """What Nix does on a read-only store mount (NixOS): in a private mount
    namespace of this process, remount the store read-write.  Needs
    CAP_SYS_ADMIN, which gcrootsd does not have; then a clear error.  Call
    before any thread starts (the deletion worker inherits the namespace)."""
    if threading.active_count() > 1:
        # Namespaces belong to the calling thread: in a threaded process (the
        # daemon) a remount would not even reach the deletion worker.
        raise GCError(f"{os.fsdecode(store)} is mounted read-only; gcrootsd does not remount it "
                      "(that needs CAP_SYS_ADMIN and a single-threaded process): mount the store "
                      "read-write (NixOS: boot.nixStoreMountOpts = [ \"nodev\" \"nosuid\" ]) "
                      "or collect with `gcroots-query --standalone gc` as root")
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


def remove_stale_temproots(layout: StoreLayout) -> int:
    """Temp roots files whose owner is dead: taken exclusively, unlinked, and
    marked with "d" for a process that might still hold the old fd (Nix)."""
    removed = 0
    try:
        names = os.listdir(layout.temproots_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(b".") or not name.isdigit():
            continue
        path = layout.temproots_dir + b"/" + name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            os.unlink(path)
            os.write(fd, b"d")
            removed += 1
            _log.info("stale_temproots_removed", file=path)
        finally:
            os.close(fd)
    return removed


# -- deleting ------------------------------------------------------------------------

from .deleter import DeleterProcess, Freed, _count, estimate_tree  # noqa: E402


def predict_freed(real_paths: list[bytes], links_dir: bytes) -> tuple[int, int]:
    """What deleting these trees (and then the .links entries left with one
    link) would free: (bytes in the trees, bytes in .links).  A file counts
    once, and only if every one of its links goes."""
    links: dict[tuple[int, int], os.stat_result] = {}
    try:
        with os.scandir(links_dir) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                links[(st.st_dev, st.st_ino)] = st
    except FileNotFoundError:
        pass
    seen: dict[tuple[int, int], list] = {}  # inode -> [stat, links found in the trees]
    freed = 0

    def walk(path: bytes) -> None:
        nonlocal freed
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            freed += _count(st)
            with os.scandir(path) as it:
                for e in it:
                    walk(e.path)
        else:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                seen[key][1] += 1
            else:
                seen[key] = [st, 1]

    for p in real_paths:
        try:
            walk(p)
        except FileNotFoundError:
            pass
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
    return freed, links_freed


def clean_links(links_dir: bytes) -> int:
    """Unlink .links entries with a link count of 1 (Nix does the same; it
    races with optimisePath as Nix's does)."""
    freed = 0
    try:
        it = os.scandir(links_dir)
    except FileNotFoundError:
        return 0
    with it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            if st.st_nlink == 1:
                try:
                    os.unlink(e.path)
                    freed += _count(st)
                except FileNotFoundError:
                    pass
    return freed


def confirmed_stale(first: RootSet, second: RootSet) -> list:
    """Links that two independent, complete scans both found stale."""
    again = {(s.link, s.target) for s in second.stale}
    return [s for s in first.stale if (s.link, s.target) in again]


def remove_stale_auto_links(layout: StoreLayout, stale: list) -> int:
    """Remove stale gcroots/auto links, given as confirmed by the helper
    (twice: see confirmed_stale).  Only links under gcroots/auto; only if
    the link still says what it said; and never if *we* can see its target.
    Our own view is no proof of absence -- gcrootsd cannot look into 0700
    homes, and under ProtectHome= every home looks empty -- which is why
    the helper's two scans decide, not our lstat."""
    removed = 0
    for s in stale:
        if not is_in_dir(s.link, layout.auto_dir):
            continue
        try:
            if not stat.S_ISLNK(os.lstat(s.link).st_mode):
                continue
            if abs_path(os.readlink(s.link), dir_of(s.link)) != s.target:
                continue
            try:
                os.lstat(s.target)
                continue  # it exists again
            except OSError:
                pass
            os.unlink(s.link)
            removed += 1
            _log.info("stale_link_removed", link=s.link, target=s.target)
        except OSError as e:
            _log.warning("stale_link_not_removed", link=s.link, error=e.strerror)
    return removed


# -- one collection ----------------------------------------------------------------

class Collection:
    """begin() -> plan(rootset) -> execute() -> end(); see the module doc."""

    def __init__(self, layout: StoreLayout, settings: GCSettings, options: GCOptions,
                 progress: Callable[[str], None] | None = None,
                 on_deleted: Callable[[list[bytes]], None] | None = None) -> None:
        self.layout = layout
        self.settings = settings
        self.options = options
        self.progress = progress or (lambda msg: None)
        self.on_deleted = on_deleted or (lambda paths: None)
        self.lock = GCLock(layout)
        self.server: RootsServer | None = None
        self.result = GCResult(dry_run=options.dry_run)
        self._cond = threading.Condition()
        self._protected: set[bytes] = set()      # must not be deleted (live + announced)
        self._temp_hashes: set[bytes] = set()
        self._pending: set[bytes] = set()        # hash parts being deleted right now
        self._graph: StoreGraph | None = None
        self._analysis: Analysis | None = None
        self._dead: list[bytes] = []             # what goes: the dead set, or the paths asked for
        self._dead_valid: set[bytes] = set()     # ... those of them registered
        self._t0 = time.monotonic()

    # phase 1
    def begin(self) -> None:
        if self.options.dry_run:
            return  # a dry run is a query: no lock, no socket, nothing removed
        self._check_writable()
        # As Nix: free the space kept in reserve for a full disk, so that the
        # collection has room to work; the next Nix to open the store (any
        # Nix command, a nix-daemon connection) reserves it again.
        try:
            os.unlink(self.layout.reserved_path)
        except FileNotFoundError:
            pass
        self.lock.acquire()
        self.server = RootsServer(self.layout, self._announced)
        self.server.start()
        self.result.temproots_removed = remove_stale_temproots(self.layout)

    def _check_writable(self) -> None:
        store = self.layout.real_store_dir
        if os.statvfs(store).f_flag & os.ST_RDONLY:
            make_store_writable(store)
        state = self.layout.real_state_dir
        for d in (store, state + b"/db", state, state + b"/gc-socket", self.layout.temproots_dir,
                  self.layout.gc_lock_path):
            if os.path.lexists(d) and not os.access(d, os.W_OK):
                raise GCError(f"no write access to {os.fsdecode(d)}: gcrootsd must run as the "
                              "store's owner (and own the state dir) to collect garbage")

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
        closure = {g.paths[n] for n in g.closure(starts, self.settings)}
        self.result.protected_during_gc += len(closure - self._protected)
        self._protected |= closure
        return set(hashes) | {hash_part(p) for p in closure}

    # phase 2
    def plan(self, rootset: RootSet, db: StoreDB) -> Analysis:
        self.progress("computing the live set")
        with db.snapshot():  # the daemon's graph if it is still current
            graph = engine.store_graph(db, self.settings)
        asked = self.options.paths
        a = engine.analyze(self.layout, db, rootset, self.settings, want_dead=asked is None)
        if asked is None:
            self._dead, self._dead_valid = a.dead, a.dead_valid
        else:
            refusals = engine.delete_refusals(a, db, graph, list(asked))
            if refusals:
                raise Refused(f"refusing to delete ({len(set(asked))} paths asked for; nothing "
                              "was deleted):\n  " + "\n  ".join(refusals))
            self._dead = sorted(set(asked))
            self._dead_valid = {p for p in self._dead if p in graph.index}
        with self._cond:
            self._graph = graph
            self._analysis = a
            self._protected |= a.all_live
            # Including the paths announced on gc-socket since begin(), whose
            # closures could not be computed without the graph.
            self._protect_hashes(self._temp_hashes | a.temp.hashes)
        return a

    def _order(self) -> list[bytes]:
        """What goes: unregistered entries first, then the dead paths,
        referrers before references."""
        g = self._graph
        dead = set(self._dead)
        dead_nodes = {g.index[p] for p in self._dead_valid if p in g.index}
        unknown = {p for p in self._dead_valid if p not in g.index}  # registered after our graph
        if unknown:
            _log.info("gc_skipping_new_paths", count=len(unknown))
        pending = {n: 0 for n in dead_nodes}
        for n in dead_nodes:
            for m in g.refs[n]:
                if m in pending:
                    pending[m] += 1
        ready = [n for n, c in pending.items() if c == 0]
        order: list[bytes] = []
        while ready:
            n = ready.pop()
            order.append(g.paths[n])
            for m in g.refs[n]:
                if m in pending:
                    pending[m] -= 1
                    if pending[m] == 0:
                        ready.append(m)
        if len(order) != len(dead_nodes):
            raise SafetyError("the dead paths' references form a cycle; refusing to collect")
        others = sorted(dead - self._dead_valid)  # unregistered entries and junk: no DB rows
        return others + order

    # phase 3
    def execute(self, db_path: bytes) -> GCResult:
        """The DB work for batch k+1 overlaps with deleting batch k from disk,
        which a worker process does (daemon/deleter.py): in this process the
        two would fight over the GIL."""
        order = self._order()
        real = self.layout.real_path
        if self.options.dry_run:
            everything = order
            order, self.result.nix_bytes_freed = self._within_limit(order, 0, {})
            self.result.stopped_at_limit = len(order) < len(everything)
            freed, links = predict_freed([real(p) for p in order], self.layout.links_dir)
            self.result.paths = len(order)
            self.result.bytes_freed, self.result.links_freed = freed, links
            self.result.deleted = order
            self.result.seconds = time.monotonic() - self._t0
            return self.result
        valid = self._dead_valid
        writer = _writer(db_path)
        worker = DeleterProcess()
        done: set[bytes] = set()   # invalidated (in the DB) or unregistered, in order
        unlinked: dict[tuple[int, int], int] = {}  # links the --max-freed forecast saw go
        # Smaller batches when stopping at a size or pacing the I/O; big ones
        # otherwise (each commit rewrites the DB's index pages).
        batch_size = (MAX_FREED_BATCH if self.options.max_freed is not None
                      else 64 if self.options.throttle else BATCH)
        work: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        deleter = threading.Thread(target=self._deleter, args=(work, failure, worker),
                                   name="gc-delete")
        deleter.start()
        batch: list[bytes] = []  # claimed, not yet handed to the deleter
        try:
            start = 0
            while start < len(order):
                if failure or self._limit_reached():
                    break
                chunk = order[start:start + batch_size]
                start += len(chunk)
                batch = self._claim(chunk)
                if not batch:
                    continue
                if self.options.max_freed is not None:
                    # Nix stops right after the path that frees more than the
                    # limit: invalidate nothing beyond it (the rest comes back).
                    cut, _ = self._within_limit(batch, self.result.nix_bytes_freed, unlinked)
                    if len(cut) < len(batch):
                        start -= len(chunk) - chunk.index(cut[-1]) - 1
                        self._release(batch[len(cut):])
                        batch = cut
                self._check_referrers(batch, done)
                kept = self._invalidate(writer, batch, valid)
                if len(kept) < len(batch):
                    self._release([p for p in batch if p not in kept])
                    batch = kept
                done.update(batch)
                work.put(batch)
                batch = []
                if self.options.max_freed is not None:
                    work.join()  # the limit is checked on what is really gone
                self.progress(f"deleting: {len(done)} of {len(order)} paths, "
                              f"{self.result.bytes_freed / 2**20:.1f} MiB freed")
                if self.options.throttle:
                    time.sleep(self.options.throttle)
        finally:
            if batch:  # failed between claiming and queueing: nothing of it is deleted
                self._release(batch)
            work.put(None)
            deleter.join()
            worker.close()
            writer.close()
        if failure:
            raise failure[0]
        self.result.stopped_at_limit = self._limit_reached() and len(done) < len(order)
        self.result.links_freed = clean_links(self.layout.links_dir)
        self.result.seconds = time.monotonic() - self._t0
        return self.result

    def _limit_reached(self) -> bool:
        """More than --max-freed freed, as Nix counts (and checks after each
        path); --max-freed 0 collects nothing, as with Nix."""
        limit = self.options.max_freed
        with self._cond:
            return limit is not None and (limit == 0 or self.result.nix_bytes_freed > limit)

    def _within_limit(self, paths: list[bytes], total: int,
                      unlinked: dict[tuple[int, int], int]) -> tuple[list[bytes], int]:
        """Where --max-freed stops when deleting `paths` in order with
        `total` bytes freed so far (Nix's count, forecast from the files):
        after the path that passes the limit.  Returns those paths and the
        total after them (all of them without a limit)."""
        limit = self.options.max_freed
        if limit == 0:
            return [], total
        for i, p in enumerate(paths):
            if limit is not None and total > limit:
                return paths[:i], total
            freed = Freed()
            estimate_tree(self.layout.real_path(p), freed, unlinked)
            total += freed.nix
        return paths, total

    def _deleter(self, work: "queue.Queue[list[bytes] | None]", failure: list,
                 worker: DeleterProcess) -> None:
        """Feeds the deletion worker process, one batch at a time."""
        while (batch := work.get()) is not None:
            try:
                self._delete_batch(batch, failure, worker)
            finally:
                work.task_done()  # after the result is in: execute() may join()

    def _delete_batch(self, batch: list[bytes], failure: list, worker: DeleterProcess) -> None:
        if failure:
            # Drain: the main thread stops at the next batch.  These were
            # invalidated but stay on disk (unregistered, collected next
            # time); a Nix process waiting for one may go on.
            self._release(batch)
            return
        try:
            freed, nix = worker.delete([self.layout.real_path(p) for p in batch])
        except BaseException as e:  # reported by execute(); nothing more is deleted
            failure.append(e)
            freed = nix = 0
        with self._cond:
            self.result.paths += len(batch)
            self.result.bytes_freed += freed
            self.result.nix_bytes_freed += nix
            self.result.deleted += batch
            self._pending -= {hash_part(p) for p in batch}
            self._cond.notify_all()
        self.on_deleted(batch)

    def _release(self, batch: list[bytes]) -> None:
        """No longer being deleted: wake Nix processes waiting on gc-socket."""
        with self._cond:
            self._pending -= {hash_part(p) for p in batch}
            self._cond.notify_all()

    def _claim(self, batch: list[bytes]) -> list[bytes]:
        """Re-read the temp roots files, drop what became protected, mark the
        rest as being deleted (until the deleter is done with it)."""
        fresh = read_temp_roots(self.layout)
        with self._cond:
            new_hashes = fresh.hashes - self._temp_hashes
            if new_hashes:
                self._protect_hashes(new_hashes)
            keep = [p for p in batch
                    if p not in self._protected and hash_part(p) not in self._temp_hashes]
            self._pending |= {hash_part(p) for p in keep}
            return keep

    def _check_referrers(self, batch: list[bytes], done: set[bytes]) -> None:
        """Never delete a path that something not (being) deleted refers to."""
        g = self._graph
        rev = g.referrers()
        in_batch: set[bytes] = set()
        for p in batch:
            node = g.index.get(p)
            if node is not None:
                for r in rev[node]:
                    rp = g.paths[r]
                    if rp not in done and rp not in in_batch:
                        raise SafetyError(f"{p.decode(errors='replace')} is still referenced by "
                                          f"{rp.decode(errors='replace')}; refusing to delete it")
            in_batch.add(p)

    def _invalidate(self, writer: sqlite3.Connection, batch: list[bytes],
                    valid: set[bytes]) -> list[bytes]:
        """One transaction: drop the batch's ValidPaths rows and do what
        the DB's foreign keys make Nix's row-by-row invalidation do (see
        _delete_cascading), in bulk inside our write transaction -- no
        other writer can slip in -- the same guarantee at half the cost.
        Entries that were unregistered when we planned but are valid now
        (registered meanwhile) are not ours to delete: returns the batch
        without them."""
        try:
            writer.execute("BEGIN IMMEDIATE")
            rows = _valid_rows(writer, batch)
            newly = {p for _, p in rows if p not in valid}
            if newly:
                _log.warning("gc_skipping_newly_registered", count=len(newly))
            writer.execute("DELETE FROM temp.gc_batch")
            writer.executemany("INSERT INTO temp.gc_batch VALUES (?)",
                               [(i,) for i, p in rows if p in valid])
            _delete_cascading(writer, dict(rows))
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise
        return [p for p in batch if p not in newly]

    def remove_stale_links(self, confirmation: RootSet) -> int:
        """After execute(): the links stale in our scan and in `confirmation`."""
        if self.options.dry_run or self._analysis is None:
            return 0
        stale = confirmed_stale(self._analysis.rootset, confirmation)
        self.result.stale_links_removed = remove_stale_auto_links(self.layout, stale)
        return self.result.stale_links_removed

    # phase 4
    def end(self) -> None:
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


def _delete_cascading(conn: sqlite3.Connection, paths: dict[int, bytes]) -> None:
    """Delete the ValidPaths rows whose ids are in temp.gc_batch, then
    what their foreign keys say, as SQLite does for Nix's deletions
    (foreign keys on): ON DELETE CASCADE rows go too (and theirs, and so
    on); a RESTRICT row left pointing at a deleted row refuses the whole
    transaction.  The schema's triggers fire as for Nix (DeleteSelfRefs,
    and DeleteSelfRefsViaRealisations of Nix >= 2.9, which turns a
    restricting RealisationsRefs row into a deleted one).  `paths`: id ->
    path of the rows, for messages."""
    fks = _foreign_keys(conn)
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
            conn.execute(f"DELETE {where}")
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


def _writer(db_path: bytes) -> sqlite3.Connection:
    conn = sqlite3.connect(os.fsdecode(db_path), timeout=60, isolation_level=None,
                           check_same_thread=False)
    # Foreign keys off: _delete_cascading() does what they would, in bulk.
    conn.text_factory = bytes  # paths as bytes, like every other read
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("PRAGMA synchronous = NORMAL")  # as Nix (WAL: durable at checkpoints)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("CREATE TEMP TABLE gc_batch (id INTEGER PRIMARY KEY)")
    return conn


def parse_size(text: str) -> int:
    """`10G`, `500M`, `1.5T`, `4096` (bytes); binary units like Nix's."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 500M, 10G)") from None
