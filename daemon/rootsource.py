"""Where a complete root set comes from: the privileged helper over its
socket (the daemon), or an in-process scan (`gcroots-query --standalone`).

Fail closed: anything short of a complete stream -- no helper, a refused
connection, a cut stream, an error trailer, a count mismatch, a protocol
violation, a deadline -- raises IncompleteRoots.  There is no partial result.
"""

from __future__ import annotations

import errno
import os
import time

import trio

from gcroots import log
from gcroots.layout import StoreLayout
from gcroots.protocol.framing import ProtocolError
from gcroots.protocol.rootstream import (NEED_DATA, Root, RootStreamReceiver, ScanWarning,
                                         StaleLink, StreamEnd)

from .engine import IncompleteRoots, RootSet

CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0       # the helper flushes at least every 50 ms while scanning
TOTAL_TIMEOUT = 15 * 60.0
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)

_log = log.get("gcroots.daemon")


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
                            raise IncompleteRoots(f"the helper's root stream is incomplete: "
                                                  f"{event.reason}")
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
    """A few attempts with backoff; the last failure is raised."""
    for attempt, delay in enumerate((*delays, None)):
        try:
            return await fetch_roots(socket_path, layout)
        except IncompleteRoots as e:
            if delay is None:
                raise
            _log.warning("helper_attempt_failed", attempt=attempt + 1, error=str(e),
                         retry_in_s=delay)
            await trio.sleep(delay)
    raise AssertionError("unreachable")
