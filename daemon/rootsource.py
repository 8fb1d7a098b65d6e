"""Where a complete root set comes from: the privileged helper over its
socket (the daemon), or an in-process scan (`gcroots-query --standalone`).

Fail closed: anything short of a complete stream -- no helper, a refused
connection, a cut stream, an error trailer, a count mismatch, a protocol
violation, a deadline -- raises IncompleteRoots.  There is no partial result.
"""

from __future__ import annotations

import errno
import os
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from gcroots import log
from gcroots.layout import StoreLayout
from gcroots.protocol.framing import ProtocolError
from gcroots.protocol.receive import RootStreamReceiver, StreamEnd
from gcroots.protocol.rootstream import NEED_DATA, Root, ScanWarning, StaleLink

from .engine import IncompleteRoots, RootSet, scan_error

CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0       # the helper flushes at least every 50 ms while scanning
TOTAL_TIMEOUT = 15 * 60.0
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)

_log = log.get("gcroots.daemon")


class ScanFailed(IncompleteRoots):
    """The helper finished and reports its scan failed: asking again would
    only repeat that (and the reason, in the log), so it is not retried."""


async def fetch_roots(socket_path: bytes, layout: StoreLayout, *,
                      idle_timeout: float = IDLE_TIMEOUT,
                      total_timeout: float = TOTAL_TIMEOUT) -> RootSet:
    where = os.fsdecode(socket_path)
    t0 = time.perf_counter()
    records = []
    try:
        with trio.fail_after(total_timeout):
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_unix_socket(where)
            async with stream:
                rx = RootStreamReceiver()
                with trio.fail_after(CONNECT_TIMEOUT):
                    await stream.send_all(rx.hello())
                while True:
                    event = rx.next_event()
                    if event is NEED_DATA:
                        with trio.fail_after(idle_timeout):
                            try:
                                data = await stream.receive_some(65536)
                            except trio.BrokenResourceError:
                                data = b""  # reset: the stream simply ends here
                        rx.receive_data(data)
                    elif isinstance(event, StreamEnd):
                        if not event.complete:
                            failed = rx.trailer is not None and not rx.trailer.ok
                            raise (ScanFailed if failed else IncompleteRoots)(
                                f"the helper's root stream is incomplete: {event.reason}")
                        break
                    elif isinstance(event, (Root, StaleLink, ScanWarning)):
                        records.append(event)
    except trio.TooSlowError:
        raise IncompleteRoots(f"the helper at {where} did not answer in time") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        # e.g. the helper closed the connection before reading our hello (it
        # does so beyond its connection cap): a failed scan, never a crash.
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
        raise IncompleteRoots(f"the helper at {where} closed the connection: "
                              f"{getattr(cause, 'strerror', None) or cause!r}") from None
    except OSError as e:
        hint = " (is gcroots-helper running?)" if e.errno in (errno.ENOENT, errno.ECONNREFUSED) else ""
        raise IncompleteRoots(f"cannot reach the helper at {where}: {e.strerror or e}{hint}") from None
    except ProtocolError as e:
        raise IncompleteRoots(f"the helper at {where} broke the protocol: {e}") from None
    return RootSet.from_records(records, layout, time.perf_counter() - t0)


async def fetch_roots_retrying(socket_path: bytes, layout: StoreLayout,
                               delays: tuple[float, ...] = RETRY_DELAYS) -> RootSet:
    """A few attempts with backoff, jittered (daemons and requesters that
    failed together do not come back together); the last failure is raised."""
    for attempt, delay in enumerate((*delays, None)):
        try:
            return await fetch_roots(socket_path, layout)
        except IncompleteRoots as e:
            if delay is None or isinstance(e, ScanFailed):
                raise
            delay *= 1 + random.random() / 2
            _log.warning("helper_attempt_failed", attempt=attempt + 1, error=str(e),
                         retry_in_s=round(delay, 3))
            await trio.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(eq=False)
class _Scan:
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    rootset: RootSet | None = None
    error: str = "the root scan was cancelled"
    waiters: int = 0
    logged: bool = False   # said in the log: some waiter's lines are (see Daemon.in_log)


class SharedScans:
    """At most one helper scan in flight.  Whoever asks while one runs waits
    for it and shares its result, success or failure: a flood of queries is
    one scan, not one each (the helper serves a few connections at a time and
    refuses the rest, which failed everyone's queries).

    `started_after` asks for a scan that began at or after that time (trio's
    clock): a collection passes the time it took gc.lock, so it never uses a
    scan from before the lock.  Scans run in `nursery` (the daemon's), not in
    a requester's task: a requester that goes away does not cancel the others'
    scan."""

    def __init__(self, fetch: Callable[[], Awaitable[RootSet]],
                 on_failure: Callable[[str, str, bool], None] = lambda *_: None) -> None:
        self._fetch = fetch
        self._on_failure = on_failure   # once per failed scan, however many waited for it
        self._current: _Scan | None = None
        self.started = 0

    async def get(self, nursery: trio.Nursery, *, started_after: float | None = None,
                  logged: bool = True) -> RootSet:
        while True:
            scan = self._current
            if scan is None:
                scan = self._current = _Scan(trio.current_time())
                self.started += 1
                nursery.start_soon(self._run, scan)
            scan.waiters += 1
            scan.logged |= logged
            await scan.done.wait()
            if started_after is None or scan.started >= started_after:
                if scan.rootset is None:
                    raise IncompleteRoots(scan.error)  # a fresh exception per waiter
                return scan.rootset
            # That scan began before our lock: wait for (or start) a new one.

    async def _run(self, scan: _Scan) -> None:
        try:
            scan.rootset = await self._fetch()
        except IncompleteRoots as e:
            scan.error, owner = scan_error(str(e))
            self._on_failure(scan.error, owner, scan.logged)
        except Exception as e:  # fail closed, keep serving
            _log.exception("root_scan_internal_error")
            scan.error = f"the root scan failed: {type(e).__name__}: {e}"
            self._on_failure(scan.error, "", True)
        finally:
            if self._current is scan:
                self._current = None
            scan.done.set()
            if scan.logged:
                _log.info("root_scan", ok=scan.rootset is not None, waiters=scan.waiters,
                          seconds=round(trio.current_time() - scan.started, 4))
