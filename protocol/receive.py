"""The receiving ends: splitting a stream into frames and decoding their
payloads (both protocols), the daemon's side of the root stream, and the
client's of Nix's roots-daemon format.  Sans-IO: no
sockets, no trio.

The helper only sends (and reads one HELLO, which framing.parse_hello
reads): it never imports this module, so none of it runs as root.

Fail closed: RootStreamReceiver's StreamEnd.complete is True only if the
trailer arrived, says "ok", counts exactly the records received, and the
connection then ended cleanly.  Anything else (EOF before the trailer, a
count mismatch, an error status, bytes after the trailer) is incomplete, and
an incomplete stream must never be used as a root set.  Malformed input
raises RemoteProtocolError; the receiver then stays broken.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, Union

from .framing import (BAD_PATH, HELLO, INTEGERS, LENGTH, MAX_FRAME, Hello, LocalProtocolError,
                      RemoteProtocolError, hello_frame, parse_hello)
from .rootstream import (MAGIC, MAX_VERSION, MIN_VERSION, NEED_DATA, ROOT, SCHEMAS, STALE,
                         STALE_V2, STATUS_ERROR, STATUS_OK, TRAILER, Root, RootKind, ScanWarning,
                         StaleLink, _NeedData)


def decode_fields(ftype: int, schema: str, payload: bytes) -> list[Any]:
    """Split a payload by its schema (framing's).  Trailing or missing bytes
    are errors; a schema ending in '*' takes any number of further bytes
    fields.  (Any: each field's type is the schema's, checked here, not the
    caller's.)"""
    out: list[Any] = []
    pos = 0
    end = len(payload)
    repeat = schema.endswith("*")
    kinds = list(schema[:-1] if repeat else schema)
    i = 0
    while i < len(kinds) or (repeat and pos < end):
        kind = kinds[i] if i < len(kinds) else "b"
        i += 1
        if kind in INTEGERS:
            st = INTEGERS[kind]
            if pos + st.size > end:
                raise RemoteProtocolError(f"frame type {ftype} is truncated (integer field)")
            out.append(st.unpack_from(payload, pos)[0])
            pos += st.size
            continue
        if pos + 4 > end:
            raise RemoteProtocolError(f"frame type {ftype} is truncated (length of a field)")
        (n,) = LENGTH.unpack_from(payload, pos)
        pos += 4
        if pos + n > end:
            raise RemoteProtocolError(
                f"frame type {ftype}: a field claims {n} bytes but only {end - pos} remain")
        raw = bytes(payload[pos:pos + n])
        pos += n
        if kind == "s":
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise RemoteProtocolError(
                    f"frame type {ftype}: a text field is not valid UTF-8") from None
        elif kind == "p" and (not raw or b"\0" in raw):
            raise RemoteProtocolError(f"frame type {ftype}: {BAD_PATH} ({raw[:64]!r})")
        else:
            out.append(raw)
    if pos != end:
        raise RemoteProtocolError(f"frame type {ftype} has {end - pos} unexpected trailing bytes")
    return out


class FrameDecoder:
    """Incremental frame splitter.  Feed any split of the stream; get the same
    frames.  Refuses a frame whose header announces more than max_frame as
    soon as that header is at the head of what is not yet taken."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()   # received, not yet a whole frame (or a bad header)
        self._max = max_frame
        # Whole frames cut straight from what was fed, not yet taken: a
        # payload copied once, not into `buffer` first (a 1M-path answer is
        # ~65 MB).  They come before `buffer`.
        self._whole: collections.deque[tuple[int, bytes]] = collections.deque()

    def feed(self, data: bytes) -> None:
        view, pos = memoryview(data), 0
        if self.buffer:  # the frame begun before: completed from `data` if it can be
            if len(self.buffer) < 4:
                pos = min(4 - len(self.buffer), len(view))
                self.buffer += view[:pos]
            n: int = LENGTH.unpack_from(self.buffer)[0] if len(self.buffer) >= 4 else 0
            rest = 4 + n - len(self.buffer)
            if not 0 < n <= self._max or len(view) - pos < rest:
                self.buffer += view[pos:]
                if not self._whole:
                    self._length()
                return
            self.buffer += view[pos:pos + rest]
            pos += rest
            with memoryview(self.buffer) as head:
                self._whole.append((head[4], bytes(head[5:])))
            del self.buffer[:]
        while len(view) - pos >= 4:
            n = LENGTH.unpack_from(view, pos)[0]
            if not 0 < n <= self._max or len(view) - pos < 4 + n:
                break  # a bad header stays for when it is at the head (_length says)
            self._whole.append((view[pos + 4], bytes(view[pos + 5:pos + 4 + n])))
            pos += 4 + n
        self.buffer += view[pos:]
        if not self._whole:
            self._length()

    def _length(self) -> int:
        """The length of the frame at the head once its header is in, else 0."""
        if len(self.buffer) < 4:
            return 0
        n: int = LENGTH.unpack_from(self.buffer)[0]
        if n == 0:
            raise RemoteProtocolError("received an empty frame (length 0)")
        if n > self._max:
            raise RemoteProtocolError(
                f"received a frame header announcing {n} bytes, over the {self._max}-byte limit; "
                "the peer is not speaking this protocol or is misbehaving")
        return n

    def next_frame(self) -> tuple[int, bytes] | None:
        if self._whole:
            return self._whole.popleft()
        # feed() leaves in the buffer only a frame not yet whole, or a bad
        # header: refused now that it is at the head.
        self._length()
        return None


class Trailer(NamedTuple):   # (not a dataclass: see admin's events)
    ok: bool
    records: int
    message: str


class StreamEnd(NamedTuple):
    complete: bool
    reason: str         # why it is incomplete; "" when complete


Event = Union[Hello, Root, StaleLink, ScanWarning, Trailer, StreamEnd]


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
            if ftype != HELLO:
                raise RemoteProtocolError(
                    f"expected HELLO from the helper, got frame type {ftype}")
            hello, self.version = parse_hello(payload, MAGIC, "root-stream", self._versions,
                                              "helper")
            return hello
        schema = SCHEMAS.get(ftype)
        if schema is None:
            raise RemoteProtocolError(f"unknown or unexpected frame type {ftype} from the helper")
        if ftype == STALE and self.version >= 2:
            schema = STALE_V2
        fields = decode_fields(ftype, schema, payload)
        if ftype == TRAILER:
            status, count, message = fields
            if status not in (STATUS_OK, STATUS_ERROR):
                raise RemoteProtocolError(f"trailer has an unknown status {status}")
            self.trailer = Trailer(status == STATUS_OK, count, message)
            return self.trailer
        self.records_received += 1
        if ftype == ROOT:
            kind, label, store_path = fields
            try:
                return Root(RootKind(kind), label, store_path)
            except ValueError:
                raise RemoteProtocolError(f"root record has an unknown kind {kind}") from None
        if ftype == STALE:
            link, target, *identity = fields
            return StaleLink(link, target, tuple(identity) if any(identity) else None)
        return ScanWarning(*fields)

    def _verdict(self) -> tuple[bool, str]:
        if self._frames.buffer:
            return False, (f"the connection ended in the middle of a frame "
                           f"({len(self._frames.buffer)} bytes of it received)")
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


def decode_nix_roots(data: bytes) -> list[bytes]:
    """Nix's roots-daemon format (protocol/nixcompat.py), as Nix reads it:
    our tests' client."""
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise RemoteProtocolError("roots-daemon stream does not end with a NUL byte (truncated?)")
    paths = data[:-1].split(b"\0")
    if any(not p for p in paths):
        raise RemoteProtocolError("roots-daemon stream contains an empty path")
    return paths
