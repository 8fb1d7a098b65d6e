"""Talking to gcrootsd: one request, one complete answer (or an error)."""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable

from gcroots.protocol import admin
from gcroots.protocol.framing import ProtocolError
from gcroots.protocol.rootstream import NEED_DATA

IDLE_TIMEOUT = 600.0  # a collection can be long; the daemon sends progress meanwhile
CONNECT_TIMEOUT = 30   # seconds a full listen backlog may keep us waiting
RECV_BUFFER = 4 << 20  # bytes one recv may take (gcrootsd sends big answers with a 4 MiB buffer)


class DaemonError(Exception):
    pass


class Answer:   # (not a dataclass: see protocol/admin.py's events)
    def __init__(self, status: admin.Status, message: str,
                 rows: list[tuple[bytes, ...]] | None = None,
                 paths: list[bytes] | None = None) -> None:
        self.status, self.message = status, message
        self.rows: list[tuple[bytes, ...]] = rows if rows is not None else []
        # `live`/`dead`: the paths as NUL-terminated chunks instead of rows
        # (a million paths need no object each on their way to stdout)
        self.paths = paths

    def all_rows(self) -> list[tuple[bytes, ...]]:
        if self.paths is None:
            return self.rows
        joined = b"".join(self.paths)
        return [(p,) for p in joined.split(b"\0")[:-1]] if joined else []


def request(socket_path: str, command: str, options: dict | None = None,
            args: tuple[bytes, ...] = (), *,
            on_progress: Callable[[admin.Progress], None] | None = None) -> Answer:
    """Rows are buffered and the answer returned only once it is known to be
    complete.  `on_progress` gets the daemon's progress (client/term.py
    draws it)."""
    import socket  # here: a --standalone query never loads it (~1.3 ms)
    conn = admin.ClientConnection()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # A blocking connect: on a Unix socket whose listen backlog is full a
    # non-blocking one (as settimeout() makes it) fails with EAGAIN at once;
    # a blocking one waits for room, at most SO_SNDTIMEO.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", CONNECT_TIMEOUT, 0))
    try:
        s.connect(socket_path)
    except OSError as e:
        s.close()
        hint = " (is gcrootsd running? try --socket or --standalone)" \
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED) else ""
        if e.errno in (errno.EAGAIN, errno.EINPROGRESS):
            hint = f" (its listen queue stayed full for {CONNECT_TIMEOUT} s: overloaded?)"
        raise DaemonError(f"cannot connect to gcrootsd at {socket_path}: {e.strerror}{hint}") from None
    s.settimeout(IDLE_TIMEOUT)
    rows: list[tuple[bytes, ...]] = []
    paths: list[bytes] | None = None
    send_error: OSError | None = None
    try:
        with s:
            try:
                s.sendall(conn.request(command, options, args))
            except socket.timeout:
                raise
            except OSError as e:
                # The daemon closed early.  It may still have said why (e.g.
                # END(BUSY) for too many connections): read what it sent.
                send_error = e
            # Received into one buffer, reused: a fresh MiB per recv() would
            # be a fresh mapping to fault in (~70 of them for a 1M-path answer).
            buf = bytearray(RECV_BUFFER)
            view = memoryview(buf)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    try:
                        n = s.recv_into(buf)
                    except ConnectionResetError:
                        n = 0
                    conn.receive_data(view[:n])  # (copied: the next recv overwrites it)
                elif isinstance(event, admin.Rows):
                    rows.extend(zip(event.values))
                elif isinstance(event, admin.Row):
                    rows.append(event.fields)
                elif isinstance(event, admin.Paths):
                    paths = paths or []
                    paths.append(event.payload)
                elif isinstance(event, admin.Progress):
                    if on_progress:
                        on_progress(event)
                elif isinstance(event, admin.AnswerEnd):
                    if not event.complete:
                        if send_error is not None and conn.end is None and not conn.rows_received:
                            raise DaemonError(f"gcrootsd closed the connection before reading "
                                              f"the request: {send_error.strerror or send_error}")
                        raise DaemonError(f"incomplete answer from gcrootsd: {event.message}")
                    if paths is not None and rows:  # never both in one answer
                        raise DaemonError("gcrootsd mixed ROWS and PATHS in one answer")
                    return Answer(event.status, event.message, rows, paths)
    except socket.timeout:
        raise DaemonError(f"gcrootsd did not answer within {IDLE_TIMEOUT:.0f} s") from None
    except ProtocolError as e:
        raise DaemonError(f"gcrootsd broke the protocol: {e}") from None
    except OSError as e:  # never a bare BrokenPipeError: that would look like `| head`
        raise DaemonError(f"connection to gcrootsd failed: {e.strerror or e!r}") from None


def default_socket() -> str:
    return os.environ.get("GCROOTS_SOCKET", "/run/gcroots/gcrootsd.sock")
