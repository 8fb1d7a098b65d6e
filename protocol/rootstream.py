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

Fail closed: the receiver's StreamEnd.complete is True only if the trailer
arrived, says "ok", counts exactly the records received, and the connection
then ended cleanly.  Anything else (EOF before the trailer, a count mismatch,
an error status, bytes after the trailer) is incomplete, and an incomplete
stream must never be used as a root set.  Malformed input raises
RemoteProtocolError; the receiver then stays broken.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Union

from .framing import (HELLO, MAX_FRAME, FrameDecoder, Hello, LocalProtocolError,
                      RemoteProtocolError, decode_fields, encode_frame,
                      hello_frame, parse_hello)

MAGIC = b"gcroots/roots"
MIN_VERSION = 1
MAX_VERSION = 2

_HELLO, _ROOT, _STALE, _WARNING, _TRAILER = HELLO, 2, 3, 4, 5
_SCHEMAS = {_ROOT: "Bbb", _STALE: "bb", _WARNING: "bIs", _TRAILER: "BQs"}
_STALE_V2 = "bbQQQ"   # + link_identity; all zeros: none (no inode is number 0)
_STATUS_OK, _STATUS_ERROR = 0, 1


class RootKind(enum.IntEnum):
    STATIC = 1     # a link (or file) under gcroots/
    INDIRECT = 2   # gcroots/auto/X -> link anywhere -> store path
    PROFILE = 3    # under profiles/
    RUNTIME = 4    # /proc and kernel sysctls
    TEMP = 5       # temproots/<pid> (the daemon reads these itself)


@dataclass(frozen=True)
class Root:
    kind: RootKind
    label: bytes        # the link path, or /proc/PID/..., or {temp:PID}
    store_path: bytes   # top-level store path (logical)


@dataclass(frozen=True)
class StaleLink:
    link: bytes         # gcroots/auto/X
    target: bytes       # what it points at (which does not exist)
    identity: tuple[int, int, int] | None = None  # link_identity(lstat(link)), taken first


def link_identity(st: os.stat_result) -> tuple[int, int, int]:
    """(st_dev, st_ino, st_ctime_ns) of an lstat: a link replaced by Nix
    (a new link renamed over it) or changed in any way has another."""
    return st.st_dev, st.st_ino, st.st_ctime_ns % 2**64


@dataclass(frozen=True)
class ScanWarning:
    path: bytes
    errno: int
    message: str


@dataclass(frozen=True)
class Trailer:
    ok: bool
    records: int
    message: str


@dataclass(frozen=True)
class StreamEnd:
    complete: bool
    reason: str         # why it is incomplete; "" when complete


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Record = Union[Root, StaleLink, ScanWarning]
Event = Union[Hello, Root, StaleLink, ScanWarning, Trailer, StreamEnd]


def _check_path(what: str, value: bytes, error: type[Exception]) -> None:
    if not value:
        raise error(f"{what} is empty")
    if b"\0" in value:
        raise error(f"{what} contains a NUL byte, which no path can")


class RootStreamSender:
    """Helper side: receives the daemon's HELLO, produces the bytes to send."""

    def __init__(self, versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
                 max_frame: int = MAX_FRAME) -> None:
        self._versions = versions
        self._frames = FrameDecoder(max_frame)
        self._max = max_frame
        self.version: int | None = None
        self.records_sent = 0
        self._finished = False

    def hello(self) -> bytes:
        return hello_frame(MAGIC, self._versions)

    def receive_data(self, data: bytes) -> None:
        if not data and self.version is None:
            raise RemoteProtocolError("the daemon closed the connection before saying hello")
        self._frames.feed(data)

    def next_event(self) -> Hello | _NeedData:
        frame = self._frames.next_frame()
        if frame is None:
            return NEED_DATA
        ftype, payload = frame
        if ftype != _HELLO or self.version is not None:
            raise RemoteProtocolError(f"unexpected frame type {ftype} from the daemon")
        hello, self.version = parse_hello(payload, MAGIC, "root-stream", self._versions, "daemon")
        return hello

    def send(self, record: Record) -> bytes:
        if self.version is None:
            raise LocalProtocolError("cannot send records before the version is agreed")
        if self._finished:
            raise LocalProtocolError("cannot send records after the trailer")
        if isinstance(record, Root):
            _check_path("root label", record.label, LocalProtocolError)
            _check_path("root store path", record.store_path, LocalProtocolError)
            data = encode_frame(_ROOT, _SCHEMAS[_ROOT],
                                [int(RootKind(record.kind)), record.label, record.store_path],
                                self._max)
        elif isinstance(record, StaleLink):
            _check_path("stale link", record.link, LocalProtocolError)
            if self.version >= 2:
                data = encode_frame(_STALE, _STALE_V2, [record.link, record.target,
                                                        *(record.identity or (0, 0, 0))], self._max)
            else:
                data = encode_frame(_STALE, _SCHEMAS[_STALE], [record.link, record.target],
                                    self._max)
        elif isinstance(record, ScanWarning):
            data = encode_frame(_WARNING, _SCHEMAS[_WARNING],
                                [record.path, record.errno, record.message], self._max)
        else:
            raise LocalProtocolError(f"not a record: {record!r}")
        self.records_sent += 1
        return data

    def trailer(self, ok: bool, message: str = "") -> bytes:
        if self._finished:
            raise LocalProtocolError("the trailer was already sent")
        self._finished = True
        return encode_frame(_TRAILER, _SCHEMAS[_TRAILER],
                            [_STATUS_OK if ok else _STATUS_ERROR, self.records_sent,
                             message[:4096]], self._max)


class RootStreamReceiver:
    """Daemon side: says hello, turns the helper's bytes into events and decides
    whether the stream was complete."""

    def __init__(self, versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
                 max_frame: int = MAX_FRAME) -> None:
        self._versions = versions
        self._frames = FrameDecoder(max_frame)
        self.version: int | None = None
        self.records_received = 0
        self.trailer: Trailer | None = None
        self._eof = False
        self._ended = False
        self._error: RemoteProtocolError | None = None

    def hello(self) -> bytes:
        return hello_frame(MAGIC, self._versions)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the helper; b"" means the connection ended."""
        if self._error:
            raise self._error
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        try:
            self._frames.feed(data)
        except RemoteProtocolError as e:
            self._error = e
            raise

    def next_event(self) -> Event | _NeedData:
        if self._error:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as e:
            self._error = e
            raise

    def _next_event(self) -> Event | _NeedData:
        if self._ended:
            raise LocalProtocolError("next_event() called after StreamEnd")
        frame = self._frames.next_frame()
        if frame is None:
            if not self._eof:
                return NEED_DATA
            self._ended = True
            return StreamEnd(*self._verdict())
        ftype, payload = frame
        if self.trailer is not None:
            raise RemoteProtocolError("the helper sent data after its trailer")
        if self.version is None:
            if ftype != _HELLO:
                raise RemoteProtocolError(
                    f"expected HELLO from the helper, got frame type {ftype}")
            hello, self.version = parse_hello(payload, MAGIC, "root-stream", self._versions,
                                              "helper")
            return hello
        schema = _SCHEMAS.get(ftype)
        if schema is None:
            raise RemoteProtocolError(f"unknown or unexpected frame type {ftype} from the helper")
        if ftype == _STALE and self.version >= 2:
            schema = _STALE_V2
        fields = decode_fields(ftype, schema, payload)
        if ftype == _TRAILER:
            status, count, message = fields
            if status not in (_STATUS_OK, _STATUS_ERROR):
                raise RemoteProtocolError(f"trailer has an unknown status {status}")
            self.trailer = Trailer(status == _STATUS_OK, count, message)
            return self.trailer
        self.records_received += 1
        if ftype == _ROOT:
            kind, label, store_path = fields
            try:
                kind = RootKind(kind)
            except ValueError:
                raise RemoteProtocolError(f"root record has an unknown kind {kind}") from None
            _check_path("root label", label, RemoteProtocolError)
            _check_path("root store path", store_path, RemoteProtocolError)
            return Root(kind, label, store_path)
        if ftype == _STALE:
            link, target, *identity = fields
            _check_path("stale link", link, RemoteProtocolError)
            return StaleLink(link, target, tuple(identity) if any(identity) else None)
        path, errno, message = fields
        return ScanWarning(path, errno, message)

    def _verdict(self) -> tuple[bool, str]:
        if self._frames.buffered:
            return False, (f"the connection ended in the middle of a frame "
                           f"({self._frames.buffered} bytes of it received)")
        if self.version is None:
            return False, "the connection ended before the helper said hello"
        t = self.trailer
        if t is None:
            return False, (f"the connection ended after {self.records_received} records "
                           "without a trailer: the scan did not finish")
        if not t.ok:
            return False, f"the helper reports the scan failed: {t.message or 'no reason given'}"
        if t.records != self.records_received:
            return False, (f"the trailer counts {t.records} records but "
                           f"{self.records_received} arrived")
        return True, ""

    @property
    def complete(self) -> bool:
        return self._ended and self._error is None and self._verdict()[0]
