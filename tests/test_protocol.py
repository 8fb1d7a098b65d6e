"""The sans-IO protocols: round trips, truncation, garbage, limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcroots.protocol import framing, nixcompat
from gcroots.protocol.framing import Hello, RemoteProtocolError, VersionMismatch
from gcroots.protocol.receive import RootStreamReceiver, StreamEnd, Trailer, decode_nix_roots
from gcroots.protocol.rootstream import NEED_DATA, Root, RootKind, RootStreamSender, ScanWarning, StaleLink

paths = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)
records = st.one_of(
    st.builds(Root, st.sampled_from(list(RootKind)), paths, paths),
    st.builds(StaleLink, paths, st.binary(max_size=200).filter(lambda b: b"\0" not in b),
              st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 2**64 - 1),
                                    st.integers(0, 2**64 - 1))),
    st.builds(ScanWarning, st.binary(max_size=200), st.integers(0, 2**32 - 1),
              st.text(max_size=100)),
)


def make_stream(recs, ok=True, message=""):
    """Run the helper side against a daemon hello; return the helper's bytes."""
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    assert isinstance(sender.next_event(), Hello)
    out = [sender.hello()]
    out += [sender.send(r) for r in recs]
    out.append(sender.trailer(ok, message))
    return b"".join(out)


def drain(receiver):
    events = []
    while True:
        ev = receiver.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, StreamEnd):
            return events


def decode(chunks):
    """Feed chunks then EOF; return (events, end)."""
    r = RootStreamReceiver()
    r.hello()
    events = []
    for c in chunks:
        if not c:
            continue  # b"" would mean EOF
        r.receive_data(c)
        events += drain(r)
    r.receive_data(b"")
    events += drain(r)
    assert isinstance(events[-1], StreamEnd)
    return events[:-1], events[-1]


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return [c for c in out if c]


@given(st.lists(records, max_size=30), st.lists(st.integers(0, 10**6), max_size=20))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_any_split(recs, cuts):
    data = make_stream(recs)
    events, end = decode(split(data, cuts))
    # (type and value: events are NamedTuples, equal as tuples across types)
    assert type(end) is StreamEnd and end == StreamEnd(True, "")
    assert isinstance(events[0], Hello)
    assert [type(e) for e in events[1:-1]] == [type(r) for r in recs] and events[1:-1] == recs
    assert type(events[-1]) is Trailer and events[-1] == Trailer(True, len(recs), "")


@given(st.lists(records, max_size=8))
@settings(max_examples=60)
def test_every_truncation_is_incomplete(recs):
    data = make_stream(recs)
    for n in range(len(data)):
        events, end = decode([data[:n]])
        assert not end.complete, f"truncated at {n} of {len(data)} decoded as complete"
        assert end.reason


@given(st.binary(max_size=2000), st.lists(st.integers(0, 10**4), max_size=5))
@settings(max_examples=500)
def test_garbage_never_crashes_never_complete(garbage, cuts):
    try:
        _, end = decode(split(garbage, cuts))
    except RemoteProtocolError as e:
        assert str(e)
    else:
        assert not end.complete


@given(st.lists(records, max_size=5), st.binary(min_size=1, max_size=200))
@settings(max_examples=200)
def test_valid_prefix_then_garbage_is_never_complete(recs, garbage):
    data = make_stream(recs)
    try:
        _, end = decode([data + garbage])
    except RemoteProtocolError:
        return
    assert not end.complete


def test_hello_then_garbage_with_valid_frame_headers():
    # A structurally valid frame with a bogus type after the hello.
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    data = sender.hello() + struct.pack(">IB", 1, 99)
    with pytest.raises(RemoteProtocolError, match="frame type 99"):
        decode([data])


def test_error_trailer_is_incomplete():
    _, end = decode([make_stream([Root(RootKind.STATIC, b"/l", b"/nix/store/x")],
                                 ok=False, message="EIO reading /nix/var/nix/gcroots/x")])
    assert not end.complete
    assert "EIO reading" in end.reason


def test_count_mismatch_is_incomplete():
    # A trailer claiming more records than arrived: drop one ROOT frame.
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    hello = sender.hello()
    sender.send(Root(RootKind.STATIC, b"/a", b"/nix/store/a"))  # never delivered
    kept = sender.send(Root(RootKind.STATIC, b"/b", b"/nix/store/b"))
    _, end = decode([hello + kept + sender.trailer(True)])
    assert not end.complete
    assert "counts 2 records but 1 arrived" in end.reason


def test_oversized_frame_refused_from_header_alone():
    r = RootStreamReceiver()
    with pytest.raises(RemoteProtocolError, match="over the 65536-byte limit"):
        r.receive_data(struct.pack(">I", 2**31))
    # ...and the receiver stays failed.
    with pytest.raises(RemoteProtocolError):
        r.next_event()


def test_oversized_frame_after_valid_frames():
    data = make_stream([])[:-1]  # drop a byte so the trailer is pending
    hello_len = 4 + struct.unpack(">I", data[:4])[0]
    r = RootStreamReceiver()
    r.receive_data(data[:hello_len])
    assert isinstance(r.next_event(), Hello)
    with pytest.raises(RemoteProtocolError, match="limit"):
        r.receive_data(struct.pack(">I", framing.MAX_FRAME + 1) + b"\x02")


def test_sender_refuses_oversized_record():
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    with pytest.raises(framing.LocalProtocolError, match="limit"):
        sender.send(Root(RootKind.STATIC, b"/" + b"x" * 70000, b"/nix/store/x"))


def test_version_mismatch_names_both_ranges():
    helper = RootStreamSender(versions=(3, 4))
    helper.receive_data(RootStreamReceiver(versions=(1, 2)).hello())
    with pytest.raises(VersionMismatch, match=r"we speak root-stream versions 3\.\.4, the daemon speaks 1\.\.2"):
        helper.next_event()
    daemon = RootStreamReceiver(versions=(1, 2))
    daemon.receive_data(RootStreamSender(versions=(3, 4)).hello())
    with pytest.raises(VersionMismatch, match=r"versions 1\.\.2, the helper speaks 3\.\.4"):
        daemon.next_event()


def test_version_negotiation_picks_highest_common():
    helper = RootStreamSender(versions=(1, 3))
    helper.receive_data(RootStreamReceiver(versions=(2, 5)).hello())
    helper.next_event()
    assert helper.version == 3


@pytest.mark.parametrize("helper,daemon", [((1, 1), (1, 2)), ((1, 2), (1, 1)), ((1, 2), (1, 2))])
def test_stale_link_identity_needs_version_2_on_both_sides(helper, daemon):
    """An older peer on either side: the stream still works, the stale link
    arrives without its identity (and gcrootsd then never removes it)."""
    link = StaleLink(b"/nix/var/nix/gcroots/auto/x", b"/home/a/result", (2049, 1234, 5678))
    sender = RootStreamSender(versions=helper)
    rx = RootStreamReceiver(versions=daemon)
    sender.receive_data(rx.hello())
    sender.next_event()
    rx.receive_data(sender.hello() + sender.send(link) + sender.trailer(True))
    rx.receive_data(b"")
    events = drain(rx)
    assert type(events[-1]) is StreamEnd and events[-1] == StreamEnd(True, "")
    assert events[1] == (link if helper[1] == daemon[1] == 2 else StaleLink(link.link, link.target))


def test_wrong_magic_is_a_clear_error():
    bogus = framing.encode_frame(1, "bHH", [b"HTTP/1.1", 1, 1])
    with pytest.raises(RemoteProtocolError, match="not a gcroots root-stream endpoint"):
        decode([bogus])


def test_nul_in_path_is_refused_both_ways():
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    with pytest.raises(framing.LocalProtocolError, match="NUL"):
        sender.send(Root(RootKind.STATIC, b"/a\0b", b"/nix/store/x"))
    frame = framing.encode_frame(2, "Bbb", [1, b"/a\0b", b"/nix/store/x"])
    with pytest.raises(RemoteProtocolError, match="NUL"):
        decode([make_stream([])[:0] + sender.hello() + frame])


def test_invalid_utf8_message_is_protocol_error_not_unicode_error():
    bad = framing.LENGTH.pack(2) + b"\xff\xfe"
    frame_body = bytes([5]) + struct.pack(">BQ", 0, 0) + bad
    frame = struct.pack(">I", len(frame_body)) + frame_body
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        decode([sender.hello() + frame])


def test_unknown_root_kind():
    sender = RootStreamSender()
    sender.receive_data(RootStreamReceiver().hello())
    sender.next_event()
    frame = framing.encode_frame(2, "Bbb", [77, b"/a", b"/nix/store/x"])
    with pytest.raises(RemoteProtocolError, match="unknown kind 77"):
        decode([sender.hello() + frame])


def test_helper_reads_nothing_but_a_hello_sized_prefix():
    """The helper (root) reads only the daemon's HELLO, as long as its own:
    a first frame of another length or type is refused from its first 5
    bytes, not waited for; a HELLO trickled in byte by byte is read."""
    for first in (struct.pack(">IB", 1000, 1), struct.pack(">IB", 21, 2), b"GET /"):
        helper = RootStreamSender()
        helper.receive_data(first)
        with pytest.raises(RemoteProtocolError, match="not a root-stream HELLO"):
            helper.next_event()
    helper, theirs = RootStreamSender(), RootStreamReceiver().hello()
    for i in range(len(theirs) - 1):
        helper.receive_data(theirs[i:i + 1])
        assert helper.next_event() is NEED_DATA
    helper.receive_data(theirs[-1:] + b"\xff" * 100_000)   # nothing after it is read
    assert helper.next_event() == Hello(1, 2) and helper.version == 2


def test_daemon_eof_before_hello_is_reported_to_helper():
    helper = RootStreamSender()
    with pytest.raises(RemoteProtocolError, match="before saying hello"):
        helper.receive_data(b"")


@given(st.lists(paths, max_size=50))
def test_nix_roots_daemon_round_trip(ps):
    data = nixcompat.encode_nix_roots(ps)
    assert data == b"".join(p + b"\0" for p in ps)
    assert decode_nix_roots(data) == ps


def test_nix_roots_daemon_truncated():
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_nix_roots(b"/nix/store/abc")


# -- admin protocol: progress with numbers (version 2), old peers kept working ------

def _progress_events(client_versions, server_versions, progress) -> list:
    """What a client speaking `client_versions` gets for `progress` from a
    server speaking `server_versions`."""
    from gcroots.protocol import admin
    from gcroots.protocol.rootstream import NEED_DATA
    client = admin.ClientConnection(versions=client_versions)
    server = admin.ServerConnection(versions=server_versions)
    server.receive_data(client.request("gc", {"dry_run": True}))
    assert isinstance(server.next_event(), admin.Hello)
    assert isinstance(server.next_event(), admin.Request)
    client.receive_data(server.hello() + server.progress(progress) + server.end(admin.Status.OK))
    client.receive_data(b"")
    events = []
    while not isinstance(ev := client.next_event(), admin.AnswerEnd):
        assert ev is not NEED_DATA
        events.append(ev)
    assert ev.complete
    return [e for e in events if isinstance(e, admin.Progress)]


def test_progress_carries_numbers_between_version_2_peers():
    from gcroots.protocol.admin import Progress
    p = Progress("deleting", "delete", 2048, 4438, 12345678)
    assert _progress_events((1, 2), (1, 2), p) == [p]


@pytest.mark.parametrize("client,server", [((1, 1), (1, 2)), ((1, 2), (1, 1))])
def test_a_version_1_peer_gets_and_sends_text_progress(client, server):
    from gcroots.protocol.admin import Progress
    got = _progress_events(client, server, Progress("deleting", "delete", 5, 9, 1))
    assert got == [Progress("deleting")]


def test_a_version_1_client_refuses_numbered_progress():
    """The server must never send PROGRESS_NUMBERS to a version-1 client:
    that client (as old gcroots-query is) would fail on it."""
    from gcroots.protocol import admin
    client = admin.ClientConnection(versions=(1, 1))
    server = admin.ServerConnection(versions=(2, 2))
    client.receive_data(framing.hello_frame(admin.MAGIC, (1, 2)) + framing.encode_frame(
        7, "ssQQQ", ["delete", "deleting", 1, 2, 3]))
    assert isinstance(client.next_event(), admin.Hello)
    with pytest.raises(framing.RemoteProtocolError, match="unexpected frame type 7"):
        client.next_event()
    assert server.version == 2  # before HELLO: its lowest


def test_both_protocols_say_hello_alike():
    """One hello for both protocols (framing.parse_hello): a version
    mismatch names the protocol it is about (the admin protocol's used to
    say "root-stream"), a wrong magic the endpoint expected, and an empty
    range is refused as such by either."""
    from gcroots.protocol import admin
    server = admin.ServerConnection(versions=(3, 4))
    server.receive_data(admin.ClientConnection(versions=(1, 2)).request("stats"))
    with pytest.raises(VersionMismatch, match=r"we speak admin versions 3\.\.4, the client "
                                              r"speaks 1\.\.2"):
        server.next_event()
    client = admin.ClientConnection()
    client.receive_data(RootStreamReceiver().hello())
    with pytest.raises(RemoteProtocolError, match=r"not a gcroots admin endpoint \(magic "
                                                  r"b'gcroots/roots'"):
        client.next_event()
    for receiver, magic in ((admin.ClientConnection(), admin.MAGIC),
                            (RootStreamReceiver(), b"gcroots/roots")):
        receiver.receive_data(framing.hello_frame(magic, (2, 1)))
        with pytest.raises(RemoteProtocolError, match=r"empty version range 2\.\.1"):
            receiver.next_event()


def _frames_until_error(chunks: list[bytes], max_frame: int, drain_each: bool = True
                        ) -> tuple[list, bool]:
    """Every frame a FrameDecoder gives for these chunks, fed in turn (and
    drained after each, or only after the last), and whether it refused
    the stream."""
    from gcroots.protocol.receive import FrameDecoder
    d, out = FrameDecoder(max_frame), []
    try:
        for i, c in enumerate(chunks):
            d.feed(c)
            while (drain_each or i == len(chunks) - 1) and (f := d.next_frame()) is not None:
                out.append(f)
    except RemoteProtocolError:
        return out, True
    return out, False


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12),
       st.sampled_from([b"", struct.pack(">I", 0), struct.pack(">I", 41), b"\0\0"]),
       st.binary(max_size=30), st.lists(st.integers(0, 10**4), max_size=8))
@settings(max_examples=400)
def test_frame_decoder_same_frames_and_refusal_for_any_split(payloads, bad, tail, cuts):
    """Whole frames cut straight from a chunk, or gathered across chunks,
    come out the same, and a bad header (empty frame, over the limit) is
    refused only once every frame before it was taken, as byte by byte."""
    data = b"".join(struct.pack(">I", len(p)) + p for p in payloads) + bad + tail
    expected = _frames_until_error([data[i:i + 1] for i in range(len(data))], 40)
    assert _frames_until_error(split(data, cuts), 40) == expected
    assert _frames_until_error(split(data, cuts), 40, drain_each=False) == expected
    assert _frames_until_error([data], 40) == expected
    assert expected[0] == [(p[0], p[1:]) for p in payloads]
