"""The helper -> daemon root stream.  Sans-IO: no sockets, no trio.

Conversation on one connection (the daemon connects, the helper serves):

    daemon -> helper   HELLO(magic, min_version, max_version)
    helper -> daemon   HELLO(magic, min_version, max_version)
    helper -> daemon   ROOT | STALE | WARNING, any number, as they are found
    helper -> daemon   TRAILER(status, record_count, message)
    helper closes.

Both sides pick the highest version in both ranges; if there is none, each
side raises VersionMismatch naming both ranges.  Version 2 adds to STALE the
identity of the link as the helper saw it before judging its target
(link_identity); a version-1 peer sends none, and without one the daemon
never removes the link.

This module is the wire format and the helper's side (RootStreamSender);
the daemon's side, which decides whether a stream was complete, is
protocol/receive.py (RootStreamReceiver): the helper never imports it.
"""

import enum
import os
from typing import NamedTuple

from .framing import (MAX_FRAME, Hello, LocalProtocolError, RemoteProtocolError, encode_frame,
                      hello_frame, parse_hello)

MAGIC = b"gcroots/roots"
MIN_VERSION, MAX_VERSION = 1, 2

# Frame types after the HELLO, and their fields (framing's schemas).
ROOT, STALE, WARNING, TRAILER = 2, 3, 4, 5
SCHEMAS = {ROOT: "Bpp", STALE: "pb", WARNING: "bIs", TRAILER: "BQs"}
STALE_V2 = "pbQQQ"   # + link_identity; all zeros: none (no inode is number 0)
STATUS_OK, STATUS_ERROR = 0, 1


# What makes a root one (1..5 on the wire):
#   STATIC    a link (or file) under gcroots/
#   INDIRECT  gcroots/auto/X -> link anywhere -> store path
#   PROFILE   under profiles/
#   RUNTIME   /proc and kernel sysctls
#   TEMP      temproots/<pid> (the daemon reads these itself)
RootKind = enum.IntEnum("RootKind", "STATIC INDIRECT PROFILE RUNTIME TEMP")


class Root(NamedTuple):
    kind: RootKind
    label: bytes        # the link path, or /proc/PID/..., or {temp:PID}
    store_path: bytes   # top-level store path (logical)


class StaleLink(NamedTuple):
    link: bytes         # gcroots/auto/X
    target: bytes       # what it points at (which does not exist)
    identity: tuple[int, int, int] | None = None  # link_identity(lstat(link)), taken first


def link_identity(st: os.stat_result) -> tuple[int, int, int]:
    """(st_dev, st_ino, st_ctime_ns) of an lstat: a link replaced by Nix
    (a new link renamed over it) or changed in any way has another."""
    return st.st_dev, st.st_ino, st.st_ctime_ns % 2**64


class ScanWarning(NamedTuple):
    path: bytes
    errno: int
    message: str


class _NeedData(enum.Enum):   # a sentinel with a type of its own (PEP 484)
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA
Record = Root | StaleLink | ScanWarning


class RootStreamSender:
    """Helper side: reads the daemon's HELLO, produces the bytes to send.

    The daemon's HELLO is as long as ours (same magic, same fields): those
    bytes are all the helper ever reads, so it needs no stream decoder."""

    def __init__(self, versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
                 max_frame: int = MAX_FRAME) -> None:
        self._versions, self._max, self._received = versions, max_frame, b""
        self.version: int | None = None
        self.records_sent, self._finished = 0, False

    def hello(self) -> bytes:
        return hello_frame(MAGIC, self._versions)

    def receive_data(self, data: bytes) -> None:
        if not data and self.version is None:
            raise RemoteProtocolError("the daemon closed the connection before saying hello")
        self._received = (self._received + data)[:len(self.hello())]

    def next_event(self) -> Hello | _NeedData:
        ours, theirs = self.hello(), self._received
        if self.version is not None or not ours.startswith(theirs[:5]):   # length and type
            raise RemoteProtocolError(f"the daemon's first bytes are not a root-stream HELLO "
                                      f"({theirs[:5]!r}, expected {ours[:5]!r}); wrong socket?")
        if len(theirs) < len(ours):
            return NEED_DATA
        hello, self.version = parse_hello(theirs[5:], MAGIC, "root-stream", self._versions, "daemon")
        return hello

    def send(self, record: Record) -> bytes:
        if self.version is None or self._finished:
            raise LocalProtocolError("records are sent after the hello and before the trailer")
        ftype = {Root: ROOT, StaleLink: STALE, ScanWarning: WARNING}[type(record)]   # (KeyError: our bug)
        # A record's fields in their order; a stale link's identity flat (version 1: none).
        schema = STALE_V2 if ftype == STALE and self.version >= 2 else SCHEMAS[ftype]
        values = [*record[:2], *(record.identity or (0, 0, 0))] if isinstance(record, StaleLink) else record
        data = encode_frame(ftype, schema, values[:len(schema)], self._max)
        self.records_sent += 1
        return data

    def trailer(self, ok: bool, message: str = "") -> bytes:
        if self._finished:
            raise LocalProtocolError("the trailer was already sent")
        self._finished = True
        return encode_frame(TRAILER, SCHEMAS[TRAILER], [STATUS_OK if ok else STATUS_ERROR,
                                                        self.records_sent, message[:4096]], self._max)
