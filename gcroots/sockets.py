"""Unix sockets shared by the helper and the daemon: binding one safely,
taking sockets from systemd, asking the kernel who the peer is.
Standard library only (the helper imports it)."""

from __future__ import annotations

import os
import socket
import stat
import struct


def listen_unix(path: bytes, mode: int, owner_uid: int | None = None) -> socket.socket:
    """Bind a listening Unix socket at `path` with `mode` from the first
    instant (umask), replacing a stale socket but nothing else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{os.fsdecode(path)} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    os.makedirs(os.path.dirname(path) or b".", mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if owner_uid is not None:
        os.chown(path, owner_uid, -1)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


def listen_fds() -> list[tuple[socket.socket, str]]:
    """Sockets passed by systemd socket activation (LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES), with their names; the variables are then removed so
    that children do not take them for theirs."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = []
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError(f"socket-activated fd {fd} is not a Unix stream socket")
        out.append((sock, names[i] if i < len(names) else ""))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return out


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)
