"""Sockets handed to us (systemd socket activation, or gcroots-helper's own
launcher, helper/launch.py) and who is at the other end of a connection.
Kept apart from gcroots/sockets.py (binding sockets safely), which the
serving helper never loads.  Standard library only (the helper imports it)."""

from __future__ import annotations

import os
import socket


def listen_fds() -> list[tuple[socket.socket, str]]:
    """Sockets passed by socket activation (LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES), with their names; the variables are then removed (as
    sd_listen_fds does) so that children do not take them for theirs."""
    pid, count, names = (os.environ.pop(v, "") for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    socks = [socket.socket(fileno=fd) for fd in range(3, 3 + int(count or 0))] if pid == str(os.getpid()) else []
    for sock in socks:
        sock.set_inheritable(False)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError(f"socket-activated fd {sock.fileno()} is not a Unix stream socket")
    return list(zip(socks, names.split(":") + [""] * len(socks)))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED: three C ints)."""
    pid, uid, gid = memoryview(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)).cast("i")
    return pid, uid, gid
