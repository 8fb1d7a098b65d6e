"""`gcroots-helper serve`'s launcher step: bind the sockets (unless systemd
handed them over), prepare, then become the serving helper.

The serving process takes its listening sockets ready-made, by the systemd
socket-activation convention (gcroots/activation.py): from systemd, or from
this launcher.  So the code that binds, renames and removes socket files
(gcroots/sockets.py) and the layers applied before the exec
(helper/prepare.py) are never loaded in the process that runs as root for
the machine's whole uptime.  Every `serve` not yet prepared (cli.PREPARED
naming its pid) runs launch(), which

 1. blocks SIGINT and SIGTERM (the mask and a pending signal survive exec;
    the serve path unblocks them once its handlers are in place: a signal
    in between stops it cleanly, it never kills it half-way),
 2. refuses at once if the process lacks the two capabilities,
 3. unless systemd handed sockets over: binds each socket
    (sockets.listen_unix: its mode and owner from the start, no path
    tricks, never a live socket taken over) and forks the *socket remover*
    (below),
 4. applies what survives execve (prepare.before_exec: the fd limit, the
    view checks, the network namespace, the capability drop,
    no_new_privs), refusing with --require-sandbox if one is missing,
    closes every fd but stdio and the sockets, and writes the seccomp
    filters it compiles (helper/seccomp_filters.py) and the view checks'
    verdict into a sealed memfd that the exec keeps open,
 5. execs the very same command line in place -- the same pid, so a
    supervisor still sees the process it started -- with the sockets at
    fds 3, 4 and LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES ("gcroots",
    "nix-roots") saying so, and cli.PREPARED set to this pid and the
    memfd's number (the memfd holds the filters and the view checks'
    verdict: _hand_over).  The serving process verifies every layer itself,
    and installs the filters (it never compiles one).

The socket remover exists because the sandboxed server cannot unlink
anything.  Before it waits, it drops every capability (effective,
permitted, inheritable, ambient, and the bounding set), sets no_new_privs,
makes itself not dumpable, confines itself with Landlock (where the kernel
has it) to removing files and putting a socket back beneath the sockets'
directories, and closes every fd but a pidfd of the serving process.  When
that process is gone, however it went (SIGKILL included), it removes each
socket file that is still the one we bound (SocketFile.remove puts back
one that is not).  It keeps uid 0, without which it could not unlink in
root's directories; as uid 0 without capabilities it could still write
what root owns with an owner's write bit but for Landlock (lacking on
kernels before 5.13) -- and it reads no input at all: it only waits on
the pidfd.  If it cannot drop its privileges it exits at once (the
launcher logs `socket_remover_failed`), and the socket files are left
behind: a dead socket is replaced by the next start.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import select
import signal
import stat
import struct
import sys
from typing import NoReturn

from gcroots import log, sockets

from . import prepare, sandbox, seccomp_filters
from .cli import PREPARED
from .sandbox import SandboxError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}   # serve's handlers: gcroots.process.stop_on_signals
REMOVER_NAME = b"gcroots-remover"   # its /proc/PID/comm (15 bytes at most)
LL_REMOVE_FILE, LL_MAKE_SOCK = 1 << 5, 1 << 9   # Landlock rights (a socket renamed or linked: MAKE_SOCK)


def launch(args: argparse.Namespace, uids: frozenset[int], scanned: tuple[bytes, ...]) -> NoReturn:
    """Bind the sockets unless systemd handed them over (and fork the
    remover), prepare (helper/prepare.py), exec serve."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if why := sandbox.lacking_caps():   # every scan would fail: say so now, in one line
        raise SystemExit(f"gcroots-helper serve: refusing to start: {why}")
    count = os.environ.get("LISTEN_FDS", "0") if os.environ.get("LISTEN_PID") == str(os.getpid()) else "0"
    # ASCII digits ("²" is a digit to str.isdigit, not to int), each fd a
    # socket (else the memfd could take a free one among them): the serving
    # process would serve nothing, or fail with a traceback.
    if not (count.isascii() and count.isdigit() and len(count) < 6 and all(map(_is_socket, range(3, 3 + int(count))))):
        raise SystemExit(f"gcroots-helper serve: LISTEN_FDS={count!r}: not a number of sockets")
    if int(count) == 0:
        _bind([(name, os.fsencode(path)) for name, path in (("gcroots", args.socket),
               ("nix-roots", args.nix_roots_daemon_socket)) if path],
              args.socket_mode, min(uids, default=None))
    try:
        view = prepare.before_exec(require=args.require_sandbox, skip=args.sandbox_skip,
                                   runtime=not args.no_runtime, log=log.get("gcroots.helper.sandbox"),
                                   scanned=scanned)
    except SandboxError as e:   # (the remover removes the sockets as we exit)
        raise SystemExit(f"gcroots-helper serve: {e}") from None
    if not sys.executable:
        raise SystemExit("gcroots-helper serve: cannot tell which interpreter to exec")
    # Nothing our parent left open goes over the exec but stdin, stdout,
    # stderr and the sockets (Landlock does not confine an fd opened before
    # it) -- and what we hand over, opened after this.
    os.closerange(3 + int(os.environ["LISTEN_FDS"]), os.sysconf("SC_OPEN_MAX"))   # (ours, or checked above)
    fd = _hand_over(None if "seccomp" in args.sandbox_skip else seccomp_filters.compiled(os.getpid()),
                    view, 3 + int(os.environ["LISTEN_FDS"]))   # (the same pid after the exec)
    os.environ[PREPARED] = f"{os.getpid()}:{fd}"
    # The command line as it was run (interpreter options, the script or -m):
    # the serve path takes over from there, finding the sockets.
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as e:   # the remover removes the sockets as we exit
        raise SystemExit(f"gcroots-helper serve: cannot exec {sys.executable}: {e}") from None


# Every seal: no write, shrink, grow or new seal (sandbox.handed_over checks).
F_ADD_SEALS, SEALS = 1033, 0x1 | 0x2 | 0x4 | 0x8


def _hand_over(programs: sandbox.Programs | str | None, view: str, above: int) -> str:
    """What the serving process takes over from us, in an inheritable
    memfd sealed so that no one holding it can change it: the lengths
    ("=III": the main and the /proc reader's seccomp program in
    instructions, 0 and 0 if none; the view checks' verdict in bytes), then
    each.  Its fd number, at least `above` (past the sockets; never 0-2,
    which a parent may have left closed and the serving process does not
    take for ours), or "" (logged): the serving process then finds the
    seccomp layer missing and fails every scan."""
    log_ = log.get("gcroots.helper.sandbox")
    if isinstance(programs, str):
        log_.error("seccomp_not_compiled", reason=programs, consequence="the seccomp layer is missing")
    progs = programs if isinstance(programs, tuple) else (b"", b"")
    verdict = view.encode(errors="surrogateescape")[:sandbox.MAX_VIEW]   # (paths from os.fsdecode)
    data = struct.pack("=III", len(progs[0]) // 8, len(progs[1]) // 8, len(verdict)) + b"".join(progs) + verdict
    fd = -1
    try:
        fd = os.memfd_create("gcroots-handover", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, "short write to the memfd")
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
        return str(fcntl.fcntl(fd, fcntl.F_DUPFD, above))   # (F_DUPFD: inheritable)
    except OSError as e:
        log_.error("hand_over_failed", reason=str(e),
                   consequence="the seccomp layer is missing, and every scan fails")
        return ""
    finally:
        if fd >= 0:
            os.close(fd)


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _bind(paths: list[tuple[str, bytes]], mode: int, owner_uid: int | None) -> None:
    """Bind `paths` ((its LISTEN_FDNAMES name, path)) at fds 3, 4 and say
    so in LISTEN_*; fork the remover."""
    if not paths:
        raise SystemExit("gcroots-helper serve: no socket (give --socket PATH or use socket activation)")
    made: list[tuple[str, int, sockets.SocketFile]] = []
    for name, path in paths:
        try:
            sock, file = sockets.listen_unix(path, mode, owner_uid)
        except OSError as e:   # (the other, made a moment ago, goes too)
            for *_, f in made:
                f.remove()
            raise SystemExit(f"gcroots-helper serve: {e}") from None
        made.append((name, sock.detach(), file))
    try:
        _start_remover([f for *_, f in made])
    except OSError as e:   # e.g. no pidfd_open (Linux < 5.3)
        for *_, f in made:
            f.remove()
        raise SystemExit(f"gcroots-helper serve: cannot start the socket remover: {e}") from None
    # At 3, 4 (dup'd above them first, so that none is overwritten).
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(made)) for _, fd, _ in made]
    for _, fd, _ in made:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)   # inheritable
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(made)),
                      LISTEN_FDNAMES=":".join(name for name, *_ in made))


def _start_remover(files: list[sockets.SocketFile]) -> None:
    """Fork the remover; return once it has dropped its privileges (or
    failed to, which is logged)."""
    pidfd = os.pidfd_open(os.getpid())
    r, w = os.pipe()
    if pid := os.fork():
        os.close(pidfd)
        os.close(w)
        said = os.read(r, 4096)
        os.close(r)
        if said != b"ok":
            os.waitpid(pid, 0)
            log.get("gcroots.helper").warning("socket_remover_failed", reason=said.decode(
                errors="replace") or "it died", consequence="the socket files stay when we stop")
        return
    try:
        os.close(r)
        why = _drop_privileges(sorted({os.path.dirname(f.path) for f in files}))
        os.write(w, why or b"ok")
        if why:
            return
        os.chdir(b"/")
        # Nothing of the server's stays open here.  (Not closerange(0, 0),
        # with stdin closed: CPython makes that close_range(0, ~0), the pidfd too.)
        os.closerange(pidfd + 1, os.sysconf("SC_OPEN_MAX"))
        if pidfd:
            os.closerange(0, pidfd)
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        while not poll.poll():   # readable once the serving process has exited
            pass
        for f in files:
            f.remove()
    finally:
        os._exit(0)


def _drop_privileges(dirs: list[bytes]) -> bytes:
    """Every capability, no_new_privs, not dumpable, and (Landlock, where
    the kernel has it) no change to any file but removing one or putting a
    socket back beneath `dirs`; why not, or b""."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})   # (a terminal's are for the server)
    try:
        with open(b"/proc/self/comm", "wb") as f:
            f.write(REMOVER_NAME)
        prepare.drop_bounding_set(0)
        sandbox.prctl(sandbox.PR_CAP_AMBIENT, sandbox.PR_CAP_AMBIENT_CLEAR_ALL)
        sandbox.capset(0, 0, 0)
        sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
        sandbox.prctl(sandbox.PR_SET_DUMPABLE, 0)
        if (abi := min(sandbox.landlock_abi(), sandbox.LANDLOCK_KNOWN_ABI)) >= 1:
            # Reading is not restricted: SocketFile.remove opens each
            # directory on the way from / (it reads nothing else).
            sandbox.landlock_restrict(abi, sandbox.landlock_fs_rights(abi) & ~(
                sandbox.LL_READ_FILE | sandbox.LL_READ_DIR), [(d, LL_REMOVE_FILE | LL_MAKE_SOCK) for d in dirs])
        # Without CAP_SETPCAP the bounding set stays, which gives nothing
        # back: it only limits what an exec could gain, and we never exec
        # (no_new_privs: no exec could gain anything).
        left = {k: v for k, v in sandbox.cap_sets().items() if v and k != "Bnd"}
        if left or sandbox.prctl(sandbox.PR_GET_NO_NEW_PRIVS) != 1:
            return f"capabilities left: {left}".encode()
    except OSError as e:
        return f"cannot drop its privileges: {e}".encode()
    return b""
