"""gcroots-helper serve: peer checks, streaming, concurrency, socket
activation, the Nix roots-daemon endpoint, fail-closed on scan errors."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gcroots.helper import serve
from gcroots.helper.scan import ScanError
from gcroots.layout import StoreLayout
from gcroots.protocol.framing import VersionMismatch
from gcroots.protocol.receive import RootStreamReceiver, StreamEnd, decode_nix_roots
from gcroots.protocol.rootstream import NEED_DATA, Root, RootKind

from . import support
from .support import HELPER, lines, read_root_stream, roots_of, stale_of
from .test_helper_scan import nest


@pytest.fixture
def store(scratch, users):
    root = scratch / "store"
    support.make_store(root, paths=500, seed=21, roots=30, indirect=8, stale=2, quirks=1)
    for home, user in (("alice", support.ALICE), ("bob", support.BOB)):
        support.chown_tree(root / "home" / home, user, 0o700)
    return root


class Helper:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log_path = proc, log

    def log(self) -> list[dict]:
        return support.json_lines(self.log_path)

    def stop(self):
        support.stop_process(self.proc)


@pytest.fixture
def start_helper(scratch):
    started = []

    def start(root: Path, *args: str, wait: str | None = None, cmd_prefix=()) -> Helper:
        log = scratch / f"helper-{len(started)}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([*cmd_prefix, HELPER, "serve", "--root", str(root),
                                     "--no-runtime", *args], stderr=f)
        h = Helper(proc, log)
        started.append(h)
        if wait:
            support.wait_for_socket(wait, proc)
        return h

    yield start
    for h in started:
        h.stop()


def candidates(root: Path) -> set[bytes]:
    out = subprocess.run([HELPER, "scan", "--root", str(root), "--no-runtime", "--all-candidates"],
                         capture_output=True, check=True).stdout
    return lines(out)


def test_stream_is_complete_and_equals_scan(store, scratch, start_helper):
    sock = scratch / "helper.sock"
    start_helper(store, "--socket", str(sock), "--allow-user", support.DAEMON_USER,
                 wait=str(sock))
    events, end, _ = read_root_stream(sock)
    assert end.complete, end.reason
    assert {lbl + b" -> " + sp for lbl, sp in roots_of(events)} == candidates(store)
    assert len(stale_of(events)) == 2
    kinds = {e.kind for e in events if isinstance(e, Root)}
    assert {RootKind.STATIC, RootKind.INDIRECT, RootKind.PROFILE} <= kinds


CLIENT = r"""
import json, os, socket, sys
from gcroots.protocol.receive import RootStreamReceiver, StreamEnd
from gcroots.protocol.rootstream import NEED_DATA, Root
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno})); sys.exit()
rx = RootStreamReceiver()
try:
    s.sendall(rx.hello())
except (BrokenPipeError, ConnectionResetError):
    pass  # refused and closed before our hello went out: same as EOF
raw = b""
roots = 0
while True:
    ev = rx.next_event()
    if ev is NEED_DATA:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""  # closed with our hello unread: same as EOF
        raw += data; rx.receive_data(data); continue
    roots += isinstance(ev, Root)
    if isinstance(ev, StreamEnd):
        break
print(json.dumps({"complete": ev.complete, "reason": ev.reason, "bytes": len(raw), "roots": roots}))
"""


def run_client_as(user: str, sock: Path) -> dict:
    out = support.as_user(user, CLIENT, str(sock))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_peer_check(store, scratch, start_helper, users):
    sock = scratch / "helper.sock"
    h = start_helper(store, "--socket", str(sock), "--allow-user", support.DAEMON_USER,
                     "--socket-mode", "0666", wait=str(sock))
    allowed = run_client_as(support.DAEMON_USER, sock)
    assert allowed["complete"] and allowed["roots"] > 30
    refused = run_client_as(support.BOB, sock)
    # Closed without a single byte: the stream is incomplete, not empty-and-complete.
    assert refused == {"complete": False, "reason": refused["reason"], "bytes": 0, "roots": 0}
    assert "before the helper said hello" in refused["reason"]
    bob_uid = pwd.getpwnam(support.BOB).pw_uid
    time.sleep(0.2)
    assert any(e.get("event") == "peer_refused" and e.get("peer_uid") == bob_uid for e in h.log())


def test_default_socket_is_0600_owned_by_the_allowed_user(store, scratch, start_helper, users):
    sock = scratch / "helper.sock"
    start_helper(store, "--socket", str(sock), "--allow-user", support.DAEMON_USER, wait=str(sock))
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == pwd.getpwnam(support.DAEMON_USER).pw_uid
    assert run_client_as(support.DAEMON_USER, sock)["complete"]
    assert run_client_as(support.BOB, sock) == {"connect_error": 13}  # EACCES


def test_concurrent_connections(store, scratch, start_helper):
    sock = scratch / "helper.sock"
    start_helper(store, "--socket", str(sock), wait=str(sock))
    results = []

    def one():
        results.append(read_root_stream(sock))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    first = roots_of(results[0][0])
    for events, end, _ in results:
        assert end.complete
        assert roots_of(events) == first


def test_socket_activation_with_both_endpoints(store, scratch, start_helper):
    roots_sock, nix_sock = scratch / "roots.sock", scratch / "nix.sock"
    start_helper(store, cmd_prefix=["systemd-socket-activate", "-l", str(roots_sock), "-l",
                                    str(nix_sock), "--fdname=gcroots:nix-roots"])
    support.wait_for_socket(roots_sock)
    events, end, _ = read_root_stream(roots_sock)
    assert end.complete
    store_paths = {sp for _, sp in roots_of(events)}
    assert set(decode_nix_roots(read_all(nix_sock))) == store_paths


def read_all(path: Path, send: bytes = b"") -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    if send:
        s.sendall(send)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def test_nix_roots_daemon_endpoint(store, scratch, start_helper):
    sock, nix = scratch / "helper.sock", scratch / "nix.sock"
    start_helper(store, "--socket", str(sock), "--nix-roots-daemon-socket", str(nix), wait=str(nix))
    paths = decode_nix_roots(read_all(nix))
    assert paths == sorted(set(paths))
    events, end, _ = read_root_stream(sock)
    assert set(paths) == {sp for _, sp in roots_of(events)}
    # Static and indirect roots too, not only runtime ones.
    assert any(b"user-environment" in p for p in paths)


def test_scan_failure_fails_closed_on_both_endpoints(store, scratch, start_helper):
    nest(store, 2100)   # past PATH_MAX: Nix fails too
    sock, nix = scratch / "helper.sock", scratch / "nix.sock"
    h = start_helper(store, "--socket", str(sock), "--nix-roots-daemon-socket", str(nix),
                     wait=str(nix))
    events, end, _ = read_root_stream(sock)
    assert not end.complete
    assert "the helper reports the scan failed: path " in end.reason
    assert "longer than PATH_MAX" in end.reason
    # Nix's format cannot say "failed": we send a line Nix refuses to parse
    # as a store path, which makes its GC abort instead of under-counting.
    answer = read_all(nix)
    assert answer == serve.NIX_POISON
    assert not answer.startswith(b"/nix/store/")
    time.sleep(0.2)
    served = [(e["endpoint"], e["outcome"]) for e in h.log() if e.get("event") == "scan_served"]
    assert ("roots", "scan_failed") in served and ("nix-roots", "scan_failed") in served
    assert ("roots", "ok") not in served and ("nix-roots", "ok") not in served


def test_garbage_and_version_mismatch_from_peer(store, scratch, start_helper):
    sock = scratch / "helper.sock"
    h = start_helper(store, "--socket", str(sock), wait=str(sock))
    # Not our hello: the helper said its own hello, then closed; no records.
    events, end = _decode(read_all(sock, b"GET / HTTP/1.1\r\n\r\n"))
    assert not end.complete and not events[1:]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    rx = RootStreamReceiver(versions=(7, 9))
    s.sendall(rx.hello())
    with pytest.raises(VersionMismatch, match="we speak root-stream versions 7..9, the helper speaks 1..2"):
        while True:
            rx.receive_data(s.recv(4096))
            while (ev := rx.next_event()) is not NEED_DATA:
                assert not isinstance(ev, StreamEnd)
    s.close()
    time.sleep(0.3)
    errors = [e for e in h.log() if e.get("event") == "scan_served" and e["outcome"] == "peer_error"]
    # "GET " is not the length of a HELLO: refused from the first bytes
    assert any("not a root-stream HELLO (b'GET /'" in e["error"] for e in errors)
    assert any("version mismatch" in e["error"] for e in errors)


# -- in-process: streaming and back-pressure -----------------------------

class _ControlledScan:
    """A scan whose progress the test controls."""

    def __init__(self, first_then_block: threading.Event | None = None, endless: bool = False):
        self.gate = first_then_block
        self.endless = endless
        self.produced = 0

    def scan(self):
        sp = b"/nix/store/" + b"a" * 32 + b"-x"
        while True:
            self.produced += 1
            yield Root(RootKind.STATIC, b"/nix/var/nix/gcroots/r%d" % self.produced, sp)
            if self.gate is not None:
                assert self.gate.wait(30)
                return
            if not self.endless and self.produced >= 3:
                return


def _server_with(scan_obj) -> serve.HelperServer:
    srv = serve.HelperServer(StoreLayout.make(), frozenset(), [], runtime=False)
    srv._scanner = lambda: scan_obj
    return srv


def _handshake(peer: socket.socket) -> RootStreamReceiver:
    rx = RootStreamReceiver()
    peer.sendall(rx.hello())
    return rx


def test_first_root_reaches_peer_while_scan_is_still_running():
    gate = threading.Event()
    srv = _server_with(_ControlledScan(first_then_block=gate))
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    srv._dispatch(ours, serve.ROOTS)
    rx = _handshake(peer)
    got = []
    while not any(isinstance(e, Root) for e in got):
        rx.receive_data(peer.recv(4096))
        while (ev := rx.next_event()) is not NEED_DATA:
            got.append(ev)
    assert not gate.is_set(), "the root arrived only after the scan ended"
    gate.set()
    while not isinstance(got[-1], StreamEnd):
        data = peer.recv(4096)
        rx.receive_data(data)
        while (ev := rx.next_event()) is not NEED_DATA:
            got.append(ev)
            if isinstance(ev, StreamEnd):
                break
    assert got[-1].complete


def test_peer_that_stops_reading_cannot_grow_helper_memory(monkeypatch):
    monkeypatch.setattr(serve, "IO_TIMEOUT", 1.0)
    scan_obj = _ControlledScan(endless=True)
    srv = _server_with(scan_obj)
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    srv._dispatch(ours, serve.ROOTS)
    _handshake(peer)
    time.sleep(2.5)  # we never read: the helper's send must block, then give up
    produced = scan_obj.produced
    time.sleep(0.5)
    assert scan_obj.produced == produced, "the scan kept running against a stalled peer"
    frame = 4 + 1 + 1 + 4 + 28 + 4 + 45
    # What was produced fits in the socket buffers: the helper buffers nothing.
    assert produced * frame < 512 * 1024
    peer.close()


def _decode(data: bytes):
    rx = RootStreamReceiver()
    rx.receive_data(data)
    rx.receive_data(b"")
    events = []
    while not isinstance(ev := rx.next_event(), StreamEnd):
        events.append(ev)
    return events, ev


def test_peer_that_never_says_hello_is_dropped(monkeypatch):
    monkeypatch.setattr(serve, "HELLO_TIMEOUT", 0.5)
    scan_obj = _ControlledScan()
    srv = _server_with(scan_obj)
    ours, peer = socket.socketpair()
    srv._dispatch(ours, serve.ROOTS)
    peer.settimeout(5)
    data = b""
    while chunk := peer.recv(100):
        data += chunk
    events, end = _decode(data)  # our hello only, then closed: no scan ran
    assert len(events) == 1 and not end.complete and scan_obj.produced == 0


def test_bug_in_scan_is_an_error_trailer_not_a_complete_stream():
    class Broken:
        def scan(self):
            yield Root(RootKind.STATIC, b"/x", b"/nix/store/" + b"a" * 32 + b"-x")
            raise KeyError("oops")

    srv = _server_with(Broken())
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    srv._dispatch(ours, serve.ROOTS)
    rx = _handshake(peer)
    while True:
        data = peer.recv(65536)
        rx.receive_data(data)
        ev = None
        while (ev := rx.next_event()) is not NEED_DATA:
            if isinstance(ev, StreamEnd):
                break
        if isinstance(ev, StreamEnd):
            break
    assert not ev.complete and "internal error in the helper: KeyError('oops')" in ev.reason


def test_scan_error_in_process_gives_error_trailer():
    class Failing:
        def scan(self):
            raise ScanError("EIO on gcroots")
            yield  # pragma: no cover

    srv = _server_with(Failing())
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    srv._dispatch(ours, serve.ROOTS)
    rx = _handshake(peer)
    data = b""
    while chunk := peer.recv(65536):
        data += chunk
    rx.receive_data(data)
    rx.receive_data(b"")
    events = []
    while not isinstance(ev := rx.next_event(), StreamEnd):
        events.append(ev)
    assert not ev.complete and "EIO on gcroots" in ev.reason


def test_path_options_are_ignored_under_socket_activation(store, scratch, start_helper):
    """With systemd's socket, --socket naming the same path must not replace
    it (that would orphan systemd's listening socket)."""
    sock = scratch / "roots.sock"
    h = start_helper(store, "--socket", str(sock),
                     cmd_prefix=["systemd-socket-activate", "-l", str(sock),
                                 "--fdname=gcroots"])
    support.wait_for_socket(sock)
    inode = os.stat(sock).st_ino
    events, end, _ = read_root_stream(sock)  # activates the helper
    assert end.complete
    time.sleep(0.3)
    assert os.stat(sock).st_ino == inode
    assert read_root_stream(sock)[1].complete
    assert h.proc.poll() is None


# -- deadlines and idle peers ----------------------------------------------

def test_hello_trickled_in_is_cut_at_the_whole_hello_deadline(monkeypatch):
    """One byte every 0.5 s: each recv() is quick, the hello as a whole is
    not.  It is cut at the deadline, and no scan runs."""
    monkeypatch.setattr(serve, "HELLO_TIMEOUT", 2.0)
    scan_obj = _ControlledScan()
    srv = _server_with(scan_obj)
    ours, peer = socket.socketpair()
    srv._dispatch(ours, serve.ROOTS)
    hello = RootStreamReceiver().hello()
    assert len(hello) > 8
    t0 = time.monotonic()
    sent = 0
    try:
        for byte in hello:
            peer.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.5)
    except OSError:   # EPIPE/ECONNRESET: the helper gave up on us
        pass
    peer.settimeout(5)
    data = b""
    while chunk := peer.recv(100):
        data += chunk
    took = time.monotonic() - t0
    events, end = _decode(data)
    assert len(events) == 1 and not end.complete and scan_obj.produced == 0
    assert sent < len(hello) and 2.0 <= took < 3.5, (sent, took)


IDLE_CLIENTS = r"""
import socket, sys, time
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    conns.append(s)
print("ready", flush=True)
time.sleep(60)
"""


def test_idle_connections_of_the_allowed_user_cannot_starve_gcrootsd(scratch, users, pipelines):
    """16 connections that never say hello, from gcrootsd's own user (the
    only one allowed): gcrootsd's scans still get through, at once."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=23, roots=20, indirect=4, stale=0)
    p = support.Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    pw = pwd.getpwnam(support.DAEMON_USER)
    # Not through runuser: killing runuser would leave its child holding the user.
    idle = subprocess.Popen([sys.executable, "-c", IDLE_CLIENTS, str(p.helper_sock), "16"],
                            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                            stdout=subprocess.PIPE)
    try:
        assert idle.stdout.readline() == b"ready\n"
        t0 = time.monotonic()
        out = p.query("dead")
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - t0 < 3
    finally:
        idle.kill()
        idle.wait()


# -- starting and stopping --------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_helper_stops_in_one_line_and_removes_its_sockets(store, scratch, start_helper, sig):
    sock, nix = scratch / "helper.sock", scratch / "nix.sock"
    h = start_helper(store, "--socket", str(sock), "--nix-roots-daemon-socket", str(nix),
                     wait=str(nix))
    assert read_root_stream(sock)[1].complete
    h.proc.send_signal(sig)
    assert h.proc.wait(10) == 0
    text = h.log_path.read_text()
    assert "Traceback" not in text and "Error" not in text
    assert [e.get("signal") for e in h.log() if e["event"] == "helper_stopped"] == [sig.name]
    deadline = time.monotonic() + 5   # the sandboxed helper's socket remover
    while (sock.exists() or nix.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists() and not nix.exists()


def _remover_of(pid: int, timeout: float = 10) -> int:
    """The socket remover: the child of `pid` named gcroots-remover."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text() == "gcroots-remover\n":
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no socket remover among the children of {pid}")


def test_socket_remover_holds_no_privilege(store, scratch, start_helper):
    """The child that removes the sockets once the server is gone runs as
    uid 0 (root's directories) but with no capability in any set, no way
    to gain one and nothing open but a pidfd of the server.  It failed
    before: the remover kept all of root's capabilities (adversarial pass)."""
    sock = scratch / "helper.sock"
    h = start_helper(store, "--socket", str(sock), wait=str(sock))
    remover = _remover_of(_listening(h))   # (serving: the remover said it is confined)
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{remover}/status").read_text().splitlines())
    assert {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} \
        == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0), status
    assert status["NoNewPrivs"].strip() == "1"
    deadline = time.monotonic() + 5   # (it closes the rest right after saying so)
    while (fds := [os.readlink(f"/proc/{remover}/fd/{fd}") for fd in os.listdir(
            f"/proc/{remover}/fd")]) != ["anon_inode:[pidfd]"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fds == ["anon_inode:[pidfd]"]
    assert read_root_stream(sock)[1].complete   # the server is the process we started


CONFINED = r"""
import os, sys
from gcroots.helper import launch
print(launch._drop_privileges([os.fsencode(sys.argv[1])]).decode() or "dropped", flush=True)
for path in sys.argv[2:]:
    try:
        os.unlink(path)
        print("removed", flush=True)
    except OSError as e:
        print(os.strerror(e.errno), flush=True)
"""


def test_socket_remover_can_change_nothing_but_its_sockets_directory(scratch):
    """Confined as the remover confines itself (as root): a socket file in
    its directory can be removed, no file elsewhere -- not even one root
    owns with an owner's write bit in a directory root can write.  It
    failed before: the remover could remove anything (root's capabilities)."""
    ours, other = scratch / "ours", scratch / "other"
    for d in (ours, other):
        d.mkdir(mode=0o755)
        socket.socket(socket.AF_UNIX).bind(str(d / "s.sock"))
    (other / "file").write_bytes(b"x")
    out = subprocess.run([sys.executable, "-c", CONFINED, str(ours), str(other / "file"),
                          str(other / "s.sock"), str(ours / "s.sock")],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.split("\n")[:4] == ["dropped", "Permission denied", "Permission denied",
                                           "removed"], out
    assert (other / "file").exists() and (other / "s.sock").exists()
    assert not (ours / "s.sock").exists()


def test_sigterm_as_soon_as_the_socket_appears_stops_cleanly(store, scratch, start_helper):
    """SIGTERM the moment the socket exists (before serve's handlers could be
    in place): a clean stop (exit 0, one log line), the sockets removed.  It
    failed before: the helper died of the signal (-15) when it came early."""
    sock = scratch / "helper.sock"
    h = start_helper(store, "--socket", str(sock))
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert time.monotonic() < deadline and h.proc.poll() is None
        time.sleep(0.001)
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(10) == 0, h.log_path.read_text()
    assert "Traceback" not in h.log_path.read_text()
    assert [e.get("signal") for e in h.log() if e["event"] == "helper_stopped"] == ["SIGTERM"]
    _wait_gone(sock)


def _wait_gone(*paths: Path) -> None:
    deadline = time.monotonic() + 5   # the socket remover
    while any(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.exists() for p in paths), paths


def test_sigkill_of_the_server_still_removes_its_sockets(store, scratch, start_helper):
    """Regression guard: the remover waits on the server's pidfd, so a
    SIGKILL (no handler runs) leaves no socket behind either."""
    sock, nix = scratch / "helper.sock", scratch / "nix.sock"
    h = start_helper(store, "--socket", str(sock), "--nix-roots-daemon-socket", str(nix),
                     wait=str(nix))
    children = _children(_listening(h))   # its remover (--no-runtime: no /proc reader)
    assert children
    h.proc.kill()
    assert h.proc.wait(10) == -signal.SIGKILL
    _wait_gone(sock, nix)
    for child in children:
        _wait_exited(child)


def _listening(h: Helper) -> int:
    """Once `h` serves: its pid."""
    deadline = time.monotonic() + 20
    while not any(e["event"] == "helper_listening" for e in h.log()):
        assert time.monotonic() < deadline and h.proc.poll() is None
        time.sleep(0.05)
    return h.proc.pid


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_exited(pid: int) -> None:
    """Until `pid` is gone or a zombie (whoever reaps orphans here may not)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def test_remover_never_takes_the_live_socket_of_a_later_helper(store, scratch, start_helper):
    """Regression guard: the first helper's socket was moved away and a
    second helper serves at its path; when the first stops, its remover
    leaves the second one's live socket in place."""
    sock = scratch / "helper.sock"
    first = start_helper(store, "--socket", str(sock), wait=str(sock))
    children = _children(_listening(first))   # its remover (--no-runtime: no /proc reader)
    assert children
    os.rename(sock, scratch / "moved.sock")
    second = start_helper(store, "--socket", str(sock), wait=str(sock))
    inode = os.stat(sock).st_ino
    first.stop()
    assert first.proc.returncode == 0
    for child in children:
        _wait_exited(child)
    assert os.stat(sock).st_ino == inode and read_root_stream(sock)[1].complete
    assert second.proc.poll() is None


def test_remover_puts_back_a_later_helpers_socket_owned_by_its_allowed_user(
        store, scratch, start_helper):
    """As above, with the second helper's socket owned by the user it
    allows (--allow-uid: its owner, not root).  The capability-less remover
    takes it aside and must put it back: link() of someone else's socket
    needs CAP_FOWNER (fs.protected_hardlinks), so it is renamed back.  It
    failed before: the live socket was left at .helper.sock.gone.*."""
    sock = scratch / "helper.sock"
    first = start_helper(store, "--socket", str(sock), wait=str(sock))
    children = _children(_listening(first))
    assert children
    os.rename(sock, scratch / "moved.sock")
    second = start_helper(store, "--socket", str(sock), "--allow-uid", "4242", wait=str(sock))
    st = os.stat(sock)
    assert st.st_uid == 4242
    first.stop()
    assert first.proc.returncode == 0
    for child in children:
        _wait_exited(child)
    assert sorted(p.name for p in scratch.iterdir() if ".gone." in p.name) == []
    assert os.stat(sock).st_ino == st.st_ino
    assert second.proc.poll() is None


def test_second_helper_on_a_live_socket_refuses(store, scratch, start_helper):
    sock = scratch / "helper.sock"
    start_helper(store, "--socket", str(sock), wait=str(sock))
    inode = os.stat(sock).st_ino
    out = subprocess.run([HELPER, "serve", "--root", str(store), "--no-runtime", "--socket",
                          str(sock)], capture_output=True, timeout=30)
    assert out.returncode == 1 and out.stderr == (
        f"gcroots-helper serve: {sock} is served by a running process; refusing to take it over "
        "(stop that one first)\n").encode()
    assert os.stat(sock).st_ino == inode and read_root_stream(sock)[1].complete


def test_helper_as_a_plain_user_says_so_in_one_line(store, scratch, users):
    run = scratch / "alice-run"
    run.mkdir()
    os.chown(run, users[support.ALICE].pw_uid, -1)
    out = subprocess.run(["runuser", "-u", support.ALICE, "--", HELPER, "serve", "--root",
                          str(store), "--socket", str(run / "h.sock"), "--allow-user",
                          support.DAEMON_USER], capture_output=True, timeout=30)
    assert out.returncode == 1 and out.stdout == b"" and out.stderr.count(b"\n") == 1, out.stderr
    assert out.stderr.startswith(b"gcroots-helper serve: refusing to start: the helper (uid %d) "
                                 b"lacks CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE"
                                 % users[support.ALICE].pw_uid)
    assert not (run / "h.sock").exists()


def test_closed_log_pipe_stops_the_helper(store, scratch):
    """stderr to a pipe whose reader is gone (EPIPE): the next log line ends
    the helper as SIGTERM would, its socket removed, no traceback anywhere."""
    sock = scratch / "helper.sock"
    r, w = os.pipe()
    proc = subprocess.Popen([HELPER, "serve", "--root", str(store), "--no-runtime", "--socket",
                             str(sock)], stderr=w)
    os.close(w)
    support.wait_for_socket(sock, proc)
    os.close(r)
    try:
        read_root_stream(sock)   # the helper logs it, and stops
    except OSError:
        pass
    assert proc.wait(10) == 1
    deadline = time.monotonic() + 5
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists()


def test_the_same_path_for_both_sockets_refuses_and_leaves_no_socket(store, scratch):
    """The second bind fails; the first socket, made a moment before, goes
    too: nothing is left behind by a refused start."""
    sock = scratch / "both.sock"
    out = subprocess.run([HELPER, "serve", "--root", str(store), "--no-runtime", "--socket",
                          str(sock), "--nix-roots-daemon-socket", str(sock)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert not sock.exists() and sorted(os.listdir(scratch)) == ["store"], os.listdir(scratch)
