"""gcroots-query <-> gcrootsd.  Sans-IO: no sockets, no trio.

One request per connection:

    client -> daemon   HELLO(magic, min_version, max_version)
    client -> daemon   REQUEST(command, options as JSON text, bytes args...)
    daemon -> client   HELLO(magic, min_version, max_version)
    daemon -> client   ROW(bytes fields...) | ROWS(one-field rows...) | PATHS(...) | PROGRESS...
    daemon -> client   END(status, row_count, message)

PROGRESS is PROGRESS(text) in version 1; from version 2 on it is
PROGRESS_NUMBERS(phase, text, done, total, bytes), so that the client can
draw a bar with a percentage, rate and ETA.  The daemon sends what the
version both sides speak allows.

ROWS packs many one-field rows (a list of store paths) into one frame: a
100k-path `dead` answer is ~90 frames, not 100k.  PATHS (version 3) does
the same with each value NUL-terminated (no store path or store entry
holds a NUL): the daemon sends slices of its sorted path table as they
are, and the client writes them out without an object per path.

Answers stream: `dead` on a big store is a long list, sent as it is produced.
As with the root stream, an answer is complete only if END arrived, says how
many rows were sent, and that many arrived: a script that pipes `dead` into
something destructive must never act on a cut list.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

from .framing import (HELLO, MAX_FRAME, Hello, LocalProtocolError, RemoteProtocolError,
                      encode_frame, hello_frame, parse_hello)
from .receive import FrameDecoder, decode_fields
from .rootstream import NEED_DATA, _NeedData

MAGIC = b"gcroots/admin"
MIN_VERSION = 1
MAX_VERSION = 3         # 2: PROGRESS_NUMBERS; 3: PATHS
MAX_ARGS = 1024         # `delete` takes store paths (a frame bounds them anyway)
MAX_OPTIONS_DEPTH = 16

_HELLO, _REQUEST, _ROW, _PROGRESS, _END, _ROWS, _PROGRESS_NUMBERS, _PATHS = HELLO, 2, 3, 4, 5, 6, 7, 8
_SCHEMAS = {_REQUEST: "ss*", _ROW: "*", _PROGRESS: "s", _END: "BQs", _ROWS: "*",
            _PROGRESS_NUMBERS: "ssQQQ", _PATHS: "*"}
PATHS_PAYLOAD = MAX_FRAME - 16   # the most a PATHS frame carries
_LEN = struct.Struct(">I")
_ROWS_HEADER = struct.Struct(">IB")


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1          # the daemon could not answer (e.g. no complete root set)
    REFUSED = 2        # the peer is not allowed to do this
    BUSY = 3           # a collection is running, or the peer has too many connections
    NEGATIVE = 4       # answered, and the answer is "no" (why: path not alive)
    BAD_REQUEST = 5    # unknown command, bad options


# The events: NamedTuples, not dataclasses -- gcroots-query imports this
# module at every start, and dataclasses costs it ~9 ms (inspect, ast, ...).

class Request(NamedTuple):
    command: str
    options: dict[str, Any]
    args: tuple[bytes, ...] = ()


class Row(NamedTuple):
    fields: tuple[bytes, ...]


class Rows(NamedTuple):
    """Several one-field rows."""
    values: tuple[bytes, ...]


class Paths(NamedTuple):
    """Several one-field rows, each NUL-terminated in `payload`."""
    payload: bytes
    rows: int       # how many (not `count`: a tuple has a count())


class Progress(NamedTuple):
    """Where long work is: its phase (scan, load, plan, check, measure,
    delete, links), `done` of `total` items (0: not known), bytes freed so
    far.  A version-1 peer sends (and gets) only the message."""
    message: str
    phase: str = ""
    done: int = 0
    total: int = 0
    bytes: int = 0


class End(NamedTuple):
    status: Status
    rows: int
    message: str


class AnswerEnd(NamedTuple):
    """The connection ended; `complete` only if END arrived and counts match."""
    complete: bool
    status: Status | None
    message: str


class InvalidRequest(RemoteProtocolError):
    """A well-framed REQUEST the daemon cannot take (options not a JSON
    object, nested too deeply, too many arguments): answered BAD_REQUEST."""


def _parse_hello(payload: bytes, ours: tuple[int, int], peer: str) -> Hello:
    return parse_hello(payload, MAGIC, "admin", ours, peer)[0]


def _common_version(hello: Hello | None, ours: tuple[int, int]) -> int:
    """The highest version both speak (the lowest before the peer's HELLO)."""
    return ours[0] if hello is None else min(hello.max_version, ours[1])


def _nesting(text: str) -> int:
    """How deep JSON text nests (brackets inside strings aside): json.loads
    recurses once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _split_rows(payload: bytes) -> tuple[bytes, ...]:
    """The hot path of big answers: length-prefixed values back to back."""
    out = []
    pos, end = 0, len(payload)
    unpack = _LEN.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise RemoteProtocolError("ROWS frame is truncated (length of a value)")
        (n,) = unpack(payload, pos)
        pos += 4
        if pos + n > end:
            raise RemoteProtocolError(f"ROWS frame: a value claims {n} bytes but only {end - pos} remain")
        out.append(payload[pos:pos + n])
        pos += n
    return tuple(out)


class ServerConnection:
    """Daemon side: reads HELLO + REQUEST, produces the answer's bytes."""

    def __init__(self, versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION)) -> None:
        self._versions = versions
        self._frames = FrameDecoder(MAX_FRAME)
        self._hello: Hello | None = None
        self.request: Request | None = None
        self.rows_sent = 0
        self._ended = False

    def receive_data(self, data: bytes) -> None:
        if not data:
            raise RemoteProtocolError("the client closed the connection before its request")
        self._frames.feed(data)

    def next_event(self) -> Hello | Request | _NeedData:
        frame = self._frames.next_frame()
        if frame is None:
            return NEED_DATA
        ftype, payload = frame
        if self._hello is None:
            if ftype != _HELLO:
                raise RemoteProtocolError(f"expected HELLO, got frame type {ftype}")
            self._hello = _parse_hello(payload, self._versions, "client")
            return self._hello
        if ftype != _REQUEST or self.request is not None:
            raise RemoteProtocolError(f"unexpected frame type {ftype} from the client")
        command, options_text, *args = decode_fields(_REQUEST, _SCHEMAS[_REQUEST], payload)
        if len(args) > MAX_ARGS:
            raise InvalidRequest(f"too many arguments ({len(args)} > {MAX_ARGS})")
        if _nesting(options_text) > MAX_OPTIONS_DEPTH:
            raise InvalidRequest(f"request options are nested deeper than {MAX_OPTIONS_DEPTH}")
        try:
            options = json.loads(options_text) if options_text else {}
        except (ValueError, RecursionError):
            raise InvalidRequest("request options are not valid JSON") from None
        if not isinstance(options, dict):
            raise InvalidRequest("request options must be a JSON object")
        self.request = Request(command, options, tuple(args))
        return self.request

    def hello(self) -> bytes:
        return hello_frame(MAGIC, self._versions)

    def row(self, *fields: bytes) -> bytes:
        if self._ended:
            raise LocalProtocolError("answer already ended")
        frame = encode_frame(_ROW, "b" * len(fields), fields)
        self.rows_sent += 1
        return frame

    def rows(self, values: list[bytes]) -> bytes:
        """Many one-field rows, packed into as few frames as fit."""
        if self._ended:
            raise LocalProtocolError("answer already ended")
        frames = []
        parts: list[bytes] = []
        size = 1
        limit = MAX_FRAME - 16
        pack = _LEN.pack
        for v in values:
            n = 4 + len(v)
            if size + n > limit:
                if n + 1 > limit:
                    raise LocalProtocolError(f"a {len(v)}-byte value does not fit in a frame")
                frames.append(self._rows_frame(parts, size))
                parts, size = [], 1
            parts += (pack(n - 4), v)
            size += n
        if parts:
            frames.append(self._rows_frame(parts, size))
        self.rows_sent += len(values)
        return b"".join(frames)

    @staticmethod
    def _rows_frame(parts: list[bytes], size: int) -> bytes:
        return _ROWS_HEADER.pack(size, _ROWS) + b"".join(parts)

    @property
    def paths_frames(self) -> bool:
        """Whether the client reads PATHS frames (protocol version 3)."""
        return self.version >= 3

    def paths(self, payload: bytes | bytearray | memoryview, count: int) -> bytes:
        """One PATHS frame: `payload` (bytes-like, at most PATHS_PAYLOAD) is
        `count` values, each NUL-terminated.  Version 3 clients only."""
        return self.paths_header(len(payload), count) + payload

    def paths_header(self, size: int, count: int) -> bytes:
        """What goes before a PATHS frame's `size` bytes of payload, sent
        as they are (views of gcrootsd's path table: no copy)."""
        if self._ended:
            raise LocalProtocolError("answer already ended")
        if not self.paths_frames or size > PATHS_PAYLOAD:
            raise LocalProtocolError("PATHS frame not for this client, or too large")
        self.rows_sent += count
        return _ROWS_HEADER.pack(size + 1, _PATHS)

    @property
    def version(self) -> int:
        return _common_version(self._hello, self._versions)

    def progress(self, p: Progress | str) -> bytes:
        if isinstance(p, str):
            p = Progress(p)
        if self.version < 2:
            return encode_frame(_PROGRESS, _SCHEMAS[_PROGRESS], [p.message[:1024]])
        return encode_frame(_PROGRESS_NUMBERS, _SCHEMAS[_PROGRESS_NUMBERS],
                            [p.phase[:64], p.message[:1024], *(max(0, min(n, 2**64 - 1)) for n in
                                                               (p.done, p.total, p.bytes))])

    def end(self, status: Status, message: str = "") -> bytes:
        if self._ended:
            raise LocalProtocolError("answer already ended")
        self._ended = True
        return encode_frame(_END, _SCHEMAS[_END], [int(status), self.rows_sent, message[:8192]])


class ClientConnection:
    """gcroots-query side."""

    def __init__(self, versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION)) -> None:
        self._versions = versions
        self._frames = FrameDecoder(MAX_FRAME)
        self._hello: Hello | None = None
        self.end: End | None = None
        self.rows_received = 0
        self._eof = False
        self._finished = False

    def request(self, command: str, options: dict[str, Any] | None = None, args: tuple[bytes, ...] = ()) -> bytes:
        return hello_frame(MAGIC, self._versions) + encode_frame(
            _REQUEST, "ss" + "b" * len(args), [command, json.dumps(options or {}), *args])

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        self._frames.feed(data)

    def next_event(self) -> Hello | Row | Rows | Paths | Progress | End | AnswerEnd | _NeedData:
        if self._finished:
            raise LocalProtocolError("next_event() after AnswerEnd")
        frame = self._frames.next_frame()
        if frame is None:
            if not self._eof:
                return NEED_DATA
            self._finished = True
            return self._verdict()
        ftype, payload = frame
        if self._hello is None:
            if ftype != _HELLO:
                raise RemoteProtocolError(f"expected HELLO from the daemon, got frame type {ftype}")
            self._hello = _parse_hello(payload, self._versions, "daemon")
            return self._hello
        if self.end is not None:
            raise RemoteProtocolError("the daemon sent data after END")
        schema = _SCHEMAS.get(ftype, "")
        if ftype == _ROW:
            self.rows_received += 1
            return Row(tuple(decode_fields(_ROW, schema, payload)))
        if ftype == _ROWS:
            values = _split_rows(payload)
            self.rows_received += len(values)
            return Rows(values)
        if ftype == _PATHS:
            if _common_version(self._hello, self._versions) < 3 or payload[-1:] not in (b"\0", b""):
                raise RemoteProtocolError("PATHS frame before protocol version 3, or not "
                                          "NUL-terminated")
            # (bytes.count is ~4x slower at one byte than a replace that drops it)
            count = len(payload) - len(payload.replace(b"\0", b""))
            self.rows_received += count
            return Paths(payload, count)
        if ftype == _PROGRESS:
            return Progress(*decode_fields(_PROGRESS, schema, payload))
        if ftype == _PROGRESS_NUMBERS and _common_version(self._hello, self._versions) >= 2:
            phase, message, done, total, nbytes = decode_fields(ftype, schema, payload)
            return Progress(message, phase, done, total, nbytes)
        if ftype == _END:
            status, rows, message = decode_fields(_END, schema, payload)
            try:
                status = Status(status)
            except ValueError:
                raise RemoteProtocolError(f"END has an unknown status {status}") from None
            self.end = End(status, rows, message)
            return self.end
        raise RemoteProtocolError(f"unexpected frame type {ftype} from the daemon")

    def _verdict(self) -> AnswerEnd:
        if self._frames.buffer:
            return AnswerEnd(False, None, "the daemon's answer was cut in the middle of a frame")
        if self.end is None:
            return AnswerEnd(False, None, f"the daemon's answer ended after {self.rows_received} "
                                          "rows without END (daemon crashed or was stopped?)")
        if self.end.rows != self.rows_received:
            return AnswerEnd(False, self.end.status, f"END counts {self.end.rows} rows but "
                                                     f"{self.rows_received} arrived")
        return AnswerEnd(True, self.end.status, self.end.message)
