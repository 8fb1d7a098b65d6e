"""gcroots-helper serve: answer each accepted connection with one full scan.

Synchronous on purpose (no trio in the privileged process): one thread per
connection, a bounded number of them.  Every connection is checked with
SO_PEERCRED first; a peer that is not root or an allowed uid is closed
without a single byte sent.  Each record leaves as it is found, in one
send (about a microsecond each: nothing to gain from batching them); a
peer that stops reading blocks that send until IO_TIMEOUT and is dropped,
so it stalls the scan and can never make us buffer anything.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from typing import Any, Iterator

from gcroots import log
from gcroots.layout import StoreLayout
from gcroots.protocol.framing import ProtocolError
from gcroots.protocol.nixcompat import encode_nix_roots
from gcroots.protocol.rootstream import (NEED_DATA, Record, Root, RootStreamSender, ScanWarning,
                                         StaleLink)
from gcroots.activation import peer_credentials

from .scan import ScanError, Scanner

IO_TIMEOUT = 30.0        # per send/recv on a peer
HELLO_TIMEOUT = 10.0     # for the whole hello, however slowly it trickles in
# Connections of one uid still waiting for their hello: beyond this the
# oldest is dropped, so idle ones cannot take the slots gcrootsd's scans need.
MAX_IDLE_PER_UID = 4
MAX_CONNECTIONS = 16
# Nix's roots-daemon format has no way to say "failed".  Its client runs
# parseStorePath on every NUL-terminated line, so a line that is not a store
# path makes Nix's GC abort instead of collecting with too few roots.
NIX_POISON = b"gcroots-helper: root scan failed, refusing to answer (see the helper's log)\0"

ROOTS, NIX = "roots", "nix-roots"
_COUNTED = {Root: "roots", StaleLink: "stale", ScanWarning: "warnings"}   # scan_served's fields
_log = log.get("gcroots.helper")


class HelperServer:
    """`listeners`: (socket, ROOTS or NIX, its path for the log -- not
    getsockname's, which says where it was bound privately); `scan` holds
    Scanner's options (runtime, cmdline, the sandbox's proc_reader and
    preflight, accept_unreadable)."""

    def __init__(self, layout: StoreLayout, allowed_uids: frozenset[int],
                 listeners: list[tuple[socket.socket, str, bytes]], **scan: Any) -> None:
        self.layout, self.allowed_uids, self.listeners = layout, allowed_uids, listeners
        self.scan_options = scan
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._idle: dict[socket.socket, int] = {}   # connection -> uid until its hello, oldest first
        self._idle_lock = threading.Lock()

    def _waiting(self, conn: socket.socket, uid: int | None = None) -> None:
        """`conn` waits for its hello (uid given) or no longer does."""
        with self._idle_lock:
            if uid is None:
                self._idle.pop(conn, None)
                return
            if len(mine := [c for c, u in self._idle.items() if u == uid]) >= MAX_IDLE_PER_UID:
                _log.warning("idle_peer_dropped", peer_uid=uid, max_idle=MAX_IDLE_PER_UID)
                del self._idle[mine[0]]
                mine[0].shutdown(socket.SHUT_RDWR)  # its recv() sees EOF
            self._idle[conn] = uid

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        for sock, kind, _ in self.listeners:
            sel.register(sock, selectors.EVENT_READ, (sock, kind))
        _log.info("helper_listening", sockets=[(path, kind) for _, kind, path in self.listeners],
                  allowed_uids=sorted(self.allowed_uids))
        while True:
            for key, _ in sel.select():
                sock, kind = key.data
                try:
                    conn, _ = sock.accept()
                except OSError as e:
                    _log.warning("accept_failed", error=str(e))
                    continue
                self._dispatch(conn, kind)

    def _dispatch(self, conn: socket.socket, kind: str) -> None:
        pid, uid, _ = peer_credentials(conn)
        if uid != 0 and uid not in self.allowed_uids:
            _log.warning("peer_refused", peer_uid=uid, peer_pid=pid, endpoint=kind)
        elif not self._slots.acquire(blocking=False):
            _log.warning("peer_refused_busy", peer_uid=uid, peer_pid=pid,
                         max_connections=MAX_CONNECTIONS)
        else:
            if kind == ROOTS:
                self._waiting(conn, uid)
            threading.Thread(target=self._handle, args=(conn, kind, pid, uid), daemon=True,
                             name=f"peer-{pid}").start()
            return
        conn.close()

    def _handle(self, conn: socket.socket, kind: str, pid: int, uid: int) -> None:
        t0 = time.monotonic()
        stats = dict.fromkeys(_COUNTED.values(), 0)
        try:
            conn.settimeout(IO_TIMEOUT)
            outcome, error = (self._serve_nix if kind == NIX else self._serve_roots)(conn, stats)
        except (OSError, ProtocolError) as e:
            outcome, error = "peer_error", str(e) or type(e).__name__
        finally:
            self._waiting(conn)
            conn.close()
            self._slots.release()
        _log.info("scan_served", endpoint=kind, peer_uid=uid, peer_pid=pid, outcome=outcome,
                  error=error or None, duration_ms=round((time.monotonic() - t0) * 1000, 1),
                  **stats)

    def _scanner(self) -> Scanner:
        # The operator's choice, said at every scan.
        if prefixes := self.scan_options.get("accept_unreadable"):
            _log.warning("unreadable_accepted", prefixes=list(prefixes),
                         consequence="EACCES there is skipped: roots behind it may be missed")
        return Scanner(self.layout, **self.scan_options)

    def _records(self, stats: dict[str, int]) -> Iterator[Record]:
        """The scan's records, counted in `stats`."""
        for rec in self._scanner().scan():
            stats[_COUNTED[type(rec)]] += 1
            yield rec

    def _serve_roots(self, conn: socket.socket, stats: dict[str, int]) -> tuple[str, str]:
        sender = RootStreamSender()
        # State our versions first, so that on a mismatch the daemon can
        # name both sides'.
        conn.sendall(sender.hello())
        deadline = time.monotonic() + HELLO_TIMEOUT
        while sender.next_event() is NEED_DATA:
            if (left := deadline - time.monotonic()) <= 0:
                raise TimeoutError(f"no hello within {HELLO_TIMEOUT:g} s")
            conn.settimeout(left)
            sender.receive_data(conn.recv(4096))
        self._waiting(conn)
        conn.settimeout(IO_TIMEOUT)
        ok, message = True, ""
        try:
            for rec in self._records(stats):
                conn.sendall(sender.send(rec))
        except ScanError as e:
            ok, message = False, str(e)
        except (OSError, ProtocolError):
            raise  # the peer went away or misbehaved: no trailer to send
        except Exception as e:  # a bug must not look like a complete scan
            ok, message = False, f"internal error in the helper: {e!r}"
        conn.sendall(sender.trailer(ok, message))
        conn.shutdown(socket.SHUT_WR)
        return ("ok", "") if ok else ("scan_failed", message)

    def _serve_nix(self, conn: socket.socket, stats: dict[str, int]) -> tuple[str, str]:
        try:  # collect first, answer after: the format cannot express "incomplete"
            paths = {rec.store_path for rec in self._records(stats) if isinstance(rec, Root)}
        except Exception as e:
            conn.sendall(NIX_POISON)
            return "scan_failed", str(e)
        conn.sendall(encode_nix_roots(sorted(paths)))
        conn.shutdown(socket.SHUT_WR)
        return "ok", ""
