"""Length-prefixed frames of typed fields.  Sans-IO: bytes in, frames out.

A frame on the wire:

    u32 length (big-endian, counts the type byte and the payload)
    u8  frame type
    payload: the frame type's fields in order, each
        'B' u8 | 'H' u16 | 'I' u32 | 'Q' u64     fixed-size big-endian integer
        'b'  u32 length + raw bytes                 (paths: any byte)
        's'  u32 length + UTF-8 text                (messages)
        '*'  (last only) any number of 'b' fields     (rows, argument lists)

Every frame has a hard maximum size, checked as soon as its 4-byte header has
arrived, i.e. before any of its payload is buffered.  Anything malformed
raises RemoteProtocolError with a sentence a person can act on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Sequence

MAX_FRAME = 64 * 1024
_HEADER = struct.Struct(">I")
_FIXED = {"B": struct.Struct(">B"), "H": struct.Struct(">H"),
          "I": struct.Struct(">I"), "Q": struct.Struct(">Q")}


class ProtocolError(Exception):
    """Base class.  `str(e)` is meant for the operator."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# Every protocol's first frame, from each side: its magic and the range of
# versions it speaks; both then use the highest version they share.
HELLO, _HELLO_SCHEMA = 1, "bHH"


@dataclass(frozen=True)
class Hello:
    min_version: int
    max_version: int


class VersionMismatch(RemoteProtocolError):
    def __init__(self, protocol: str, ours: tuple[int, int], theirs: tuple[int, int],
                 peer: str) -> None:
        super().__init__(
            f"protocol version mismatch: we speak {protocol} versions {ours[0]}..{ours[1]}, "
            f"the {peer} speaks {theirs[0]}..{theirs[1]}; upgrade the older side")
        self.ours, self.theirs = ours, theirs


def hello_frame(magic: bytes, versions: tuple[int, int]) -> bytes:
    return encode_frame(HELLO, _HELLO_SCHEMA, [magic, *versions])


def parse_hello(payload: bytes, magic: bytes, protocol: str, ours: tuple[int, int],
                peer: str) -> tuple[Hello, int]:
    """The peer's HELLO and the highest version both sides speak."""
    theirs, lo, hi = decode_fields(HELLO, _HELLO_SCHEMA, payload)
    if theirs != magic:
        raise RemoteProtocolError(f"the peer is not a gcroots {protocol} endpoint (magic "
                                  f"{theirs[:32]!r}, expected {magic!r}); wrong socket?")
    if lo > hi:
        raise RemoteProtocolError(f"the peer announced an empty version range {lo}..{hi}")
    if max(lo, ours[0]) > min(hi, ours[1]):
        raise VersionMismatch(protocol, ours, (lo, hi), peer)
    return Hello(lo, hi), min(hi, ours[1])


def encode_frame(ftype: int, schema: str, values: Sequence[object],
                 max_frame: int = MAX_FRAME) -> bytes:
    if schema.endswith("*"):
        schema = schema[:-1] + "b" * max(0, len(values) - len(schema) + 1)
    if len(schema) != len(values):
        raise LocalProtocolError(f"frame type {ftype}: {len(values)} values for schema {schema!r}")
    parts = [bytes((ftype,))]
    for kind, value in zip(schema, values):
        if kind in _FIXED:
            try:
                parts.append(_FIXED[kind].pack(value))
            except (struct.error, TypeError) as e:
                raise LocalProtocolError(f"frame type {ftype}: bad integer {value!r}: {e}") from None
        elif kind == "b":
            if not isinstance(value, (bytes, bytearray)):
                raise LocalProtocolError(f"frame type {ftype}: expected bytes, got {type(value).__name__}")
            parts.append(_HEADER.pack(len(value)))
            parts.append(bytes(value))
        elif kind == "s":
            data = str(value).encode("utf-8", "backslashreplace")
            parts.append(_HEADER.pack(len(data)))
            parts.append(data)
        else:
            raise LocalProtocolError(f"unknown field kind {kind!r}")
    body = b"".join(parts)
    if len(body) > max_frame:
        raise LocalProtocolError(
            f"frame type {ftype} would be {len(body)} bytes, over the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode_fields(ftype: int, schema: str, payload: bytes) -> list[Any]:
    """Split a payload by its schema.  Trailing or missing bytes are errors;
    a schema ending in '*' takes any number of further bytes fields.  (Any:
    each field's type is the schema's, checked here, not the caller's.)"""
    out: list[Any] = []
    pos = 0
    end = len(payload)
    repeat = schema.endswith("*")
    kinds = list(schema[:-1] if repeat else schema)
    i = 0
    while i < len(kinds) or (repeat and pos < end):
        kind = kinds[i] if i < len(kinds) else "b"
        i += 1
        if kind in _FIXED:
            st = _FIXED[kind]
            if pos + st.size > end:
                raise RemoteProtocolError(f"frame type {ftype} is truncated (integer field)")
            out.append(st.unpack_from(payload, pos)[0])
            pos += st.size
            continue
        if pos + 4 > end:
            raise RemoteProtocolError(f"frame type {ftype} is truncated (length of a field)")
        (n,) = _HEADER.unpack_from(payload, pos)
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
        else:
            out.append(raw)
    if pos != end:
        raise RemoteProtocolError(f"frame type {ftype} has {end - pos} unexpected trailing bytes")
    return out


class FrameDecoder:
    """Incremental frame splitter.  Feed any split of the stream; get the same
    frames.  Refuses a frame whose header announces more than max_frame."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._check_header()

    def _check_header(self) -> None:
        if len(self._buf) >= 4:
            (n,) = _HEADER.unpack_from(self._buf, 0)
            if n == 0:
                raise RemoteProtocolError("received an empty frame (length 0)")
            if n > self._max:
                raise RemoteProtocolError(
                    f"received a frame header announcing {n} bytes, over the {self._max}-byte "
                    "limit; the peer is not speaking this protocol or is misbehaving")

    def next_frame(self) -> tuple[int, bytes] | None:
        if len(self._buf) < 4:
            return None
        (n,) = _HEADER.unpack_from(self._buf, 0)
        if len(self._buf) < 4 + n:
            return None
        ftype = self._buf[4]
        payload = bytes(self._buf[5:4 + n])
        del self._buf[:4 + n]
        self._check_header()
        return ftype, payload

    @property
    def buffered(self) -> int:
        return len(self._buf)
