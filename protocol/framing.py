"""Length-prefixed frames of typed fields.  Sans-IO: bytes in, frames out.

A frame on the wire:

    u32 length (big-endian, counts the type byte and the payload)
    u8  frame type
    payload: the frame type's fields in order, each
        'B' u8 | 'H' u16 | 'I' u32 | 'Q' u64     fixed-size big-endian integer
        'b'  u32 length + raw bytes                 (any byte)
        'p'  as 'b', never empty nor holding a NUL  (paths)
        's'  u32 length + UTF-8 text                (messages)
        '*'  (last only) any number of 'b' fields     (rows, argument lists: a
             receiver's schema; a sender spells them out, e.g. "ss" + "bb")

Every frame has a hard maximum size, checked as soon as its 4-byte header has
arrived, i.e. before any of its payload is buffered.  Anything malformed
raises RemoteProtocolError with a sentence a person can act on.

This module is what every end needs, the helper's included: writing frames
and reading a HELLO.  The helper reads nothing else (the daemon's HELLO,
rootstream.RootStreamSender), so the stream's decoder (FrameDecoder,
decode_fields) is the receiving ends', in receive.py: it never runs as root.
"""

import struct
from typing import NamedTuple, Sequence

MAX_FRAME = 64 * 1024
LENGTH = struct.Struct(">I")   # a frame's length, and a 'b', 'p' or 's' field's
INTEGERS = {kind: struct.Struct(">" + kind) for kind in "BHIQ"}   # u8, u16, u32, u64


class ProtocolError(Exception):
    """Base class.  `str(e)` is meant for the operator."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class VersionMismatch(RemoteProtocolError):
    """The two sides speak no version in common."""


BAD_PATH = "a path is empty or contains a NUL byte, which no path can"

# Every protocol's first frame, from each side: its magic and the range of
# versions it speaks; both then use the highest version they share.
HELLO, _HELLO_SCHEMA, _HELLO_VERSIONS = 1, "bHH", struct.Struct(">HH")


class Hello(NamedTuple):
    min_version: int
    max_version: int


def hello_frame(magic: bytes, versions: tuple[int, int]) -> bytes:
    return encode_frame(HELLO, _HELLO_SCHEMA, [magic, *versions])


def parse_hello(payload: bytes, magic: bytes, protocol: str, ours: tuple[int, int],
                peer: str) -> tuple[Hello, int]:
    """The peer's HELLO and the highest version both sides speak.  Its
    fields ('bHH') are read here, by their fixed layout: the helper reads
    nothing else, so it needs no general decoder."""
    if len(payload) < 8 or LENGTH.unpack_from(payload)[0] != len(payload) - 8:
        raise RemoteProtocolError("the peer's HELLO is malformed; wrong socket?")
    theirs, (lo, hi) = payload[4:-4], _HELLO_VERSIONS.unpack_from(payload, len(payload) - 4)
    if theirs != magic:
        raise RemoteProtocolError(f"the peer is not a gcroots {protocol} endpoint (magic "
                                  f"{theirs[:32]!r}, expected {magic!r}); wrong socket?")
    if lo > hi:
        raise RemoteProtocolError(f"the peer announced an empty version range {lo}..{hi}")
    if max(lo, ours[0]) > min(hi, ours[1]):
        raise VersionMismatch(f"protocol version mismatch: we speak {protocol} versions {ours[0]}..{ours[1]}, "
                              f"the {peer} speaks {lo}..{hi}; upgrade the older side")
    return Hello(lo, hi), min(hi, ours[1])


def encode_frame(ftype: int, schema: str, values: Sequence[object],
                 max_frame: int = MAX_FRAME) -> bytes:
    """One frame.  What the protocol refuses (a bad path, a frame over
    max_frame) raises LocalProtocolError; a value of the wrong type or range
    is the caller's bug and raises what Python raises for it."""
    parts = [bytes((ftype,))]
    for kind, value in zip(schema, values, strict=True):   # ValueError: our bug, not the peer's
        if kind in INTEGERS:   # struct.error (out of range, not an int): our bug as well
            parts.append(INTEGERS[kind].pack(value))
            continue
        data = str(value).encode("utf-8", "backslashreplace") if kind == "s" else value
        if not isinstance(data, (bytes, bytearray)):
            raise LocalProtocolError(f"frame type {ftype}: expected bytes, got {type(value).__name__}")
        if kind == "p" and (not data or b"\0" in data):
            raise LocalProtocolError(f"frame type {ftype}: {BAD_PATH} ({bytes(data[:64])!r})")
        parts += (LENGTH.pack(len(data)), bytes(data))
    body = b"".join(parts)
    if len(body) > max_frame:
        raise LocalProtocolError(
            f"frame type {ftype} would be {len(body)} bytes, over the {max_frame}-byte limit")
    return LENGTH.pack(len(body)) + body
