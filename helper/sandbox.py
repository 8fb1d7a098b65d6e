"""The helper's kernel sandbox: after it, the privileged process can read
what a root scan needs and nothing else -- no writes, no network, no exec,
no new privileges -- enforced by the kernel, not by our good intentions.

`apply_for_serving()` runs once, after the listening sockets are open and
before any path is read, while the process still has a single thread (caps,
Landlock and the network namespace are per thread).  In `serve` the first
three layers, which survive execve, were applied by the launcher step before
its exec (helper/prepare.py, never loaded by the serving process), and are
verified here instead (prepared=...): the capability sets, no_new_privs,
and a network namespace that is not init's (or, where /proc/1 is out of
reach, our parent's) and holds only `lo`; and the launcher compiled the seccomp filters
(helper/seccomp_filters.py, never loaded here either), handed over in a
sealed memfd (handed_over): this process only installs them.  Layers,
in order; each
logs one `sandbox_layer` event saying whether it is active and, if not, why:

  netns         An empty network namespace: unshare(CLONE_NEWNET) when we may
                (root), else (systemd PrivateNetwork=yes, RestrictNamespaces=)
                the current one must already be empty.  Verified either way:
                nothing but `lo`, and that one down -- or up in a namespace
                that is not the host's (init's; where /proc/1 is out of
                reach, our parent's): systemd's PrivateNetwork= brings `lo`
                up in the unit's own namespace, where it reaches only the
                unit itself.  Stops: any network reachability.
  caps          effective = permitted = bounding = {CAP_DAC_READ_SEARCH,
                CAP_SYS_PTRACE}; inheritable and ambient empty; not dumpable
                (no core dumps of other users' environments, no ptrace by
                same-uid processes).  Stops: every other privilege of root.
  no_new_privs  PR_SET_NO_NEW_PRIVS: no setuid/file-caps gain, ever.
  landlock      Read-only, and only beneath what the scan reads: gcroots/ and
                profiles/ (directories only: their files are never opened),
                the DB dir (`scan` only), /proc, the directories the
                process's modules and shared objects were loaded from.
                Every FS right the running ABI knows is handled; TCP bind and
                connect are denied (ABI >= 4); abstract Unix sockets and
                signals are scoped (ABI >= 6).  stat/readlink/traversal are
                not restricted by Landlock, so links anywhere stay readable
                while file *contents* outside the list (homes, /etc/shadow)
                are not.  Stops: writes of any kind, exec, reading secrets.
  seccomp       An allow-list (below).  Stops: socket() of any family,
                execve, fork, mount, ptrace, bpf, module loading, namespaces,
                capset, chmod/chown, kill, W+X memory, ...  Default action
                ERRNO(EPERM), not KILL: the scan treats EPERM as fatal (it is
                never skipped), so a denied call fails a scan visibly, and
                sandbox-check can report each attempt.  A syscall of another
                architecture (or x32) kills the process: its number would
                mean something else.  Installed with prctl(PR_SET_SECCOMP),
                which systemd's @system-service allows (seccomp(2) it does not).
                The rules, and their compilation by libseccomp: see
                helper/seccomp_filters.py.

Under systemd: a SystemCallFilter= must allow landlock_create_ruleset,
landlock_add_rule and landlock_restrict_self (systemd 252 puts them in no
group but @known), and capset when AmbientCapabilities= is used (to empty
the inheritable set, and a non-root uid's ambient set carried over the
launcher's exec, which @system-service allows); RestrictAddressFamilies=AF_UNIX is fine (the netns
check then reads /proc/self/net/dev), RestrictNamespaces=yes too.

Why there is a second process.  Landlock denies ptrace-mode access to every
process outside the sandboxed one's domain.  Measured on Linux 6.18 with
the two capabilities: readlink of /proc/PID/{exe,cwd,fd/N} and reading
/proc/PID/{environ,maps} of other processes all fail with EACCES -- and Nix
skips EACCES, so a Landlocked scanner would silently lose runtime roots.
Before Landlock we therefore fork a */proc reader*: every layer but
Landlock, its own smaller seccomp filter (read-only opens, no sockets, no
threads, no exec), and one job: run scan.read_process() for "/proc/<digits>"
and send back the raw bytes of what mentions the store dir (a substring
test: fd targets under it, maps lines and environ entries holding it;
bounded, see scan.MAX_KEPT).  It checks each request itself, so even a
subverted scanner cannot make it read anything else, and it never parses
untrusted data beyond that (the Landlocked scanner does).  If it dies or misbehaves,
every later scan fails (EIO); none ever comes back smaller.

Degradation is explicit: a layer that cannot be applied is logged; with
`require` we refuse (SandboxError), without it the helper runs and logs a
loud `sandbox_incomplete` warning naming what is missing.  For tests, layers
can be switched off with `skip` (the CLI's `--sandbox-skip LAYER`); a
skipped layer counts as missing.

Foreign calls through cffi in precompiled ABI mode: the declarations live
in helper/ffi_build.py, which generated helper/_ffi.py; at run time only
cffi's `_cffi_backend` extension is loaded, nothing parses C (no pycparser
as root).  No callbacks, whose trampolines need W+X memory.  System call
numbers and the seccomp filter come from libseccomp (libseccomp.so.2, on
every systemd host), for whatever architecture it knows.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import signal
import socket
import struct
import sys
import threading
# Used under the sandbox: logging an exception formats a traceback (which
# reads sources beside the loaded modules: granted).
import traceback  # noqa: F401
from dataclasses import dataclass
from typing import Callable, Iterable

from gcroots.layout import StoreLayout
from gcroots.log import Logger
from gcroots.storepath import is_in_dir

from ._ffi import ffi
from .scan import Items, read_process   # the scanner runs under the sandbox: imported before

LAYERS = ("netns", "caps", "no_new_privs", "landlock", "seccomp")

# The Nix package writes libseccomp's absolute path here.
LIBSECCOMP = "libseccomp.so.2"
_libc = ffi.dlopen(None)
try:
    _seccomp = ffi.dlopen(LIBSECCOMP)
    NO_SYSCALLS = ""
except OSError as e:
    _seccomp, NO_SYSCALLS = None, f"cannot load {LIBSECCOMP} (install libseccomp2): {e}"
ARCH = os.uname().machine


class SandboxError(Exception):
    """The sandbox cannot be applied as required; do not serve."""


class _Missing(Exception):
    """A layer could not be applied (the message says why)."""


def syscall_number(name: str) -> int:
    """This architecture's number for the system call `name` (libseccomp's
    table; its negative pseudo-numbers stand for calls the arch lacks)."""
    nr = int(_seccomp.seccomp_syscall_resolve_name(name.encode())) if _seccomp else -1
    if nr < 0:
        raise OSError(errno.ENOSYS, f"{name}: {NO_SYSCALLS or 'no such system call on ' + ARCH}")
    return nr


def syscall(name: str, *args: object) -> int:
    """Raw syscall by name; ints are passed as longs, None as NULL, cdata
    (pointers, arrays) as they are.  Raises OSError on failure."""
    ret = int(_libc.syscall(syscall_number(name), *[
        ffi.cast("long", a) if isinstance(a, int) else ffi.NULL if a is None else a for a in args]))
    if ret == -1:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
    return ret


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- prctl / capabilities --------------------------------------------------------

PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_GET_NAME = 1, 3, 4, 16
PR_GET_SECCOMP, PR_SET_SECCOMP, PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_GET_SECUREBITS = 21, 22, 23, 24, 27
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 38, 39, 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
CAP_DAC_READ_SEARCH, CAP_SETPCAP, CAP_SYS_PTRACE = 2, 8, 19
KEEP_CAPS = (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE)   # 0x80004


def prctl(option: int, *args: object) -> int:
    return syscall("prctl", option, *args, *(0,) * (4 - len(args)))


def cap_sets() -> dict[str, int]:
    """This thread's capability sets as the kernel reports them -- Inh, Prm,
    Eff, Bnd and Amb (/proc's CapInh...), 64-bit masks: one read for all
    five, and no count of capabilities hard-coded."""
    status = _read(b"/proc/thread-self/status")
    return {k.decode(): int(v, 16) for k, v in re.findall(rb"^Cap(\w+):\s*([0-9a-f]+)$", status, re.M)}


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capabilities (capset(2), version 3: two 32-bit halves)."""
    sets = (effective, permitted, inheritable)
    data = ffi.new("struct cap_data[2]", [[s >> 32 * half & 0xFFFFFFFF for s in sets] for half in (0, 1)])
    syscall("capset", ffi.new("struct cap_header *", (0x20080522, 0)), data)


def lacking_caps() -> str:
    """Why this thread cannot scan for lack of privilege, or "": a scan
    without CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE in its effective set
    cannot see into 0700 homes or other users' processes, and would call
    their roots' paths garbage."""
    try:
        eff = cap_sets()["Eff"]
    except (OSError, KeyError) as e:   # no /proc: unknown means lacking (fail closed)
        return f"its capabilities cannot be read from /proc/thread-self/status ({e!r})"
    names = [n for n, c in (("CAP_DAC_READ_SEARCH", CAP_DAC_READ_SEARCH), ("CAP_SYS_PTRACE", CAP_SYS_PTRACE))
             if not eff >> c & 1]
    return "" if not names else (
        f"the helper (uid {os.geteuid()}) lacks {' and '.join(names)} in its effective capability "
        "set, so it cannot read roots in private homes and other users' processes; run it as root "
        "or with those capabilities (the systemd unit's AmbientCapabilities=)")


@dataclass
class Sandbox:
    missing: dict[str, str]                  # layer: why it is not active
    details: dict[str, dict[str, object]]    # an active layer's, as logged
    proc_reader: "ProcReader | None" = None   # for Scanner(proc_reader=...)


# -- layer: network namespace (applied before exec: helper/prepare.py) ----------------

_IFF_UP, _SIOCGIFFLAGS = 0x1, 0x8913


def network_links() -> list[tuple[str, bool]]:
    """(name, is_up) of every link in our network namespace:
    /proc/self/net/dev lists them, SIOCGIFFLAGS on a Unix socket tells
    whether one is up (no netlink: systemd's RestrictAddressFamilies=AF_UNIX
    refuses it, and a netlink library would be more code run as root)."""
    names = [line.split(b":", 1)[0].strip() for line in _read(b"/proc/self/net/dev").splitlines()[2:]]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return [(n.decode(), bool(struct.unpack_from("=H", fcntl.ioctl(
            s, _SIOCGIFFLAGS, struct.pack("16sH14x", n, 0)), 16)[0] & _IFF_UP)) for n in names]


def _ns_inode(pid: object, kind: str = "net") -> int | None:
    """The inode of a process's namespace of that kind (None: unknown)."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


# -- layer: Landlock -------------------------------------------------------------------

LANDLOCK_KNOWN_ABI, LL_READ_FILE, LL_READ_DIR = 7, 1 << 2, 1 << 3


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    try:
        return syscall("landlock_create_ruleset", None, 0, 1)   # LANDLOCK_CREATE_RULESET_VERSION
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def landlock_fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows: EXECUTE (bit 0) to
    MAKE_SYM (12) since ABI 1, REFER (13) since 2, TRUNCATE (14) since 3,
    IOCTL_DEV (15) since 5.  We grant only READ_FILE (2) and READ_DIR (3)."""
    return (2 << {1: 12, 2: 13, 3: 14, 4: 14}.get(abi, 15)) - 1


def loaded_code_dirs() -> list[bytes]:
    """The directories this process's code came from: that of every imported
    module's file, and of every shared object mapped executable
    (/proc/self/maps: libffi, libc, extension modules) -- but not the
    interpreter's own (it is never read again).  Each is needed after the
    sandbox only for what lives beside what is loaded: tracebacks read
    sources, and a module's siblings may still be imported.  Nothing else
    of the installation is granted: not its prefix (/usr for Debian's
    Python), nor sys.path entries nothing was loaded from (on NixOS the
    interpreter, each Python package and libffi sit in store paths of
    their own; only those in use are readable).  Outermost directories
    only: a rule covers everything beneath it.  Real paths: a rule holds
    beneath a directory, not beneath a link to it (a checkout's
    gcroots/protocol -> ../protocol)."""
    files = [os.path.realpath(os.fsencode(f)) for m in list(sys.modules.values())
             if isinstance(f := getattr(m, "__file__", None), str) and os.path.isabs(f)]
    exe = os.readlink(b"/proc/self/exe")
    # address perms(rwxp) offset dev inode path
    files += [f for f in re.findall(rb"^\S+ ..x. \S+ \S+ \S+ +(/.*)$", _read(b"/proc/self/maps"), re.M)
              if f != exe and not f.endswith(b" (deleted)")]
    dirs = {os.path.dirname(f) for f in files}
    return [d for d in sorted(dirs) if not any(is_in_dir(d, other) for other in dirs)]


def read_paths(layout: StoreLayout, *, read_db: bool) -> list[tuple[bytes, int]]:
    """What the helper may read, and how: directories of roots only listed
    (their files are never opened), /proc, and where its code came from.
    A missing root directory may be created later; a rule on the state dir
    lets us list it then instead of silently skipping it (EACCES is
    skippable).  Only what exists: a rule needs an fd."""
    out = [(d if os.path.isdir(d) else layout.real_state_dir, LL_READ_DIR)
           for d in (layout.gcroots_dir, layout.profiles_dir)]
    dirs = [os.path.dirname(layout.db_path)] * read_db + [b"/proc"] + loaded_code_dirs()
    # (Of a file, READ_FILE only: READ_DIR on a file is EINVAL.)
    return [(p, a & (LL_READ_FILE | LL_READ_DIR * os.path.isdir(p)))
            for p, a in out + [(d, LL_READ_FILE | LL_READ_DIR) for d in dirs] if os.path.exists(p)]


def landlock_restrict(abi: int, handled: int, rules: list[tuple[bytes, int]]) -> None:
    """Restrict this thread for the `handled` FS rights to `rules` (path,
    rights beneath it); TCP bind and connect (ABI >= 4) with no rule:
    denied; abstract Unix sockets and signals scoped (ABI >= 6)."""
    attr = ffi.new("struct landlock_ruleset_attr *", (handled, 3 * (abi >= 4), 3 * (abi >= 6)))
    ruleset = syscall("landlock_create_ruleset", attr, 8 + 8 * (abi >= 4) + 8 * (abi >= 6), 0)
    try:
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:   # LANDLOCK_RULE_PATH_BENEATH
                rule = ffi.new("struct landlock_path_beneath_attr *", (access, fd))
                syscall("landlock_add_rule", ruleset, 1, rule, 0)
            finally:
                os.close(fd)
        syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)


def _layer_landlock(layout: StoreLayout, read_db: bool) -> dict[str, object]:
    abi = min(landlock_abi(), LANDLOCK_KNOWN_ABI)
    if abi < 1:
        raise _Missing("Landlock is not available in this kernel (ENOSYS/EOPNOTSUPP)")
    rules = read_paths(layout, read_db=read_db)
    if any(os.path.realpath(path) == b"/" for path, _ in rules):
        raise _Missing("refusing a Landlock rule on / (it would allow reading everything)")
    landlock_restrict(abi, landlock_fs_rights(abi), rules)   # every FS right handled
    granted = [os.fsdecode(path) + (" (dir)" if access == LL_READ_DIR else "") for path, access in rules]
    # Self-check: a secret outside the rules must be unreadable now.
    try:
        os.close(os.open(b"/etc/shadow", os.O_RDONLY | os.O_CLOEXEC))
        raise _Missing("self-check: /etc/shadow is still readable")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.ENOENT):
            raise _Missing(f"self-check: /etc/shadow: unexpected {e!r}") from None
    return {"abi": abi, "read": granted}


# -- layer: seccomp ----------------------------------------------------------------------
# The filters are helper/seccomp_filters.py's, compiled by libseccomp: for
# `serve` by its launcher before the exec, handed over in a sealed memfd.

# (main, /proc reader's) classic BPF programs, 8 bytes an instruction; or
# why there are none.
Programs = tuple[bytes, bytes]
_F_GET_SEALS, _SEALED, BPF_MAXINSNS = 1034, 0xF, 4096   # every seal: no write, shrink, grow, new seal


MAX_VIEW = 1 << 16   # the view checks' verdict, bytes


def handed_over(fd_text: str) -> tuple[Programs | str, str]:
    """What the launcher handed over (launch._hand_over) in the sealed
    memfd at `fd_text`, which is closed: the seccomp programs (or why there
    are none), and the view checks' verdict -- why every scan must fail, or
    "".  Without a sealed memfd of the right shape that verdict is unknown,
    which fails every scan (fail closed: nothing in the environment alone
    can say the view is fine).  An fd that is not sealed is left alone (it
    is not the launcher's)."""
    try:
        if (fd := int(fd_text or -1)) < 3 or fcntl.fcntl(fd, _F_GET_SEALS) & _SEALED != _SEALED:
            raise OSError(errno.EBADF, "not a sealed memfd")
        data = os.pread(fd, 12 + 16 * BPF_MAXINSNS + MAX_VIEW + 1, 0)
        os.close(fd)
    except (OSError, ValueError, OverflowError) as e:   # (a number past a C int)
        why = f"nothing sealed handed over by the launcher (fd {fd_text or 'none'}: {e})"
        return why, f"the view checks' verdict is unknown: {why}"
    main, reader, view = struct.unpack_from("=III", data) if len(data) >= 12 else (0, 0, MAX_VIEW + 1)
    if not (main <= BPF_MAXINSNS and reader <= BPF_MAXINSNS and view <= MAX_VIEW
            and len(data) == 12 + 8 * (main + reader) + view and (main > 0) == (reader > 0)):
        why = f"what the launcher handed over is malformed ({len(data)} bytes)"
        return why, f"the view checks' verdict is unknown: {why}"
    verdict = data[len(data) - view:].decode(errors="replace") if view else ""
    if not main:
        return "not compiled by the launcher (skipped, or its log says why)", verdict
    return (data[12:12 + 8 * main], data[12 + 8 * main:len(data) - view]), verdict


def install_filter(prog: bytes) -> None:
    # (No TSYNC needed: we are single-threaded, checked first.)
    code = ffi.from_buffer(prog)   # (kept alive until the call returns)
    prctl(PR_SET_SECCOMP, 2, ffi.new("struct sock_fprog *", (len(prog) // 8, code)))  # SECCOMP_MODE_FILTER


def _layer_seccomp(programs: Programs | str, reader: ProcReader | None) -> dict[str, object]:
    if isinstance(programs, str):
        raise _Missing(programs)
    install_filter(prog := programs[0])
    if prctl(PR_GET_SECCOMP) != 2:
        raise _Missing("PR_GET_SECCOMP does not report filter mode")
    if reader is not None and reader.seccomp != "ok":
        raise _Missing(f"the /proc reader has no filter: {reader.seccomp}")
    return {"arch": ARCH, "instructions": len(prog) // 8, "default": "EPERM"}


# -- the /proc reader -----------------------------------------------------------------------

# A request: b"c" (cmdline too) or b"-", then "/proc/PID", one line.
_REQUEST = re.compile(rb"([c-])(/proc/[1-9][0-9]{0,9})\n")
# An answer holds at most four items of scan.MAX_KEPT (fd targets, maps,
# environ, cmdline) and two links: well below this, and below the 4 GiB the
# "=I" length can say.  Checked anyway, on both sides.
MAX_ANSWER = 160 << 20
# An item: this header, its name, its data.  The code is 0 (data: its
# length follows), an errno (none), or _SAME_AS (the data of the item whose
# index follows).
_ITEM, _SAME_AS = struct.Struct("=HiI"), -1


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("=I", len(payload)))
    sock.sendall(payload)   # not concatenated: no second copy of a big answer


def _encode_items(items: Items) -> bytes:
    """Each target once: a process may hold half a million fds on one long
    store path, and every fd/N label is kept (Nix prints them all), so a
    repeated value is sent as a reference to its first item."""
    parts, first = [], dict[bytes, int]()
    for i, (name, value) in enumerate(items):
        if isinstance(value, OSError):
            head, value = (value.errno or errno.EIO, 0), b""
        elif (k := first.setdefault(value, i)) != i:
            head, value = (_SAME_AS, k), b""
        else:
            head = (0, len(value))
        parts += [_ITEM.pack(len(name), *head), name, value]
    return b"".join(parts)


def _decode_items(payload: bytes, pid_dir: bytes, last: bytes) -> Items:
    """read_process's answer; it ends with `last` (environ, or cmdline if
    asked), or with the fd error that cut it short: anything else, an empty
    answer above all, is not its answer and must never pass for "no roots"."""
    pos, items = 0, Items()
    while pos < len(payload):
        size, code, length = _ITEM.unpack_from(payload, pos)
        name, pos = payload[pos + _ITEM.size:pos + _ITEM.size + size], pos + _ITEM.size + size
        value: bytes | OSError
        if not code:
            value, pos = payload[pos:pos + length], pos + length
        elif code != _SAME_AS:
            value = OSError(code, os.strerror(code), pid_dir + b"/" + name)
        elif length >= len(items) or isinstance(value := items[length][1], OSError):
            raise OSError(errno.EPROTO, "malformed answer: a reference forward, or to an error")
        items.append((name, value))
    if pos != len(payload) or not items or items[-1][0] not in (b"fd", last):
        raise OSError(errno.EPROTO, "malformed answer (or not a whole process's)")
    return items


class ProcReader:
    """Client side of the /proc reader (see the module docstring): runs
    scan.read_process() in the reader process, for the store dir it was
    started with.  Thread safe; any failure breaks it for good (a late
    answer must never pass for the next one), and every later call fails
    with EIO, so scans fail instead of shrinking."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid, self._answers = sock, pid, sock.makefile("rb")
        self._lock, self._broken = threading.Lock(), ""
        self.seccomp = self._answer().decode(errors="replace")   # its own filter: "ok", "skipped" or why not

    @classmethod
    def start(cls, program: bytes | str | None, store_dir: bytes) -> ProcReader:
        """`program`: its seccomp filter; or why there is none; None: skipped."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        # (No flush of sys.stdout/stderr first: the child never flushes them,
        # it writes with os.write and leaves with os._exit.)
        if (pid := os.fork()) == 0:  # pragma: no cover - runs in the child
            code = 1
            try:   # (_reader_main closes `ours`, and every other fd but `theirs`)
                code = _reader_main(theirs, parent, program, store_dir)
            except BaseException as e:
                os.write(2, f"gcroots-helper: /proc reader: {e!r}\n".encode())
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(60.0)
        return cls(ours, pid)

    def _answer(self) -> bytes:
        (size,) = struct.unpack("=I", self._answers.read(4))
        if size > MAX_ANSWER:
            raise OSError(errno.EMSGSIZE, f"a {size}-byte answer, over the {MAX_ANSWER}-byte limit")
        if len(data := self._answers.read(size)) != size:
            raise OSError(errno.EPIPE, "the reader closed the connection")
        return data

    def __call__(self, pid_dir: bytes, cmdline: bool = False) -> Items:
        with self._lock:
            if self._broken:
                raise OSError(errno.EIO, f"the /proc reader is gone: {self._broken}")
            if b"\n" in pid_dir:   # would be two requests, and two answers: one left for the next call
                raise OSError(errno.EINVAL, f"not a /proc/PID directory: {pid_dir!r}")
            try:
                self.sock.sendall((b"c" if cmdline else b"-") + pid_dir + b"\n")
                return _decode_items(self._answer(), pid_dir, b"cmdline" if cmdline else b"environ")
            except (OSError, struct.error) as e:
                self._broken = str(e) or type(e).__name__
                raise OSError(errno.EIO, f"the /proc reader failed: {self._broken}") from None


def _reader_main(sock: socket.socket, parent: int, program: bytes | str | None,
                 store_dir: bytes) -> int:  # pragma: no cover
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:        # the parent died before PDEATHSIG was set
        return 0
    # Nothing of the parent's: no listening sockets, no stdin/stdout.
    for low, high in ((0, 2), (3, sock.fileno()), (sock.fileno() + 1, 1 << 20)):
        os.closerange(low, high)
    prctl(PR_SET_DUMPABLE, 0)
    status = b"skipped" if program is None else program.encode() if isinstance(program, str) else b"ok"
    if isinstance(program, bytes):
        try:
            install_filter(program)
        except OSError as e:  # reported: the seccomp layer then counts as missing
            status = str(e).encode()
    _send_frame(sock, status)
    requests = sock.makefile("rb")
    while request := requests.readline(64):   # b"": the helper is done
        # Only ever /proc/PID: whatever the (possibly subverted) scanner
        # asks, this process reads nothing else.
        if not (m := _REQUEST.fullmatch(request)):
            raise SystemExit("refusing a malformed request")
        answer = _encode_items(read_process(m[2], m[1] == b"c", store_dir))
        if len(answer) > MAX_ANSWER:   # cannot happen (see MAX_ANSWER); fail this scan, not us
            answer = _encode_items([(b"fd", OSError(errno.EMSGSIZE, "answer too big"))])
        _send_frame(sock, answer)
    return 0


def _selftest(reader: ProcReader | None) -> None:
    """The runtime scan must still see into other processes: ask the
    reader for everything it would read of ours."""
    if reader is None or not cap_sets()["Eff"] >> CAP_SYS_PTRACE & 1:
        return  # unprivileged: other processes are closed to us anyway (the scan warns)
    items = dict(reader(b"/proc/%d" % os.getpid()))
    for name in (b"exe", b"cwd", b"maps", b"environ"):
        # exe and cwd are left out (not errors) when they are not in the store.
        if isinstance(items.get(name), OSError) or (name not in items and name in (b"maps", b"environ")):
            raise OSError(errno.EACCES, f"/proc/{os.getpid()}/{os.fsdecode(name)}: {items.get(name)!r}")


# -- putting it together -------------------------------------------------------------------

def _why_missing(name: str, e: Exception) -> str:
    if isinstance(e, _Missing):
        return str(e)
    e = e if isinstance(e, OSError) else OSError(errno.EIO, repr(e))
    nnp = e.errno in (errno.EPERM, errno.EACCES) and name in ("landlock", "seccomp") \
        and not prctl(PR_GET_NO_NEW_PRIVS)
    return f"{e.strerror or e} ({_errname(e)})" + ": the kernel requires no_new_privs first" * nnp


def _verified(name: str) -> dict[str, object]:
    """A layer the launcher applied before exec (helper/prepare.py), as
    this process finds it: checked here, so that nothing in the environment
    can claim one.  What execve set again is undone first: dumpable, and a
    non-root uid's capabilities, which only ambient ones carried over."""
    if name == "caps":
        prctl(PR_SET_DUMPABLE, 0)
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        if (have := cap_sets())["Inh"]:
            capset(have["Eff"], have["Prm"], 0)
        if (have := cap_sets()) != {**have, "Eff": KEEP_CAPS, "Prm": KEEP_CAPS, "Inh": 0, "Amb": 0} \
                or have["Bnd"] & ~KEEP_CAPS:
            raise _Missing("not in place after exec: " + " ".join(f"{k}={v:#x}" for k, v in have.items()))
    elif name == "no_new_privs" and prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise _Missing("not in place after exec: no_new_privs is not set")
    elif name == "netns" and (None in (host := _ns_inode(1) or _ns_inode(os.getppid()), me := _ns_inode("self"))
                              or host == me or network_links() not in ([("lo", False)], [("lo", True)])):
        raise _Missing("not in place after exec: the network namespace is the host's, unknown or has links")
    return {"how": "before exec, verified"}


def _apply(box: Sandbox, name: str, apply: Callable[[], dict[str, object]], skip: Iterable[str],
           log: Logger) -> None:
    try:
        if name in skip:
            raise _Missing("skipped on request (--sandbox-skip)")
        box.details[name] = apply()
    except Exception as e:  # noqa: BLE001 - whatever it is, the layer is missing
        box.missing[name] = _why_missing(name, e)
        log.warning("sandbox_layer", layer=name, active=False, reason=box.missing[name])
    else:
        log.info("sandbox_layer", layer=name, active=True, **box.details[name])


def refuse_unless_complete(box: Sandbox, log: Logger) -> None:
    if box.missing:
        log.error("sandbox_required_but_incomplete", missing=box.missing)
        raise SandboxError("refusing to run without the full sandbox (--require-sandbox); "
                           "missing: " + "; ".join(f"{n}: {r}" for n, r in box.missing.items()))


def apply_for_serving(layout: StoreLayout, *, require: bool, log: Logger, skip: Iterable[str] = (),
                      runtime: bool = True, read_db: bool = False,
                      prepared: Programs | str | None = None) -> Sandbox:
    """Apply every layer (see the module docstring); return what is active.

    `runtime`: start the /proc reader (runtime roots need it under
    Landlock) before Landlock.  `read_db`: also allow reading the Nix DB
    (the `scan` CLI).  `prepared`: netns, caps and no_new_privs were
    applied before exec (helper/prepare.py), so verify them instead, and
    these are the seccomp programs compiled there (handed_over: or why
    there are none); None: apply and compile everything here.  Raises
    SandboxError if `require` and a layer is missing, or if the sandbox
    would break the scan (that is never a mere degradation)."""
    skip = frozenset(skip)   # (known layers: the CLI's --sandbox-skip checks them)
    if len(os.listdir(b"/proc/self/task")) != 1:
        raise SandboxError("the sandbox must be applied before any thread starts "
                           "(capabilities, Landlock and namespaces are per thread)")
    box = Sandbox({}, {})
    before: dict[str, Callable[[], dict[str, object]]] = {
        n: functools.partial(_verified, n) for n in LAYERS[:3]}
    if prepared is None:   # (`scan --sandbox`, sandbox-check)
        from . import prepare, seccomp_filters
        before, prepared = prepare.LAYERS, seccomp_filters.compiled(os.getpid())
    for name, apply in before.items():
        _apply(box, name, apply, skip, log)
    if runtime:
        try:
            box.proc_reader = ProcReader.start(None if "seccomp" in skip else prepared if isinstance(
                prepared, str) else prepared[1], layout.store_dir)
        except OSError as e:
            raise SandboxError(f"cannot start the /proc reader: {e}") from None
        log.info("proc_reader_started", pid=box.proc_reader.pid)
    _apply(box, "landlock", lambda: _layer_landlock(layout, read_db), skip, log)
    _apply(box, "seccomp", lambda: _layer_seccomp(prepared, box.proc_reader), skip, log)
    try:
        _selftest(box.proc_reader)
    except OSError as e:
        raise SandboxError(f"sandbox self-test failed, the runtime scan would be incomplete: {e}") from None
    if require:
        refuse_unless_complete(box, log)
    if not box.missing:
        log.info("sandbox_applied", layers=list(LAYERS))
    else:
        log.warning("sandbox_incomplete", missing=box.missing,
                    message="RUNNING WITH A WEAKER SANDBOX: " + ", ".join(box.missing))
    return box
