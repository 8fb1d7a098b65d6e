"""gcrootsd's admin socket (Trio).

Every connection carries one request.  The peer's uid and groups come from
the kernel (SO_PEERCRED, SO_PEERGROUPS): root, the daemon's own user and the
admin group are privileged (full labels, mutating commands); everyone else
gets runtime/temp root labels censored as `{censored}`, as Nix does, and
read-only commands only.

CPU-bound work (the analysis, building rows) runs in a worker thread, one at
a time (the DB connection is not shared).  Queries that arrive together
share one helper scan and one analysis of it (per DB version); `live` and
`dead` answers are sent to each client from the analysis's frames -- views
of the graph's path table -- so a client costs one frame in flight, not a
copy of the answer.  Every await on a peer has a deadline.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import socket
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .listing import StoreListing
    from .metrics import Metrics

import trio

from gcroots import cliargs, log
from gcroots.activation import listen_fds, peer_credentials
from gcroots.layout import StoreLayout
from gcroots.nixdb import describe_error
from gcroots.sockets import SocketFile, listen_unix
from gcroots.protocol import admin
from gcroots.protocol.framing import RemoteProtocolError
from gcroots.protocol.rootstream import NEED_DATA
from .storepaths import parse_store_path

from . import engine
from .engine import Analysis, IncompleteRoots, NotAlive, RootSet
from .gc import Busy, Collection, GCError, GCOptions, GCResult, free_space, resolve_size
from .nixconf import GCSettings
from .notify import Notifier
from .rootsource import SharedScans, fetch_roots_retrying
from .store import StoreDB, return_free_memory

REQUEST_TIMEOUT = 3.0      # to read the request, which clients send at once
REFUSE_TIMEOUT = 1.0       # to tell a connection we drop why
DROPPED_LOG_INTERVAL = 10.0   # dropped connections: one summary line at most this often
# Requests of an unprivileged uid whose lines are logged, per
# DROPPED_LOG_INTERVAL (see Daemon.in_log).
REQUEST_LINES_PER_USER = 20
# Concurrent connections: each holds an fd (and, while its request is read, up
# to REQUEST_TIMEOUT), so no user may hold many.  Unprivileged users share a
# total; root, the daemon's user and the admin group are not refused by it.
MAX_CONNECTIONS_PER_USER = 8
MAX_CONNECTIONS_PRIVILEGED = 64
MAX_CONNECTIONS = 256
GRAPH_RELOAD_MIN_INTERVAL = 10.0
# The graph follows the DB when Nix writes to it (_follow_loop): once the
# writes pause for FOLLOW_QUIET seconds (a `nix-store --add` of many files
# commits each), and then no sooner than FOLLOW_SPACING times as long as
# the last follow took after it (a tenth of a core at most).
FOLLOW_QUIET = 0.02
FOLLOW_SPACING = 10
SEND_TIMEOUT = 60.0
MIN_SEND_RATE = 1 << 20   # bytes/s a peer must take a big answer at, at least (_send_buffers)
IOV_MAX = 1024        # buffers one sendmsg takes (Linux's UIO_MAXIOV)
SEND_BUFFER = 4 << 20  # SO_SNDBUF asked for a big answer (see _bigger_send_buffer)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
READ_ONLY = {"roots", "live", "dead", "why", "cost", "stats", "ping"}
MUTATING = {"gc", "delete"}

_log = log.get("gcroots.daemon")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    privileged: bool


def peer_of(sock: socket.socket, admin_gid: int | None) -> Peer:
    pid, uid, gid = peer_credentials(sock)
    try:
        # Python caps the buffer at 1024 bytes: 256 groups.  A peer in more
        # gets ERANGE and is treated as if in none (unprivileged): fail safe.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        groups = frozenset()
    privileged = (uid in (0, os.getuid())
                  or (admin_gid is not None and (gid == admin_gid or admin_gid in groups)))
    return Peer(pid, uid, gid, groups, privileged)


@dataclass(frozen=True)
class AutoGC:
    min_free: "int | cliargs.Percent | None" = None   # collect when free space drops below this...
    max_free: "int | cliargs.Percent | None" = None   # ...until this much is free
    interval: float | None = None     # and/or every this many seconds
    check_interval: float = 300.0


# A failing stream: the peer went away, stalled or spoke nonsense.  Nothing
# can be told to it.  (trio wraps a socket's OSError in BrokenResourceError;
# any other OSError is ours, and the client hears about it.)
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                  RemoteProtocolError)


class ConnectionLimits:
    """Counts open connections per uid."""

    def __init__(self, per_user: int = MAX_CONNECTIONS_PER_USER,
                 privileged: int = MAX_CONNECTIONS_PRIVILEGED, total: int = MAX_CONNECTIONS) -> None:
        self.per_user, self.privileged, self.total = per_user, privileged, total
        self.by_uid: dict[int, int] = {}
        self.unprivileged = 0

    def admit(self, peer: Peer) -> str | None:
        """None if admitted (then release() it), else why not."""
        n = self.by_uid.get(peer.uid, 0)
        limit = self.privileged if peer.privileged else self.per_user
        if n >= limit:
            return (f"too many connections to gcrootsd from uid {peer.uid} "
                    f"({limit} at a time); try again later")
        if not peer.privileged:
            if self.unprivileged >= self.total:
                return (f"gcrootsd is serving {self.total} connections of unprivileged users; "
                        "try again later")
            self.unprivileged += 1
        self.by_uid[peer.uid] = n + 1
        return None

    def release(self, peer: Peer) -> None:
        if not peer.privileged:
            self.unprivileged -= 1
        if self.by_uid[peer.uid] == 1:
            del self.by_uid[peer.uid]
        else:
            self.by_uid[peer.uid] -= 1


class RequestError(Exception):
    def __init__(self, status: admin.Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Daemon:
    layout: StoreLayout
    helper_socket: bytes
    settings: GCSettings
    admin_gid: int | None = None
    notifier: Notifier = field(default_factory=Notifier)
    db: StoreDB | None = None
    work_lock: trio.Lock = field(default_factory=trio.Lock)
    last: dict = field(default_factory=dict)
    metrics: "Metrics | None" = None
    metrics_interval: float = 300.0
    auto_gc: "AutoGC | None" = None
    gc_lock: trio.Lock = field(default_factory=trio.Lock)
    gc_running: dict = field(default_factory=dict)
    _nursery: trio.Nursery | None = None
    _graph_reloading: bool = False
    _following: bool = False   # a follow is under way or queued (_follow_now)
    _graph_next_reload: float = 0.0
    listing: "StoreListing | None" = None
    _shared: tuple = ()               # (root set, DB version, analysis): see analysis()
    _answers: dict = field(default_factory=dict)   # the last live/dead answers: engine.path_frames
    analyses: int = 0
    scans: SharedScans = field(init=False)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    _dropped: dict = field(default_factory=dict)     # reason -> count since the last summary
    _dropped_last: tuple = ()
    _request_lines: dict = field(default_factory=dict)   # uid -> request lines this interval
    _not_logged: dict = field(default_factory=dict)      # uid -> requests beyond those

    def __post_init__(self) -> None:
        self.scans = SharedScans(lambda: fetch_roots_retrying(self.helper_socket, self.layout),
                                 on_failure=self._scan_failed)

    def _scan_failed(self, error: str, owner: str, logged: bool) -> None:
        """Once per failed scan, however many queries shared it: every one
        of them gets the same error (one user's broken root link fails
        everyone's), so the journal and the metric say it here, not per query
        (the journal only if a waiter's lines are logged: see in_log)."""
        if logged:
            _log.error("root_scan_failed", error=error, owner=owner or None)
        if self.metrics:
            self.metrics.scan_failed(owner)

    async def root_set(self, *, started_after: float | None = None,
                       logged: bool = True) -> RootSet:
        """A complete root set from the helper, from the one scan in flight
        (see SharedScans), or IncompleteRoots."""
        if self._nursery is None:  # not serving (yet): nobody to share with
            return await fetch_roots_retrying(self.helper_socket, self.layout)
        return await self.scans.get(self._nursery, started_after=started_after, logged=logged)

    def in_log(self, peer: Peer) -> bool:
        """Whether the lines a request of `peer` causes (request, analysis,
        scan) go to the log: always for privileged peers, for others up to
        REQUEST_LINES_PER_USER requests per interval (any user can send
        ~1,000 a second); beyond that the request is counted instead."""
        n = self._request_lines.get(peer.uid, 0)
        if peer.privileged or n < REQUEST_LINES_PER_USER:
            self._request_lines[peer.uid] = n + 1
            return True
        self._not_logged[peer.uid] = self._not_logged.get(peer.uid, 0) + 1
        return False

    def open_db(self) -> StoreDB:
        if self.db is None:
            self.db = StoreDB.open(self.layout)
        return self.db

    # -- the analysis every query starts from ---------------------------------

    def _analyze(self, db: StoreDB, rootset: RootSet, want_dead: bool,
                 answer: str | None) -> Analysis:
        a = engine.analyze(self.layout, db, rootset, self.settings, want_dead=want_dead,
                           listing=self.listing, answer=answer, kept=self._answers,
                           incremental=True)
        if a.graph is None:
            # The graph went stale: nothing may keep it (or its path table)
            # resident beside the one the reload makes.  The kept answers
            # are views of its path table; a reload drops them anyway.
            self._answers = {}
            if self.listing is not None:
                self.listing.forget()
        return_free_memory()  # its temporaries: gcrootsd stays resident all day
        return a

    async def analysis(self, *, want_dead: bool, logged: bool = True,
                       answer: str | None = None) -> Analysis:
        """The analysis of a complete root set: the one of the scan we
        share with the queries that arrived with us, if the DB is still at
        the same version; else made now (with `answer`'s frames: see
        engine.analyze)."""
        if self._nursery is not None and not self._following:
            # While the helper scans, the graph follows what Nix committed
            # since (the follow loop may not have begun: it waits for Nix to
            # pause): at a million paths, ~40 ms of the answer after a build.
            # (When nothing changed, that is a look at data_version.)
            self._following = True
            self._nursery.start_soon(self._follow_now)
        rootset = await self.root_set(logged=logged)
        async with self.work_lock:
            db = self.open_db()
            version = db.data_version()
            if self._shared[:2] == (rootset, version):
                a = self._shared[2]
                if a.computed_dead or not want_dead:
                    return a
            self._shared = ()  # the old analysis (its graph, its answer) may go meanwhile
            a = await trio.to_thread.run_sync(self._analyze, db, rootset, want_dead, answer)
            self._shared = (rootset, version, a)
            self.analyses += 1
        if self.metrics:
            self.metrics.analysis(a, *_nar_bytes(a))
        live, dead = a.live_count(), a.dead_count()
        self.last = {"time": time.time(), "roots": len(a.roots), "live": live, "dead": dead}
        if logged:
            _log.info("analysis", roots=len(a.roots), root_paths=len(a.root_paths),
                      live=live, dead=dead, graph=a.graph is not None,
                      stale_links=len(rootset.stale), scan_warnings=len(rootset.warnings),
                      **{f"seconds_{k}": round(v, 4) for k, v in a.timings.items()})
            for w in rootset.warnings[:20]:
                _log.warning("scan_warning", path=w.path, errno=w.errno, message=w.message)
        self.notifier.status(f"last analysis: {len(a.roots)} roots, {live} live"
                             + ("" if dead is None else f", {dead} dead"))
        if a.graph is None:
            self.schedule_graph_reload()
        return a

    # -- the in-memory graph: reloaded in the background when the DB changed --

    def schedule_graph_reload(self) -> None:
        """Queries never wait for this: until it is done they use SQLite.
        Rate-limited, so that a DB that changes all the time (a build farm)
        does not keep us reloading."""
        if self._nursery is None or self._graph_reloading or trio.current_time() < self._graph_next_reload:
            return
        self._graph_reloading = True
        self._nursery.start_soon(self._reload_graph)

    async def _reload_graph(self) -> None:
        # Loaded on a connection of its own, without the work lock, so that
        # queries go on meanwhile; then that connection replaces ours (the
        # graph's data_version is only comparable on the connection it was
        # read from).
        t0 = trio.current_time()
        try:
            def load() -> StoreDB:
                fresh = StoreDB.open(self.layout)
                with fresh.snapshot():
                    fresh.load_graph(self.settings.follows_realisations)
                return fresh
            fresh = await trio.to_thread.run_sync(load)
            async with self.work_lock:
                old, self.db = self.db, fresh
                self._answers = {}  # views of the old graph's paths
                # Its DB version was the old connection's: not comparable
                # with the new one's (and it holds the old graph).
                self._shared = ()
                if self.listing is not None:
                    # The next answer would list the store dir anew for this
                    # graph: list it now, not while someone waits (a
                    # collection's plan, a query).  If that fails, the
                    # next answer lists it (and says why it cannot).
                    try:
                        await trio.to_thread.run_sync(self.listing.sync, fresh._graph)
                    except OSError as e:
                        _log.warning("store_not_listed", error=str(e))
            if old is not None:
                old.close()
            del old
            # The old graph (if no answer holds it still) and the load's
            # temporaries: given back now, not at the next answer's trim.
            return_free_memory()
            took = trio.current_time() - t0
            _log.info("graph_loaded", paths=len(fresh._graph), seconds=round(took, 3))
        except Exception as e:  # the SQLite fallback keeps answering
            took = trio.current_time() - t0
            _log.warning("graph_load_failed", error=repr(e))
        finally:
            self._graph_reloading = False
            self._graph_next_reload = trio.current_time() + max(GRAPH_RELOAD_MIN_INTERVAL, 20 * took)

    async def _follow_loop(self) -> None:
        """Follow the DB as Nix commits to it (StoreGraph.follow, with its
        row counts: the slow part), so that the next query finds the graph
        current instead of following it first -- after a build, the
        difference between a warm answer and one 0.1-0.3 s later at a
        million paths.  When the writes pause, and no sooner than
        FOLLOW_SPACING times the last follow's time after it (a busy
        builder commits all the time); never during our own collection (it
        forgets what it deletes as it goes: a follow in between would see
        deletions it did not make yet); and nothing but a reload when
        follow() cannot account for the change."""
        from .listing import DBWatch
        try:
            watch = DBWatch(self.layout.db_path)
        except OSError as e:  # e.g. the inotify limits: queries follow it themselves
            _log.warning("db_not_watched", error=e.strerror,
                         consequence="the graph follows the DB when a query comes")
            return
        try:
            free_at = trio.current_time()
            while True:
                await trio.lowlevel.wait_readable(watch.fd)
                if not watch.written():
                    continue
                while True:  # until Nix pauses
                    await trio.sleep(FOLLOW_QUIET)
                    if not watch.written():
                        break
                await trio.sleep(max(0.0, free_at - trio.current_time()))
                watch.written()  # covered by the follow below
                t0 = trio.current_time()
                await self._follow()
                free_at = trio.current_time() + FOLLOW_SPACING * (trio.current_time() - t0)
        finally:
            trio.lowlevel.notify_closing(watch.fd)
            watch.close()

    async def _follow_now(self) -> None:
        try:
            await self._follow()
        finally:
            self._following = False

    async def _follow(self) -> None:
        if self.gc_running or self._graph_reloading or self.db is None or self.db._graph is None:
            return
        ca = self.settings.follows_realisations

        def follow(db: StoreDB) -> bool:
            t0 = time.perf_counter()
            ahead = db.counts_ahead(ca)   # as a query counts: see engine.analyze
            try:
                with db.snapshot():
                    if ahead is not None:
                        ahead.start()
                    g = db.cached_graph(ca, check_later=True)
                    if g is not None and g is db.unconfirmed and not db.confirm(
                            g, ahead.result if ahead is not None else None):
                        g = None
            finally:
                if ahead is not None:
                    ahead.result()
            if g is not None:
                _log.debug("graph_followed", paths=len(g), seconds=round(time.perf_counter() - t0, 4))
            return g is not None
        try:
            async with self.work_lock:
                if self.gc_running or self.db is None:
                    return
                current = await trio.to_thread.run_sync(follow, self.db)
        except Exception as e:  # the next query tries again, or answers from SQLite
            _log.warning("graph_follow_failed", error=repr(e))
            return
        if not current:
            self.schedule_graph_reload()

    # -- garbage collection ------------------------------------------------------

    async def collect(self, options: GCOptions, *, by: str,
                      progress: Callable[[admin.Progress], None] | None = None) -> GCResult:
        """One collection (one at a time: the caller holds gc_lock), or a
        dry run (read-only: any number, without gc_lock)."""
        progress = progress or (lambda p: None)
        if not options.dry_run:
            self.gc_running = {"since": time.time(), "by": by}
            self.notifier.status("collecting garbage")
        c = Collection(self.layout, self.settings, options, progress=progress)
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(c.begin)
            await trio.to_thread.run_sync(c.start_deleters)
            # gc.lock is ours: only a scan that starts from now on counts
            # (one from before could miss a root a Nix build made meanwhile).
            progress(admin.Progress("scanning roots", "scan"))
            rootset = await self.root_set(started_after=trio.current_time())
            async with self.work_lock:
                db = self.open_db()
                a = await trio.to_thread.run_sync(c.plan, rootset, db, self.listing)
            _log.info("gc_planned", by=by, dry_run=options.dry_run, roots=len(a.roots),
                      live=a.live_count(), dead=a.dead_count(),
                      asked=None if options.paths is None else len(options.paths),
                      stale_links=len(rootset.stale),
                      scan_warnings=len(rootset.warnings),
                      **{f"seconds_{k}": round(v, 4) for k, v in a.timings.items()})
            # Deletion uses its own DB connection: queries go on meanwhile.
            result = await trio.to_thread.run_sync(c.execute, self.layout.db_path)
            if rootset.stale and not options.dry_run:
                # Stale links go only if a helper scan that starts after
                # they were set aside agrees (remove_stale_auto_links).
                async def rescan() -> RootSet:
                    return await self.root_set(started_after=trio.current_time())
                await trio.to_thread.run_sync(c.remove_stale_links,
                                              lambda: trio.from_thread.run(rescan))
        except Exception as e:
            _log.error("gc_failed", by=by, error=str(e), dry_run=options.dry_run,
                       seconds=round(time.monotonic() - t0, 3))
            if self.metrics:
                self.metrics.failure("gc")
            raise
        finally:
            # Also when cancelled (a client that hangs up mid-collection):
            # else gc.lock stays held, the gc-socket served and the
            # deletion workers running, and gc_running keeps follows off.
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(c.end)
            finally:
                if not options.dry_run:
                    self.gc_running = {}
                    self.notifier.status("serving")
        _log.info("gc_finished", by=by, **result.summary(),
                  **{f"seconds_{k}": round(v, 4) for k, v in c.timings.items()})
        if self.metrics:
            self.metrics.collection(result)
        return result

    async def _metrics_loop(self) -> None:
        """Keep the metrics fresh even when nobody asks anything."""
        while True:
            try:
                await self.analysis(want_dead=True)
            except IncompleteRoots as e:
                _log.warning("metrics_analysis_failed", error=str(e))
            except Exception:  # a bug or a failing DB: log it, keep serving
                _log.exception("metrics_analysis_internal_error")
            await trio.sleep(self.metrics_interval)

    async def _auto_gc_loop(self) -> None:
        """min-free/max-free (like Nix's own settings) and a schedule."""
        cfg = self.auto_gc
        last_scheduled = trio.current_time()
        failures = 0
        while True:
            await trio.sleep(min(cfg.check_interval * 2 ** failures, 3600))
            try:
                free, size = free_space(self.layout.real_store_dir)
            except Exception as e:  # keep serving; never collect without knowing
                failures = min(failures + 1, 6)
                _log.error("auto_gc_statvfs_failed", error=f"{type(e).__name__}: {e}",
                           retry_factor=2 ** failures)
                continue
            options = None
            if cfg.min_free is not None and free < (min_free := resolve_size(cfg.min_free, size)):
                # Until max-free is free, decided again under gc.lock (as Nix's
                # auto-GC's max-freed: what is missing, at least one byte).
                target = cfg.max_free if cfg.max_free is not None else cfg.min_free
                options = GCOptions(ensure_free=max(resolve_size(target, size), free + 1))
                why = f"free space {free} < min-free {min_free}"
            elif cfg.interval is not None and trio.current_time() - last_scheduled >= cfg.interval:
                options = GCOptions()
                why = "schedule"
            if options is None or self.gc_lock.locked():
                continue
            async with self.gc_lock:
                _log.info("auto_gc_start", reason=why, free_bytes=free)
                try:
                    await self.collect(options, by=f"auto ({why})")
                    failures = 0
                    last_scheduled = trio.current_time()
                except (GCError, IncompleteRoots) as e:
                    failures = min(failures + 1, 6)  # back off; never collect without roots
                    _log.warning("auto_gc_skipped", error=str(e), retry_factor=2 ** failures)
                except Exception as e:  # the disk or the DB failed: keep serving, retry later
                    failures = min(failures + 1, 6)
                    _log.error("auto_gc_failed", error=f"{type(e).__name__}: {e}",
                               retry_factor=2 ** failures)

    async def _gc_command(self, stream, conn, request: admin.Request, peer: Peer) -> None:
        """gc, and delete (the paths given: a collection of just those)."""
        opts = request.options
        try:
            options = GCOptions.from_request(opts)
        except ValueError as e:
            raise RequestError(admin.Status.BAD_REQUEST, f"gc: {e}") from None
        if request.command == "delete" and (options.keep_recent is not None or
                                            options.ensure_free is not None):
            raise RequestError(admin.Status.BAD_REQUEST,
                               "delete: keep_recent and ensure_free are gc's options")
        if request.command == "delete":
            bad = [p for p in request.args if parse_store_path(p, self.layout.store_dir) != p]
            if not request.args or bad:
                raise RequestError(admin.Status.BAD_REQUEST, "delete: " + (
                    f"not a store path: {bad[0][:300]!r}" if bad else "no paths given"))
            options.paths = request.args
        if self.gc_lock.locked() and not options.dry_run:
            since = time.strftime("%H:%M:%S", time.localtime(self.gc_running.get("since", 0)))
            raise RequestError(admin.Status.BUSY, f"a garbage collection is already running "
                                                  f"(since {since}, {self.gc_running.get('by')})")
        latest: list = [admin.Progress("")]

        async def forward_progress() -> None:
            sent = latest[0]
            while True:
                await trio.sleep(0.5)
                if latest[0] != sent:
                    sent = latest[0]
                    with trio.move_on_after(5):
                        await stream.send_all(conn.progress(sent))

        outcome: list = []

        async def run_collection(cancel: trio.CancelScope) -> None:
            try:
                outcome.append(await self.collect(options, by=f"uid {peer.uid}",
                                                  progress=lambda m: latest.__setitem__(0, m)))
            except (GCError, IncompleteRoots) as e:
                outcome.append(e)
            except sqlite3.Error as e:  # reading the DB (writing it is a GCError)
                outcome.append(GCError(describe_error(e, self.layout.db_path)))
            except Exception as e:  # never a crashed handler: a clear error, logged in full
                _log.exception("gc_internal_error")
                outcome.append(GCError(f"internal error: {e!r}"))
            finally:
                cancel.cancel()

        # A dry run only reads: it neither waits for nor blocks a collection.
        async with (contextlib.nullcontext() if options.dry_run else self.gc_lock):
            # The exceptions are taken out of the nursery (which would wrap
            # them in a group) and raised below.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward_progress)
                nursery.start_soon(run_collection, nursery.cancel_scope)
        result = outcome[0] if outcome else None
        if isinstance(result, IncompleteRoots):
            raise result
        if isinstance(result, GCError):  # Busy: gc.lock held by another collector (Nix's)
            raise RequestError(admin.Status.BUSY if isinstance(result, Busy) else
                               admin.Status.ERROR, str(result))
        if result is None:
            raise RequestError(admin.Status.ERROR, "the collection did not finish")
        data = await self.build(conn, lambda: conn.rows(result.deleted))
        await self._send(stream, data)
        summary = result.summary()
        if options.dry_run:  # so that a client asks only someone whose "yes" would be obeyed
            summary["may_collect"] = peer.privileged
        if conn.version < 2:  # its clients add these two up for the bytes freed on disk
            summary.update(bytes_freed=result.disk_bytes_freed, links_freed=0)
        await self._send(stream, conn.end(admin.Status.OK, json.dumps(summary)))

    async def in_worker(self, fn):
        async with self.work_lock:
            return await trio.to_thread.run_sync(fn)

    async def build(self, conn: admin.ServerConnection, fn: Callable[[], bytes]) -> bytes:
        """An answer's rows, built in the worker.  If building fails nothing
        of it was sent: the row count goes back, so that END(ERROR) is an
        intact answer the client can show."""
        before = conn.rows_sent
        try:
            return await self.in_worker(fn)
        except (engine.BadRequest, NotAlive):
            conn.rows_sent = before
            raise
        except Exception as e:
            conn.rows_sent = before
            _log.exception("answer_failed")
            raise RequestError(admin.Status.ERROR, f"could not build the answer: {e}") from None

    # -- serving -----------------------------------------------------------------

    async def serve(self, listeners: list[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED):
        # Start warm: read the graph before saying READY (clients that
        # connect meanwhile wait in the listen backlog).
        self.notifier.status("loading the store graph")
        if self.listing is None:  # watched from before the graph is read: nothing missed
            from .listing import StoreListing
            self.listing = StoreListing(self.layout.real_store_dir, self.layout.store_dir,
                                        watch=True)
        self._graph_reloading = True
        await self._reload_graph()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.auto_gc is not None:
                nursery.start_soon(self._auto_gc_loop)
            if self.metrics is not None:
                nursery.start_soon(self._metrics_loop)
            if self.notifier.watchdog_interval:
                nursery.start_soon(self._watchdog)
            nursery.start_soon(self._summarise_dropped)
            nursery.start_soon(self._follow_loop)
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            self.notifier.ready("serving")
            _log.info("daemon_ready", helper_socket=self.helper_socket,
                      keep_derivations=self.settings.keep_derivations,
                      keep_outputs=self.settings.keep_outputs,
                      ca_derivations=self.settings.ca_derivations)
            task_status.started()

    async def _watchdog(self) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(self.notifier.watchdog_interval)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_of(stream.socket, self.admin_gid)
        except OSError as e:  # no credentials, no service
            _log.warning("peer_credentials_failed", error=repr(e))
            await stream.aclose()
            return
        refusal = self.limits.admit(peer)
        if refusal is not None:
            await self._refuse(stream, peer, refusal)
            return
        try:
            await self._serve_one(stream, peer)
        finally:
            self.limits.release(peer)

    async def _refuse(self, stream: trio.SocketStream, peer: Peer, message: str) -> None:
        """Over the limit: say so at once, without reading the request."""
        await self._drop(stream, admin.ServerConnection(), peer, "over_limit",
                         admin.Status.BUSY, message)

    async def _drop(self, stream, conn: admin.ServerConnection, peer: Peer, reason: str,
                    status: admin.Status | None, message: str) -> None:
        """End a connection that gets no answer, telling the peer why (END)
        if it still reads.  Counted, not logged one line each (any local
        user can make thousands): see _summarise_dropped."""
        with trio.move_on_after(REFUSE_TIMEOUT):
            try:
                async with stream:
                    if status is not None:
                        await stream.send_all(conn.hello() + conn.end(status, message))
            except (*_STREAM_ERRORS, OSError):
                pass
        self._dropped[reason] = self._dropped.get(reason, 0) + 1
        self._dropped_last = (peer, message)
        if self.metrics:
            self.metrics.dropped.labels(reason).inc()

    async def _summarise_dropped(self) -> None:
        while True:
            await trio.sleep(DROPPED_LOG_INTERVAL)
            if self._dropped:
                peer, message = self._dropped_last
                _log.warning("connections_dropped", counts=self._dropped,
                             seconds=DROPPED_LOG_INTERVAL, last_peer_uid=peer.uid,
                             last_peer_pid=peer.pid, last_reason=message)
                self._dropped = {}
            if self._not_logged:
                _log.warning("requests_not_logged", counts=self._not_logged,
                             seconds=DROPPED_LOG_INTERVAL, logged_per_user=REQUEST_LINES_PER_USER)
            self._request_lines, self._not_logged = {}, {}

    async def _serve_one(self, stream: trio.SocketStream, peer: Peer) -> None:
        t0 = time.perf_counter()
        conn = admin.ServerConnection()
        drop = None
        try:
            request = await self._read_request(stream, conn)
        except trio.TooSlowError:
            drop = ("timeout", admin.Status.BAD_REQUEST,
                    f"no request within {REQUEST_TIMEOUT:g} s of connecting")
        except admin.InvalidRequest as e:
            drop = ("protocol_error", admin.Status.BAD_REQUEST, f"bad request: {e}")
        except RemoteProtocolError as e:
            drop = ("protocol_error", admin.Status.BAD_REQUEST, f"protocol error: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            request = None
        if drop or request is None:   # junk: counted, no request line in the log
            await self._drop(stream, conn, peer,
                             *(drop or ("hangup", None, "hung up before its request")))
            return
        command, status, message, logged = request.command, admin.Status.OK, "", ""
        in_log = self.in_log(peer)
        try:
            async with stream:
                # Everything that goes wrong while answering is told to the
                # client here, before the stream closes; only a failing
                # stream (the peer) ends a request without END.
                hello_sent = False
                try:
                    await self._send(stream, conn.hello())
                    hello_sent = True
                    await self._dispatch(stream, conn, request, peer, in_log)
                    return
                except RequestError as e:
                    status, message = e.status, str(e)
                except IncompleteRoots as e:
                    status = admin.Status.ERROR
                    message = f"no complete root set, refusing to answer: {e}"
                    logged = "no complete root set (the reason: root_scan_failed, once per scan)"
                except NotAlive as e:
                    status, message = admin.Status.NEGATIVE, str(e)
                except sqlite3.Error as e:
                    status, message = admin.Status.ERROR, describe_error(e, self.layout.db_path)
                except _STREAM_ERRORS:
                    raise
                except Exception as e:  # a bug: log it, tell the client, keep serving
                    _log.exception("request_internal_error", command=command)
                    status, message = admin.Status.ERROR, f"internal error: {e!r}"
                if not hello_sent:
                    await self._send(stream, conn.hello())
                await self._send(stream, conn.end(status, message))
        except (*_STREAM_ERRORS, OSError) as e:
            status, message = admin.Status.ERROR, f"peer: {e!r}"
        except Exception as e:  # e.g. END after a cut answer: log it, keep serving
            _log.exception("request_internal_error", command=command)
            status, message = admin.Status.ERROR, f"internal error: {e!r}"
        finally:
            if in_log:
                _log.info("request", command=command[:64], peer_uid=peer.uid, peer_pid=peer.pid,
                          privileged=peer.privileged, status=status.name.lower(),
                          error=logged or message or None,
                          seconds=round(time.perf_counter() - t0, 4))

    async def _read_request(self, stream, conn: admin.ServerConnection) -> admin.Request | None:
        """The request; None if the peer hangs up first."""
        with trio.fail_after(REQUEST_TIMEOUT):
            while True:
                event = conn.next_event()
                if isinstance(event, admin.Request):
                    return event
                if event is NEED_DATA:
                    if not (data := await stream.receive_some(65536)):
                        return None
                    conn.receive_data(data)

    async def _send(self, stream, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _dispatch(self, stream, conn, request: admin.Request, peer: Peer,
                        in_log: bool = True) -> None:
        cmd = request.command
        if cmd not in READ_ONLY and cmd not in MUTATING:
            raise RequestError(admin.Status.BAD_REQUEST, f"unknown command {cmd[:64]!r}")
        # A dry run of gc is read-only, like `dead`: anyone may ask.
        dry_gc = cmd == "gc" and request.options.get("dry_run") is True
        if cmd not in READ_ONLY and not peer.privileged and not dry_gc:
            raise RequestError(admin.Status.REFUSED,
                               f"{cmd!r} needs root or membership in the admin group")
        censor = not peer.privileged
        if cmd == "ping":
            await self._send(stream, conn.end(admin.Status.OK, "pong"))
            return
        if cmd in MUTATING:
            await self._gc_command(stream, conn, request, peer)
            return
        try:  # refuse a bad request before the scan, not after
            engine.check_request(cmd, request.options, request.args)
        except engine.BadRequest as e:
            raise RequestError(admin.Status.BAD_REQUEST, str(e)) from None
        await self._send(stream, conn.progress(admin.Progress("scanning roots", "scan")))
        a = await self.analysis(want_dead=cmd in engine.NEEDS_DEAD, logged=in_log,
                                answer=cmd if cmd in ("live", "dead") else None)
        db = self.open_db()
        await self._send(stream, conn.progress(admin.Progress("answering", "answer")))
        if cmd in ("live", "dead"):
            await self._send_paths(stream, conn, a, cmd, grow=peer.privileged)
            return

        def answer() -> bytes:
            rows = engine.query_rows(a, db, cmd, request.options, request.args, censor)
            if cmd == "stats":  # what the queries cost so far: shared, or one each?
                rows += [(b"analyses", b"%d" % self.analyses),
                         (b"scans", b"%d" % self.scans.started)]
            return b"".join(conn.row(*r) for r in rows)

        try:
            data = await self.build(conn, answer)
        except engine.BadRequest as e:
            raise RequestError(admin.Status.BAD_REQUEST, str(e)) from None
        await self._send(stream, data)
        await self._send(stream, conn.end(admin.Status.OK))

    async def _send_paths(self, stream, conn: admin.ServerConnection, a: Analysis,
                          cmd: str, *, grow: bool) -> None:
        """`live`/`dead`, from the frames the analysis keeps for every
        client (built once, in the worker); a version 1 client gets ROWS
        made from them, frame by frame.  `grow`: see _send_buffers."""
        # An analysis of a graph since reloaded keeps no answer: it would hold
        # the old path table until the next one.
        kept = self._answers if a._db is self.db else None
        frames = await self.build(conn, lambda: engine.path_frames(a, cmd, kept))
        if not conn.paths_frames:
            for pieces, _ in frames:
                await self._send(stream, conn.rows(b"".join(pieces).split(b"\0")[:-1]))
            await self._send(stream, conn.end(admin.Status.OK))
            return
        buffers: list = []
        for pieces, count in frames:
            buffers.append(conn.paths_header(sum(map(len, pieces)), count))
            buffers += pieces
        buffers.append(conn.end(admin.Status.OK))
        await self._send_buffers(stream, buffers, grow=grow)

    async def _send_buffers(self, stream: trio.SocketStream, buffers: list, *,
                            grow: bool = False) -> None:
        """The buffers, in order, as they are: sendmsg gathers up to
        IOV_MAX of them a call (the views of the path table a 1M-path
        answer is made of would otherwise be copied three times) -- no more
        than the socket can take at once: each buffer given costs a
        buffer-protocol call, for nothing when it is not sent.  `grow`: a
        privileged peer's big answer gets a bigger send buffer; anyone else's
        stays at the default -- a peer that does not read pins what it holds
        in the kernel until it is dropped, and any user may open
        MAX_CONNECTIONS_PER_USER connections.  It is dropped after
        SEND_TIMEOUT without progress, and once the whole answer took longer
        than SEND_TIMEOUT plus its size at MIN_SEND_RATE (a peer that reads
        a little now and then would else hold its connection, and the graph
        the answer is views of, for hours; gcroots-query reads all of it at
        once).  A peer gone is a stream error, not a bug of ours."""
        sock = stream.socket
        ends = list(itertools.accumulate(map(len, buffers)))
        room = _bigger_send_buffer(sock, ends[-1] if ends and grow else 0)
        i = done = 0   # the first buffer not sent whole; the bytes sent
        whole = trio.current_time() + SEND_TIMEOUT + (ends[-1] if ends else 0) / MIN_SEND_RATE
        while i < len(buffers):
            # Buffers up to `room` bytes past those sent (at least one).
            j = min(bisect.bisect_right(ends, done + room, i + 1), i + IOV_MAX)
            batch = buffers[i:max(j, i + 1)]
            if skip := done - (ends[i - 1] if i else 0):   # its part that went out
                batch[0] = memoryview(batch[0])[skip:]
            with trio.fail_at(min(whole, trio.current_time() + SEND_TIMEOUT)):
                try:
                    done += await sock.sendmsg(batch)
                except OSError as e:  # (as trio's SocketStream.send_all says it)
                    raise trio.BrokenResourceError(f"socket connection broken: {e}") from e
            # (found by bisection: a 1M-path answer is ~60,000 views, and a
            # loop over each of them cost ~10 ms of this thread per answer)
            i = bisect.bisect_right(ends, done, i)


def _bigger_send_buffer(sock, total: int) -> int:
    """A send buffer of up to SEND_BUFFER for an answer that big (fewer
    wake-ups: 64 MB go out in ~16 calls instead of ~300); the kernel caps
    it at net.core.wmem_max for an unprivileged process.  Returns how many
    bytes one call may send."""
    if total > SEND_BUFFER // 4:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    try:
        return max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 1 << 16)
    except OSError:
        return 1 << 16


def _nar_bytes(a: Analysis) -> tuple[int | None, int | None]:
    """Live/dead NAR bytes from the in-memory graph, when the analysis had it."""
    g = a.graph
    if g is None:
        return None, None
    dead = int(g.sizes[a.dead_mask].sum()) if a.dead_mask is not None else None
    return int(g.sizes[a.live_mask].sum()), dead


def unix_listener(path: bytes, mode: int = 0o666) -> tuple[trio.SocketListener, SocketFile]:
    sock, file = listen_unix(path, mode)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), file


def activated_listeners() -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock, _ in listen_fds()]
