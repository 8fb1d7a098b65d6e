"""The helper's kernel sandbox: after it, the privileged process can read
what a root scan needs and nothing else -- no writes, no network, no exec,
no new privileges -- enforced by the kernel, not by our good intentions.

`apply_for_serving()` runs once, after the listening sockets are open and
before any path is read, while the process still has a single thread (caps,
Landlock and the network namespace are per thread).  Layers, in order; each
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

Under systemd: a SystemCallFilter= must allow landlock_create_ruleset,
landlock_add_rule and landlock_restrict_self (systemd 252 puts them in no
group but @known), and capset when AmbientCapabilities= is used (to empty
the inheritable set); RestrictAddressFamilies=AF_UNIX is fine (the netns
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

cffi ABI mode only (no compiler; no ffi.callback, whose trampolines need
W+X memory).  Syscall numbers for x86_64 and aarch64 are below; any other
architecture gets no syscall-based layer (and says so).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import mmap
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import cffi

from gcroots.layout import StoreLayout
from gcroots.storepath import is_in_dir

LAYERS = ("netns", "caps", "no_new_privs", "landlock", "seccomp")

_ffi = cffi.FFI()
_ffi.cdef("""
long syscall(long number, ...);
struct gcr_cap_header { uint32_t version; int pid; };
struct gcr_cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };
struct gcr_sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
struct gcr_sock_fprog { unsigned short len; struct gcr_sock_filter *filter; };
struct gcr_ruleset_attr { uint64_t handled_access_fs; uint64_t handled_access_net; uint64_t scoped; };
""")
# The kernel's landlock_path_beneath_attr is packed (12 bytes, not 16).
_ffi.cdef("struct gcr_path_beneath_attr { uint64_t allowed_access; int32_t parent_fd; };",
          packed=True)
_libc = _ffi.dlopen(None)

# -- syscall numbers -----------------------------------------------------------
# (x86_64, aarch64); None where the arch has no such call.  Checked against
# the kernel headers by tests/test_sandbox.py.
_SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66),
    "pread64": (17, 67), "close": (3, 57), "fstat": (5, 80), "newfstatat": (262, 79),
    "statx": (332, 291), "lstat": (6, None), "stat": (4, None), "lseek": (8, 62),
    "getdents64": (217, 61), "readlink": (89, None), "readlinkat": (267, 78),
    "access": (21, None), "faccessat": (269, 48), "faccessat2": (439, 439),
    "getcwd": (79, 17), "brk": (12, 214), "munmap": (11, 215), "mremap": (25, 216),
    "madvise": (28, 233), "futex": (202, 98), "set_robust_list": (273, 99),
    "rseq": (334, 293), "set_tid_address": (218, 96), "exit": (60, 93),
    "exit_group": (231, 94), "gettid": (186, 178), "getpid": (39, 172),
    "getppid": (110, 173), "getuid": (102, 174), "geteuid": (107, 175),
    "getgid": (104, 176), "getegid": (108, 177), "getresuid": (118, 148),
    "getresgid": (120, 150), "getgroups": (115, 158), "rt_sigaction": (13, 134),
    "rt_sigprocmask": (14, 135), "rt_sigreturn": (15, 139), "sigaltstack": (131, 132),
    "sched_yield": (24, 124), "sched_getaffinity": (204, 123), "nanosleep": (35, 101),
    "clock_nanosleep": (230, 115), "clock_gettime": (228, 113), "clock_getres": (229, 114),
    "gettimeofday": (96, 169), "time": (201, None), "getrandom": (318, 278),
    "poll": (7, None), "ppoll": (271, 73), "select": (23, None), "pselect6": (270, 72),
    "epoll_create1": (291, 20), "epoll_ctl": (233, 21), "epoll_wait": (232, None),
    "epoll_pwait": (281, 22), "epoll_pwait2": (441, 441), "accept4": (288, 242),
    "accept": (43, 202), "recvfrom": (45, 207), "sendto": (44, 206),
    "shutdown": (48, 210), "getsockopt": (55, 209), "getsockname": (51, 204),
    "getpeername": (52, 205), "uname": (63, 160), "sysinfo": (99, 179),
    "capget": (125, 90), "restart_syscall": (219, 128), "dup": (32, 23),
    "dup2": (33, None), "dup3": (292, 24), "getrlimit": (97, 163), "getcpu": (309, 168),
    "openat": (257, 56), "open": (2, None), "fcntl": (72, 25), "ioctl": (16, 29),
    "mmap": (9, 222), "mprotect": (10, 226), "pkey_mprotect": (329, 288),
    "clone": (56, 220), "clone3": (435, 435), "tgkill": (234, 131),
    "prlimit64": (302, 261), "prctl": (157, 167),
    # Used for set-up and by sandbox-check; never allowed after set-up.
    "capset": (126, 91), "ptrace": (101, 117), "unshare": (272, 97),
    "landlock_create_ruleset": (444, 444),
    "landlock_add_rule": (445, 445), "landlock_restrict_self": (446, 446),
}
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column, AUDIT_ARCH_*
ARCH = os.uname().machine
_col, AUDIT_ARCH = _ARCHES.get(ARCH, (None, None))
_NR = {} if _col is None else {n: v[_col] for n, v in _SYSCALLS.items() if v[_col] is not None}


class SandboxError(Exception):
    """The sandbox cannot be applied as required; do not serve."""


def _arg(value) -> object:
    return value if isinstance(value, _ffi.CData) else _ffi.cast("long", value)


def syscall(name: str, *args) -> int:
    """Raw syscall by name; raises OSError on failure."""
    nr = _NR.get(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number for {ARCH}")
    ret = _libc.syscall(_ffi.cast("long", nr), *[_arg(a) for a in args])
    if ret == -1:
        e = _ffi.errno
        raise OSError(e, os.strerror(e))
    return ret


# -- prctl / capabilities --------------------------------------------------------

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_GET_DUMPABLE = 1, 4, 3
PR_GET_NAME, PR_GET_SECCOMP, PR_SET_SECCOMP = 16, 21, 22
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_GET_SECUREBITS = 23, 24, 27
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 1, 2, 4

CAP_DAC_READ_SEARCH, CAP_SETPCAP, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 2, 8, 19, 21
KEEP_CAPS = (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE)   # 0x80004
_CAP_V3 = 0x20080522


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return syscall("prctl", option, a2, a3, a4, a5)


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, as 64-bit masks."""
    hdr = _ffi.new("struct gcr_cap_header *", {"version": _CAP_V3, "pid": 0})
    data = _ffi.new("struct gcr_cap_data[2]")
    syscall("capget", hdr, data)
    return tuple((getattr(data[1], f) << 32) | getattr(data[0], f)
                 for f in ("effective", "permitted", "inheritable"))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _ffi.new("struct gcr_cap_header *", {"version": _CAP_V3, "pid": 0})
    data = _ffi.new("struct gcr_cap_data[2]")
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    syscall("capset", hdr, data)


def _capability_mask(*prctl_args: int) -> int:
    """The set of capabilities for which prctl(*prctl_args, cap) is true,
    as a bit mask (the kernel's count of capabilities is not hard-coded)."""
    mask = 0
    for cap in range(64):
        try:
            if prctl(*prctl_args, cap):
                mask |= 1 << cap
        except OSError as e:
            if e.errno == errno.EINVAL:   # past the kernel's last capability
                break
            raise
    return mask


def _bounding_set() -> int:
    return _capability_mask(PR_CAPBSET_READ)


def _ambient_set() -> int:
    return _capability_mask(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET)


# -- results ---------------------------------------------------------------------

@dataclass
class LayerResult:
    name: str
    active: bool
    reason: str = ""
    details: dict = field(default_factory=dict)


class _Missing(Exception):
    """A layer could not be applied (the message says why)."""


@dataclass
class Sandbox:
    layers: list[LayerResult]
    proc_reader: "ProcReader | None" = None   # for Scanner(proc_reader=...)

    @property
    def missing(self) -> list[LayerResult]:
        return [r for r in self.layers if not r.active]


# -- layer: network namespace ------------------------------------------------------

CLONE_NEWNET = 0x40000000
_IFF_UP = 0x1
_SIOCGIFFLAGS = 0x8913


def _links_pyroute2() -> list[tuple[str, bool]]:
    from pyroute2 import IPRoute  # late: heavy, and only needed here
    with IPRoute() as ipr:
        return [(str(link.get_attr("IFLA_IFNAME")), bool(link["flags"] & _IFF_UP))
                for link in ipr.get_links()]


def _links_procfs() -> list[tuple[str, bool]]:
    """Fallback where netlink sockets are refused (systemd
    RestrictAddressFamilies=AF_UNIX): /proc/self/net/dev lists the links of
    our namespace, SIOCGIFFLAGS on a Unix socket tells whether one is up."""
    with open("/proc/self/net/dev", "rb") as f:
        names = [line.split(b":", 1)[0].strip().decode() for line in f.read().splitlines()[2:]]
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        import fcntl
        for name in names:
            req = struct.pack("16sH14x", name.encode(), 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
            out.append((name, bool(flags & _IFF_UP)))
    return out


def network_links() -> list[tuple[str, bool]]:
    """(name, is_up) of every link in our network namespace."""
    try:
        return _links_pyroute2()
    except OSError as e:
        if e.errno not in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT):
            raise
    # pyroute2 leaves its asyncio loop behind in a reference cycle: collect it
    # now, while its fds are ours.  Otherwise a later collection in the /proc
    # reader (which closes every inherited fd) prints a traceback to stderr.
    import gc
    gc.collect()
    return _links_procfs()


def _netns_not_the_hosts() -> bool:
    """Is our network namespace another than the host's, i.e. init's (PID 1's;
    systemd made one for the unit: PrivateNetwork=)?  Where /proc/1 is out of
    reach, our parent's namespace stands for the host's.  Unknown counts as
    no."""
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False
    for pid in (1, os.getppid()):
        if pid <= 0:
            continue
        try:
            return ours != os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
    return False


def _layer_netns() -> dict:
    try:
        syscall("unshare", CLONE_NEWNET)
        how = "unshared"
    except OSError as e:
        # Without CAP_SYS_ADMIN, or RestrictNamespaces=: the namespace must
        # already be empty (PrivateNetwork=yes).
        how = f"inherited (unshare: {errno.errorcode.get(e.errno, e.errno)})"
    links = network_links()
    if links == [("lo", False)]:
        return {"how": how, "links": "lo(down)"}
    if links == [("lo", True)] and _netns_not_the_hosts():
        # systemd's PrivateNetwork=: a namespace of the unit's own, lo up.
        return {"how": how, "links": "lo(up), not the host's namespace"}
    shown = ", ".join(f"{n}({'up' if up else 'down'})" for n, up in links) or "none"
    raise _Missing(f"network namespace {how} has links other than lo (down, or up in a "
                   f"namespace not the host's): {shown}; run as root or with "
                   "PrivateNetwork=yes")


# -- the view of the file system ------------------------------------------------------

# Where users' links (`nix-build -o /tmp/x`, `result` in a home) live: any
# view of these other than init's hides them (PrivateTmp=, ProtectHome=yes).
WATCHED_DIRS = (b"/home", b"/root", b"/run/user", b"/tmp", b"/var/tmp")


def _mounts(mountinfo: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(mount point, device, root within the device, fs type), in mount order;
    mountinfo escapes space, tab, newline and backslash as \\ooo."""
    def unescape(field: bytes) -> bytes:
        return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
    out = []
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(b" - ")
        f = head.split()
        if len(f) >= 5 and tail:
            out.append((unescape(f[4]), f[2], unescape(f[3]), tail.split()[0]))
    return out


def _backing(mounts: list, path: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(device, directory on that device, fs type) that `path` shows: the
    longest mount point above it, the topmost (last) mount there."""
    best = None
    for point, dev, root, fstype in mounts:
        if path == point or path.startswith(point.rstrip(b"/") + b"/"):
            if best is None or len(point) >= len(best[0]):
                rest = path[len(point.rstrip(b"/")):]
                best = (point, (dev, (root.rstrip(b"/") + rest) or b"/", fstype))
    return None if best is None else best[1]


def hidden_dirs(proc: bytes = b"/proc") -> list[bytes]:
    """Directories that this process sees differently from init (PID 1):
    the WATCHED_DIRS in any way (a private /tmp is as bad as an empty one),
    and wherever we have a fresh tmpfs/ramfs that init does not -- except
    systemd's PrivateDevices= /dev and its credentials, which hold no user's
    links.  Links in them would all look stale and their paths garbage, so a
    helper that cannot see them must not scan.  A read-only view of the same
    directory is fine.  When it cannot tell (PID 1's mounts unreadable),
    it assumes the worst: all WATCHED_DIRS.  Checked once at start: under Landlock /proc/1 is closed to us.
    Lives here, not in scan.py, because like the netns check it judges the
    confinement we were started in."""
    try:
        with open(proc + b"/self/mountinfo", "rb") as f:
            ours = _mounts(f.read())
        with open(proc + b"/1/mountinfo", "rb") as f:
            init = _mounts(f.read())
    except OSError:
        return sorted(WATCHED_DIRS)  # fail closed: scans refuse, saying which dirs
    fresh = {p for p, _, root, fs in ours if root == b"/" and fs in (b"tmpfs", b"ramfs")
             and p != b"/dev" and not (p + b"/").startswith(b"/run/credentials/")}
    # ... and init's own mounts below them (a home on its own file system,
    # a user's /run/user/UID), which a private view may lack.
    below = {p for p, *_ in init if any(is_in_dir(p, w) for w in WATCHED_DIRS)}
    return sorted(p for p in {*WATCHED_DIRS, *fresh, *below}
                  if _backing(ours, p) != _backing(init, p))


# -- layer: capabilities --------------------------------------------------------------

def _layer_caps() -> dict:
    eff, prm, _ = capget()
    bounding = _bounding_set()
    extra = bounding & ~KEEP_CAPS
    if extra and prm >> CAP_SETPCAP & 1:
        # PR_CAPBSET_DROP needs CAP_SETPCAP, so this comes before capset.
        capset(eff | 1 << CAP_SETPCAP, prm, 0)
        for cap in range(64):
            if extra >> cap & 1:
                prctl(PR_CAPBSET_DROP, cap)
    # Whatever happened above, drop everything else we hold (fail closed).
    # Only the calls needed: a unit whose SystemCallFilter= forbids capset
    # (~@privileged) still works when systemd already set the caps exactly.
    if _ambient_set():
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    keep = prm & KEEP_CAPS
    if capget() != (keep, keep, 0):
        capset(keep, keep, 0)
    # Core dumps would hold other users' environments; and a non-dumpable
    # process cannot be ptraced by same-uid processes without CAP_SYS_PTRACE.
    prctl(PR_SET_DUMPABLE, 0)
    eff, prm, inh = capget()
    bounding = _bounding_set()
    ambient = _ambient_set()
    if bounding & ~KEEP_CAPS:
        raise _Missing(f"bounding set {bounding:#x} holds more than {KEEP_CAPS:#x} and "
                       "without CAP_SETPCAP we cannot drop it; start with a reduced bounding "
                       "set (systemd CapabilityBoundingSet=, setpriv --bounding-set)")
    if (eff, prm, inh, ambient) != (keep, keep, 0, 0):
        raise _Missing(f"capabilities not as set: eff={eff:#x} prm={prm:#x} inh={inh:#x} "
                       f"amb={ambient:#x}")
    if keep != KEEP_CAPS:   # we hold less, not more: but every scan would fail
        raise _Missing(lacking_caps())
    return {"effective": f"{eff:#x}", "bounding": f"{bounding:#x}"}


def lacking_caps() -> str:
    """Why this thread cannot scan for lack of privilege, or "": a scan
    without CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE in its effective set
    cannot see into 0700 homes or other users' processes, and would call
    their roots' paths garbage."""
    lacking = KEEP_CAPS & ~capget()[0]
    if not lacking:
        return ""
    names = [n for n, c in (("CAP_DAC_READ_SEARCH", CAP_DAC_READ_SEARCH),
                            ("CAP_SYS_PTRACE", CAP_SYS_PTRACE)) if lacking >> c & 1]
    return (f"the helper (uid {os.geteuid()}) lacks {' and '.join(names)} in its effective "
            "capability set, so it cannot read roots in private homes and other users' "
            "processes; run it as root or with those capabilities (the systemd unit's "
            "AmbientCapabilities=)")


# The initial user namespace's inode number (the kernel's PROC_USER_INIT_INO).
INITIAL_USER_NS = 0xEFFFFFFD


def in_user_namespace() -> bool:
    """Whether we run in a user namespace other than the initial one
    (systemd PrivateUsers=yes, unshare --user): capget() then shows
    capabilities that reach only that namespace's files and processes."""
    try:
        return os.stat("/proc/self/ns/user").st_ino != INITIAL_USER_NS
    except OSError:
        return True   # cannot tell: assume the worst


def preflight(hidden: Sequence[bytes], *, caps: bool = True,
              runtime: bool = True) -> Callable[[], str]:
    """Scanner(preflight=...): why every scan must fail before it starts,
    or "".  `hidden` from hidden_dirs() (taken before the sandbox closes
    /proc/1); capabilities checked at each scan.  In a user namespace the
    runtime scan cannot work: other users' processes are EACCES, which
    (as Nix does) skips them, or invisible (hidepid); a file is EACCES,
    which fails the scan, so a scan without runtime roots is still sound."""
    userns = caps and runtime and in_user_namespace()

    def check() -> str:
        why = [lacking_caps()] if caps else []
        if userns:
            why.append("the helper runs in a user namespace (e.g. systemd PrivateUsers=yes, "
                       "unshare --user): its CAP_SYS_PTRACE does not reach other users' "
                       "processes, whose runtime roots it would miss; run it in the initial "
                       "user namespace (or without runtime roots: --no-runtime)")
        if hidden:
            why.append("directories are hidden from the helper ("
                       f"{', '.join(map(os.fsdecode, hidden))}: a mount over them that init "
                       "does not have, e.g. systemd PrivateTmp=yes, ProtectHome=yes or a tmpfs); "
                       "links in them would look stale and their paths garbage. Use "
                       "ProtectHome=read-only, no PrivateTmp=")
        return "; ".join(w for w in why if w)
    return check


def _layer_nnp() -> dict:
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise _Missing("PR_GET_NO_NEW_PRIVS does not report 1")
    return {}


# -- layer: Landlock -------------------------------------------------------------------

LANDLOCK_KNOWN_ABI = 7
LL_READ_FILE, LL_READ_DIR = 1 << 2, 1 << 3
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1 << 0, 1 << 1
LL_SCOPE_ABSTRACT_UNIX, LL_SCOPE_SIGNAL = 1 << 0, 1 << 1
_LL_RULE_PATH_BENEATH, _LL_CREATE_RULESET_VERSION = 1, 1 << 0


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    try:
        return syscall("landlock_create_ruleset", _ffi.NULL, 0, _LL_CREATE_RULESET_VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def landlock_fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows: EXECUTE (bit 0) to
    MAKE_SYM (12) since ABI 1, REFER (13) since 2, TRUNCATE (14) since 3,
    IOCTL_DEV (15) since 5.  We grant only READ_FILE (2) and READ_DIR (3)."""
    last = {1: 12, 2: 13, 3: 14, 4: 14}.get(abi, 15)
    return (1 << (last + 1)) - 1


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
    only: a rule covers everything beneath it."""
    dirs = set()
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if isinstance(f, str) and os.path.isabs(f):
            dirs.add(os.path.dirname(os.fsencode(f)))
    exe = os.readlink(b"/proc/self/exe")
    with open(b"/proc/self/maps", "rb") as f:
        for line in f.read().splitlines():
            fields = line.split(maxsplit=5)   # address perms offset dev inode path
            if len(fields) == 6 and b"x" in fields[1] and fields[5].startswith(b"/") \
                    and fields[5] != exe and not fields[5].endswith(b" (deleted)"):
                dirs.add(os.path.dirname(fields[5]))
    return [d for d in sorted(dirs) if not any(is_in_dir(d, other) for other in dirs)]


def read_paths(layout: StoreLayout, *, read_db: bool) -> list[tuple[bytes, int]]:
    """What the helper may read, and how: directories of roots only listed
    (their files are never opened), /proc, and where its code came from."""
    rw = LL_READ_FILE | LL_READ_DIR
    out: list[tuple[bytes, int]] = []
    for d in (layout.gcroots_dir, layout.profiles_dir):
        # A missing one may be created later; a rule on the state dir lets us
        # list it then instead of silently skipping it (EACCES is skippable).
        out.append((d if os.path.isdir(d) else layout.real_state_dir, LL_READ_DIR))
    if read_db:
        out.append((os.path.dirname(layout.db_path), rw))
    out.append((b"/proc", rw))
    out += [(d, rw) for d in loaded_code_dirs()]
    return out


# Imported before restrict_self whatever the caller imported so far: the
# scanner runs under the sandbox, and logging an exception formats a
# traceback (which reads sources beside the loaded modules: granted).
_USED_UNDER_SANDBOX = ("gcroots.helper.scan", "traceback", "linecache")


def _layer_landlock(layout: StoreLayout, read_db: bool) -> dict:
    for name in _USED_UNDER_SANDBOX:
        importlib.import_module(name)
    abi = landlock_abi()
    if abi < 1:
        raise _Missing("Landlock is not available in this kernel (ENOSYS/EOPNOTSUPP)")
    abi = min(abi, LANDLOCK_KNOWN_ABI)
    attr = _ffi.new("struct gcr_ruleset_attr *")
    attr.handled_access_fs = landlock_fs_rights(abi)
    size = 8
    if abi >= 4:
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP  # and no net rule
        size = 16
    if abi >= 6:
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL
        size = 24
    rules = read_paths(layout, read_db=read_db)
    ruleset = syscall("landlock_create_ruleset", attr, size, 0)
    granted = []
    try:
        for path, access in rules:
            if os.path.realpath(path) == b"/":
                raise _Missing("refusing a Landlock rule on / (it would allow reading everything)")
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= LL_READ_FILE   # READ_DIR on a file is EINVAL
                rule = _ffi.new("struct gcr_path_beneath_attr *",
                                {"allowed_access": access, "parent_fd": fd})
                syscall("landlock_add_rule", ruleset, _LL_RULE_PATH_BENEATH, rule, 0)
            finally:
                os.close(fd)
            granted.append(os.fsdecode(path) + (" (dir)" if access == LL_READ_DIR else ""))
        syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)
    # Self-check: a secret outside the rules must be unreadable now.
    try:
        os.close(os.open(b"/etc/shadow", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.ENOENT):
            raise _Missing(f"self-check: /etc/shadow: unexpected {e!r}") from None
    else:
        raise _Missing("self-check: /etc/shadow is still readable")
    return {"abi": abi, "read": granted}


# -- layer: seccomp ----------------------------------------------------------------------

SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
_SECCOMP_MODE_FILTER = 2
_LD_ABS, _JEQ, _JGE, _JSET, _AND, _RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
ALLOW, EPERM = SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno.EPERM
_X32_SYSCALL_BIT = 0x40000000

CLONE_THREAD = 0x10000
# Namespace flags; CLONE_THREAD excludes most of them already, but say it.
# (CLONE_NEWTIME only exists for clone3: in clone's low byte is the exit signal.)
CLONE_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000
PROT_WRITE, PROT_EXEC = 0x2, 0x4
OPEN_WRITE = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
              | (getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY))
FCNTL_OK = (0, 1, 2, 3, 4, 5, 6, 7, 36, 37, 38, 1030)   # dup/fd flags/fl flags/locks
IOCTL_OK = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)  # TCGETS TIOCGWINSZ FIONREAD FIONBIO FION/CLEX
PRCTL_OK = (PR_GET_DUMPABLE, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ, PR_GET_SECUREBITS,
            PR_GET_NO_NEW_PRIVS)


def _ld(off):
    return (_LD_ABS, 0, 0, off)


def _ret(action):
    return (_RET, 0, 0, action)


def _arg_lo(i):
    return 16 + 8 * i      # seccomp_data.args[i], low word (little-endian)


def _allow_unless_bits(arg, mask):
    return [_ld(_arg_lo(arg)), (_JSET, 0, 1, mask), _ret(EPERM), _ret(ALLOW)]


def _allow_if_in(arg, values):
    out = [_ld(_arg_lo(arg))]
    for v in values:
        out += [(_JEQ, 0, 1, v), _ret(ALLOW)]
    return out + [_ret(EPERM)]


def _allow_if_null(arg):
    return [_ld(_arg_lo(arg)), (_JEQ, 0, 3, 0), _ld(_arg_lo(arg) + 4), (_JEQ, 0, 1, 0),
            _ret(ALLOW), _ret(EPERM)]


_ALWAYS = ("read", "write", "readv", "writev", "pread64", "close", "fstat", "newfstatat", "statx",
           "lstat", "stat", "lseek", "getdents64", "readlink", "readlinkat", "access",
           "faccessat", "faccessat2", "getcwd", "brk", "munmap", "madvise", "futex",
           "set_robust_list", "rseq", "set_tid_address", "exit", "exit_group", "gettid",
           "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
           "getresgid", "getgroups", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
           "sigaltstack", "sched_yield", "sched_getaffinity", "nanosleep", "clock_nanosleep",
           "clock_gettime", "clock_getres", "gettimeofday", "time", "getrandom", "poll",
           "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait",
           "epoll_pwait", "epoll_pwait2", "accept4", "accept", "recvfrom", "sendto",
           "shutdown", "getsockopt", "getsockname", "getpeername", "uname", "sysinfo",
           "capget", "restart_syscall", "dup", "dup2", "dup3", "getrlimit", "getcpu")


def _memory_rules() -> dict:
    # W^X: no mapping both writable and executable, no page made executable
    # later (dlopen maps code read+exec directly, so lazy imports still work).
    wx = PROT_WRITE | PROT_EXEC
    return {"mmap": [_ld(_arg_lo(2)), (_AND, 0, 0, wx), (_JEQ, 0, 1, wx), _ret(EPERM),
                     _ret(ALLOW)],
            "mprotect": _allow_unless_bits(2, PROT_EXEC),
            "pkey_mprotect": _allow_unless_bits(2, PROT_EXEC),
            # mremap(old, 0, ...) makes a second view of a shared mapping: an
            # executable one could then be written through a writable alias.
            "mremap": [_ld(_arg_lo(1)), (_JEQ, 0, 3, 0), _ld(_arg_lo(1) + 4), (_JEQ, 0, 1, 0),
                       _ret(EPERM), _ret(ALLOW)]}


def main_rules(pid: int) -> dict:
    """The serving/scanning process: everything the scan, sqlite3 (for
    `scan`), structlog, threads and accept()ed sockets need."""
    rules: dict = {name: None for name in _ALWAYS}
    rules.update(_memory_rules())
    rules.update({
        "openat": _allow_unless_bits(2, OPEN_WRITE),   # read-only opens (Landlock agrees)
        "open": _allow_unless_bits(1, OPEN_WRITE),
        "fcntl": _allow_if_in(1, FCNTL_OK),
        "ioctl": _allow_if_in(1, IOCTL_OK),            # not TIOCSTI & co.
        "prctl": _allow_if_in(0, PRCTL_OK),
        "prlimit64": _allow_if_null(2),                # read limits only
        "tgkill": _allow_if_in(0, (pid,)),             # raise() in our own process only
        # Threads only (no fork), and no namespaces with them.  glibc tries
        # clone3 first, whose flags live in memory we cannot inspect: ENOSYS
        # makes it fall back to clone.
        "clone": [_ld(_arg_lo(0)), (_JSET, 0, 1, CLONE_NS), _ret(EPERM),
                  (_JSET, 0, 1, CLONE_THREAD), _ret(ALLOW), _ret(EPERM)],
        "clone3": SECCOMP_RET_ERRNO | errno.ENOSYS,
    })
    return rules


def reader_rules() -> dict:
    """The /proc reader: a request in, readlink/read-only opens of
    /proc/PID/*, the answer out.  No threads, no accept, no ioctl."""
    rules: dict = {name: None for name in (
        "read", "write", "close", "fstat", "newfstatat", "lseek", "getdents64", "readlink",
        "readlinkat", "recvfrom", "sendto", "poll", "ppoll", "brk", "munmap", "madvise", "futex", "exit", "exit_group", "getpid", "gettid", "rt_sigaction",
        "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "clock_gettime", "gettimeofday",
        "getrandom", "restart_syscall")}
    rules.update(_memory_rules())
    rules["openat"] = _allow_unless_bits(2, OPEN_WRITE)
    rules["open"] = _allow_unless_bits(1, OPEN_WRITE)
    return rules


def build_filter(rules: dict, default: int = EPERM) -> list[tuple[int, int, int, int]]:
    """Classic BPF: check the arch first (a foreign-arch or x32 syscall
    number would mean something else), then one block per allowed syscall
    (absent names are skipped), default action last."""
    if AUDIT_ARCH is None:
        raise _Missing(f"no seccomp syscall table for {ARCH}")
    prog = [_ld(4), (_JEQ, 1, 0, AUDIT_ARCH), _ret(SECCOMP_RET_KILL_PROCESS), _ld(0)]
    if ARCH == "x86_64":
        prog += [(_JGE, 0, 1, _X32_SYSCALL_BIT), _ret(SECCOMP_RET_KILL_PROCESS)]
    for name, rule in rules.items():
        nr = _NR.get(name)
        if nr is None:
            continue
        body = [_ret(ALLOW)] if rule is None else [_ret(rule)] if isinstance(rule, int) else rule
        assert len(body) < 256
        prog += [(_JEQ, 0, len(body), nr)] + body
    return prog + [_ret(default)]


def install_filter(prog: list[tuple[int, int, int, int]]) -> None:
    insns = _ffi.new("struct gcr_sock_filter[]", len(prog))
    for i, (code, jt, jf, k) in enumerate(prog):
        insns[i].code, insns[i].jt, insns[i].jf, insns[i].k = code, jt, jf, k
    fprog = _ffi.new("struct gcr_sock_fprog *", {"len": len(prog), "filter": insns})
    # prctl, not seccomp(2): systemd's @system-service allows prctl but not
    # seccomp.  (No TSYNC needed: we are single-threaded, checked first.)
    prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog)


def _layer_seccomp(rules: dict, reader: "ProcReader | None") -> dict:
    prog = build_filter(rules)
    install_filter(prog)
    if prctl(PR_GET_SECCOMP) != 2:
        raise _Missing("PR_GET_SECCOMP does not report filter mode")
    if reader is not None and reader.seccomp != "ok":
        raise _Missing(f"the /proc reader has no filter: {reader.seccomp}")
    return {"arch": ARCH, "instructions": len(prog), "default": "EPERM"}


# -- the /proc reader -----------------------------------------------------------------------

_READER_PID_DIR = re.compile(rb"/proc/[1-9][0-9]{0,9}")
_READER_TIMEOUT = 60.0
# An answer holds at most four items of scan.MAX_KEPT (fd targets, maps,
# environ, cmdline) and two links: well below this, and below the 4 GiB the
# "=I" length can say.  Checked anyway, on both sides.
MAX_ANSWER = 160 << 20


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise OSError(errno.EPIPE, "the other side closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, limit: int = MAX_ANSWER) -> bytes:
    (size,) = struct.unpack("=I", _recv_exact(sock, 4))
    if size > limit:
        raise OSError(errno.EMSGSIZE, f"a {size}-byte message, over the {limit}-byte limit")
    return _recv_exact(sock, size)


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > MAX_ANSWER:
        raise OSError(errno.EMSGSIZE, f"a {len(payload)}-byte message, over {MAX_ANSWER}")
    sock.sendall(struct.pack("=I", len(payload)))
    sock.sendall(payload)   # not concatenated: no second copy of a big answer


_SAME_AS = -1  # in place of an errno: "the same bytes as item <length>"


def _encode_items(items: list[tuple[bytes, bytes | OSError]]) -> bytes:
    """Each target once: a process may hold half a million fds on one long
    store path, and every fd/N label is kept (Nix prints them all), so a
    repeated value is sent as a reference to its first item."""
    parts, first = [struct.pack("=I", len(items))], {}
    for i, (name, value) in enumerate(items):
        if isinstance(value, OSError):
            err, data = value.errno or errno.EIO, b""
        elif (k := first.setdefault(value, i)) != i:
            err, data = _SAME_AS, b""
        else:
            err, data = 0, value
        length = k if err == _SAME_AS else len(data)
        parts.append(struct.pack("=H", len(name)) + name + struct.pack("=iI", err, length) + data)
    return b"".join(parts)


def _decode_items(payload: bytes, pid_dir: bytes) -> list[tuple[bytes, bytes | OSError]]:
    (count,), pos, items = struct.unpack_from("=I", payload), 4, []
    for _ in range(count):
        (size,) = struct.unpack_from("=H", payload, pos)
        name = payload[pos + 2:pos + 2 + size]
        err, length = struct.unpack_from("=iI", payload, pos + 2 + size)
        pos += 2 + size + 8
        if err == _SAME_AS:
            if length >= len(items) or not isinstance(items[length][1], bytes):
                raise OSError(errno.EPROTO, "malformed answer")
            items.append((name, items[length][1]))
            continue
        data = payload[pos:pos + length]
        pos += length
        items.append((name, OSError(err, os.strerror(err), pid_dir + b"/" + name) if err else data))
    if pos != len(payload):
        raise OSError(errno.EPROTO, "malformed answer")
    return items


class ProcReader:
    """Client side of the /proc reader (see the module docstring): runs
    scan.read_process() in the reader process, for the store dir it was
    started with.  Thread safe; any failure
    breaks it for good (a late answer must never pass for the next one),
    and every later call fails with EIO, so scans fail instead of shrinking."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self.seccomp = ""            # its own filter: "ok", "skipped" or why not
        self._lock = threading.Lock()
        self._broken: str | None = None

    @classmethod
    def start(cls, skip: frozenset[str], store_dir: bytes) -> "ProcReader":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                ours.close()
                _reader_main(theirs, parent, skip, store_dir)
                code = 0
            except BaseException as e:
                os.write(2, f"gcroots-helper: /proc reader: {e!r}\n".encode())
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(_READER_TIMEOUT)
        reader = cls(ours, pid)
        reader.seccomp = _recv_frame(ours).decode(errors="replace")
        return reader

    def __call__(self, pid_dir: bytes, cmdline: bool = False) -> list[tuple[bytes, bytes | OSError]]:
        with self._lock:
            if self._broken is not None:
                raise OSError(errno.EIO, f"the /proc reader is gone: {self._broken}")
            try:
                _send_frame(self.sock, (b"c" if cmdline else b"-") + pid_dir)
                return _decode_items(_recv_frame(self.sock), pid_dir)
            except (OSError, struct.error) as e:
                self._broken = str(e) or type(e).__name__
                raise OSError(errno.EIO, f"the /proc reader failed: {self._broken}") from None


def _reader_main(sock: socket.socket, parent: int, skip: frozenset[str],
                 store_dir: bytes) -> None:  # pragma: no cover
    from .scan import read_process
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:        # the parent died before PDEATHSIG was set
        return
    keep = sock.fileno()
    # Nothing of the parent's: no listening sockets, no stdin/stdout.
    os.closerange(0, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    prctl(PR_SET_DUMPABLE, 0)
    status = b"skipped"
    if "seccomp" not in skip:
        try:
            install_filter(build_filter(reader_rules()))
            status = b"ok"
        except (OSError, _Missing) as e:  # reported: the seccomp layer then counts as missing
            status = str(e).encode()
    _send_frame(sock, status)
    while True:
        try:
            request = _recv_frame(sock, 64)
        except OSError as e:
            if e.errno == errno.EPIPE:
                return                  # the helper is done
            raise
        pid_dir = request[1:]
        # Only ever /proc/PID: whatever the (possibly subverted) scanner
        # asks, this process reads nothing else.
        if request[:1] not in (b"c", b"-") or not _READER_PID_DIR.fullmatch(pid_dir):
            raise SystemExit("refusing a malformed request")
        answer = _encode_items(read_process(pid_dir, request[:1] == b"c", store_dir))
        if len(answer) > MAX_ANSWER:   # cannot happen (see MAX_ANSWER); fail this scan, not us
            answer = _encode_items([(b"fd", OSError(errno.EMSGSIZE, "answer too big"))])
        _send_frame(sock, answer)


def _selftest(reader: ProcReader | None) -> None:
    """The runtime scan must still see into other processes: ask the
    reader for everything it would read of ours."""
    if reader is None or not capget()[0] >> CAP_SYS_PTRACE & 1:
        return  # unprivileged: other processes are closed to us anyway (the scan warns)
    items = dict(reader(b"/proc/%d" % os.getpid()))
    for name in (b"exe", b"cwd", b"maps", b"environ"):
        # exe and cwd are left out (not errors) when they are not in the store.
        if isinstance(items.get(name), OSError) or (name not in items and name in (b"maps", b"environ")):
            raise OSError(errno.EACCES, f"/proc/{os.getpid()}/{os.fsdecode(name)}: {items.get(name)}")


# -- putting it together -------------------------------------------------------------------

def _threads() -> int:
    return len(os.listdir(b"/proc/self/task"))


def apply_for_serving(layout: StoreLayout, *, require: bool, log, skip: Iterable[str] = (),
                      runtime: bool = True, read_db: bool = False) -> Sandbox:
    """Apply every layer (see the module docstring); return what is active.

    `runtime`: start the /proc reader (runtime roots need it under
    Landlock).  `read_db`: also allow reading the Nix DB (the `scan` CLI).
    Raises SandboxError if `require` and a layer is missing, or if the
    sandbox would break the scan (that is never a mere degradation)."""
    skip = frozenset(skip)
    unknown = skip - set(LAYERS)
    if unknown:
        raise SandboxError(f"unknown sandbox layer(s) to skip: {', '.join(sorted(unknown))}")
    if _threads() != 1:
        raise SandboxError("the sandbox must be applied before any thread starts "
                           "(capabilities, Landlock and namespaces are per thread)")
    results: list[LayerResult] = []
    box = Sandbox(results)

    def layer(name: str, fn, *args) -> bool:
        if name in skip:
            result = LayerResult(name, False, "skipped on request (--sandbox-skip)")
        elif AUDIT_ARCH is None:
            result = LayerResult(name, False, f"unsupported architecture {ARCH}")
        else:
            try:
                result = LayerResult(name, True, details=fn(*args) or {})
            except _Missing as e:
                result = LayerResult(name, False, str(e))
            except Exception as e:  # noqa: BLE001 - whatever it is, the layer is missing
                if not isinstance(e, OSError):
                    e = OSError(errno.EIO, repr(e))
                reason = f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0, e.errno)})"
                if e.errno in (errno.EPERM, errno.EACCES) and name in ("landlock", "seccomp") \
                        and not prctl(PR_GET_NO_NEW_PRIVS):
                    reason += ": the kernel requires no_new_privs first"
                result = LayerResult(name, False, reason)
        results.append(result)
        if result.active:
            log.info("sandbox_layer", layer=name, active=True, **result.details)
        else:
            log.warning("sandbox_layer", layer=name, active=False, reason=result.reason)
        return result.active

    layer("netns", _layer_netns)            # needs CAP_SYS_ADMIN (and netlink): first
    layer("caps", _layer_caps)
    layer("no_new_privs", _layer_nnp)
    if runtime and AUDIT_ARCH is not None:   # (elsewhere no Landlock, so no need)
        try:
            box.proc_reader = ProcReader.start(skip, layout.store_dir)
        except OSError as e:
            raise SandboxError(f"cannot start the /proc reader: {e}") from None
        log.info("proc_reader_started", pid=box.proc_reader.pid)
    layer("landlock", _layer_landlock, layout, read_db)
    layer("seccomp", _layer_seccomp, main_rules(os.getpid()), box.proc_reader)
    try:
        _selftest(box.proc_reader)
    except OSError as e:
        raise SandboxError(f"sandbox self-test failed, the runtime scan would be incomplete: "
                           f"{e}") from None
    missing = box.missing
    if not missing:
        log.info("sandbox_applied", layers=list(LAYERS))
    elif require:
        log.error("sandbox_required_but_incomplete",
                  missing={r.name: r.reason for r in missing})
        raise SandboxError("refusing to run without the full sandbox (--require-sandbox); "
                           "missing: " + "; ".join(f"{r.name}: {r.reason}" for r in missing))
    else:
        log.warning("sandbox_incomplete",
                    message="RUNNING WITH A WEAKER SANDBOX: " + ", ".join(r.name for r in missing),
                    missing={r.name: r.reason for r in missing})
    return box


# -- sandbox-check ---------------------------------------------------------------------------
# A harness process prepares probes, forks a child that applies the sandbox
# and tries to escape, then checks from outside that nothing changed and
# cleans up (the sandboxed child could not).  The child prints one line per
# attempt:  "escape NAME: blocked ERRNO (...)" | "escape NAME: ESCAPED" |
# "escape NAME: UNEXPECTED ERRNO (...)" | "works NAME: ok" | "works NAME: FAILED ..."

PTRACE_SEIZE, CLONE_NEWUSER = 0x4206, 0x10000000
_DENIED = (errno.EPERM, errno.EACCES)


@dataclass
class _Probes:
    tmp: bytes
    private_link: bytes
    private_target: bytes
    private_secret: bytes
    state_probe: bytes | None     # prefix of our own files in gcroots/
    state_note: str
    victim_pid: int
    tcp_port: int
    readlinks: list[bytes]


_KEEP = b"the sandbox must keep this\n"
_TARGETS = (b"write", b"unlink", b"rename", b"truncate", b"chmod")   # one file per attempt


def _snapshot(top: bytes, names: Iterable[bytes] | None = None) -> dict:
    out = {}
    for name in sorted(os.listdir(top)) if names is None else names:
        try:
            st = os.lstat(top + b"/" + name)
        except FileNotFoundError:
            out[name] = None
            continue
        data = None
        if stat.S_ISREG(st.st_mode):
            with open(top + b"/" + name, "rb") as f:
                data = f.read()
        out[name] = (st.st_mode, st.st_uid, data)
    return out


def check(layout: StoreLayout, *, skip: Iterable[str], log, readlinks: Sequence[bytes] = ()) -> int:
    import shutil
    import subprocess
    import tempfile
    out = sys.stdout
    tmp = os.fsencode(tempfile.mkdtemp(prefix="gcroots-sandbox-check-"))
    for name in _TARGETS:
        with open(tmp + b"/" + name, "wb") as f:
            f.write(_KEEP)
    private = tmp + b"/private"
    os.mkdir(private, 0o700)
    target = b"/nix/store/" + b"0" * 32 + b"-sandbox-check"
    os.symlink(target, private + b"/link")
    with open(private + b"/secret", "wb") as f:
        f.write(b"not for the helper\n")
    if os.geteuid() == 0:  # make it someone else's 0700 dir, like a home
        for p in (private + b"/link", private + b"/secret", private):
            os.lchown(p, 65534, 65534)
    gcroots, note = layout.gcroots_dir, ""
    prefix = b".gcroots-sandbox-check.%d." % os.getpid()
    state_names = [prefix + n for n in (b"write", b"unlink", b"rename", b"new", b"renamed")]
    try:
        for name in state_names[:3]:
            with open(gcroots + b"/" + name, "xb") as f:
                f.write(_KEEP)
        state_probe = gcroots + b"/" + prefix
    except OSError as e:
        state_probe, note = None, f"cannot prepare probes in {os.fsdecode(gcroots)}: {e}"
    # The /proc reader keeps only fds into the store; the prober takes our
    # temp dir for the store, so that this fd shows fds being read.
    with open(tmp + b"/victim-fd", "wb") as f:
        f.write(_KEEP)
    with open(tmp + b"/victim-fd", "rb") as f:
        os.mkdir(tmp + b"/victim-cwd")  # in the "store", so that the reader hands it over
        victim = subprocess.Popen(["sleep", "600"], stdin=f, stdout=subprocess.DEVNULL,
                                  cwd=tmp + b"/victim-cwd")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    probes = _Probes(tmp, private + b"/link", target, private + b"/secret", state_probe, note,
                     victim.pid, listener.getsockname()[1], list(readlinks))
    before = _snapshot(tmp), _snapshot(gcroots, state_names)
    out.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the sandboxed prober
        code = 2
        try:
            listener.close()
            code = _prober(layout, probes, frozenset(skip), log)
        except BaseException as e:
            print(f"sandbox-check: prober failed: {e!r}", flush=True)
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    problems = []
    code = os.waitstatus_to_exitcode(status)
    if code == 111:
        problems.append("execve succeeded")
    elif code != 0:
        problems.append(f"prober exited with {code}")
    try:
        if _snapshot(tmp) != before[0]:
            problems.append("the temp dir was modified")
        if _snapshot(gcroots, state_names) != before[1]:
            problems.append("the probes in the state dir were modified")
    finally:
        victim.kill()
        victim.wait()
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for name in state_names:
            if not os.path.lexists(gcroots + b"/" + name):
                continue  # never made (e.g. a read-only state dir: unlink says EROFS)
            try:
                os.unlink(gcroots + b"/" + name)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove our probe {os.fsdecode(name)}: {e}")
    if problems:
        print(f"sandbox-check: FAIL: {'; '.join(problems)}", flush=True)
        return 1
    print("sandbox-check: PASS: every escape was blocked, every needed operation works",
          flush=True)
    return 0


def _prober(layout: StoreLayout, p: _Probes, skip: frozenset[str], log) -> int:
    try:
        box = apply_for_serving(dataclasses.replace(layout, store_dir=p.tmp), require=False,
                                log=log, skip=skip, runtime=True)
    except SandboxError as e:
        print(f"sandbox-check: cannot apply the sandbox: {e}", flush=True)
        return 1
    for r in box.layers:
        print(f"layer {r.name}: " + ("active" if r.active else f"MISSING ({r.reason})"))
    failures = 0

    def say(line: str) -> None:
        print(line, flush=True)

    def works(name: str, fn: Callable[[], object]) -> None:
        nonlocal failures
        try:
            ok = fn()
        except OSError as e:
            failures += 1
            say(f"works {name}: FAILED {errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})")
            return
        if ok is False:
            failures += 1
            say(f"works {name}: FAILED (wrong result)")
        else:
            say(f"works {name}: ok")

    def escape(name: str, fn: Callable[[], object], blocked: tuple[int, ...] = _DENIED) -> None:
        nonlocal failures
        try:
            fn()
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, str(e.errno))
            if e.errno in blocked:
                say(f"escape {name}: blocked {code} ({e.strerror})")
            else:
                failures += 1
                say(f"escape {name}: UNEXPECTED {code} ({e.strerror})")
        else:
            failures += 1
            say(f"escape {name}: ESCAPED")

    def read(path: bytes, size: int = 1 << 16) -> bytes:
        with open(path, "rb") as f:
            return f.read(size)

    def write(path: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def create(path: bytes) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))

    def sock(family: int, kind: int = socket.SOCK_STREAM, proto: int = 0) -> None:
        socket.socket(family, kind, proto).close()

    def tcp_connect() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", p.tcp_port))

    def fork() -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the escaped child just leaves
            os._exit(0)
        os.waitpid(pid, 0)

    def gain_cap() -> None:
        eff, prm, inh = capget()
        capset(eff | 1 << CAP_SYS_ADMIN, prm | 1 << CAP_SYS_ADMIN, inh)

    from .scan import read_process
    victim = b"/proc/%d" % p.victim_pid
    reader = box.proc_reader or (lambda pid_dir, cmdline: read_process(pid_dir, cmdline, p.tmp))

    def victim_reads(name: bytes) -> bool:
        """What the runtime scan reads of another process, read its way."""
        items = reader(victim, False)
        values = [v for n, v in items if n == name or name == b"fd/" and n.startswith(name)]
        for v in values:
            if isinstance(v, OSError):
                raise v
        # Its exe (/usr/bin/sleep) is read but, being outside the store, not
        # handed over; a failed read would have come back as an error.
        return bool(values) or name == b"exe"

    # What the scan needs must still work ...
    works("readlink_private_link", lambda: os.readlink(p.private_link) == p.private_target)
    works("lstat_private_link", lambda: stat.S_ISLNK(os.lstat(p.private_link).st_mode))
    for path in p.readlinks:
        works(f"readlink {os.fsdecode(path)}", lambda path=path: bool(os.readlink(path)))
    works("read_proc_self_status", lambda: b"\nSeccomp:" in read(b"/proc/self/status"))
    works("list_gcroots", lambda: os.listdir(layout.gcroots_dir) is not None)
    for name in (b"exe", b"cwd", b"fd/", b"maps", b"environ"):
        works(f"read_process_{os.fsdecode(name).strip('/')} victim",
              lambda name=name: victim_reads(name))
    # ... and nothing else.
    t = p.tmp + b"/"
    refer = _DENIED + (errno.EXDEV,)   # Landlock may say EXDEV for a rename
    escape("write_file tmp", lambda: write(t + b"write"))
    escape("create_file tmp", lambda: create(t + b"new"))
    escape("unlink tmp", lambda: os.unlink(t + b"unlink"))
    escape("rename tmp", lambda: os.rename(t + b"rename", t + b"renamed"), refer)
    escape("mkdir tmp", lambda: os.mkdir(t + b"dir"))
    escape("symlink tmp", lambda: os.symlink(b"x", t + b"symlink"))
    escape("truncate tmp", lambda: os.truncate(t + b"truncate", 0))
    escape("chmod tmp", lambda: os.chmod(t + b"chmod", 0o666))
    if p.state_probe is None:
        say(f"skip state dir escapes: {p.state_note}")
    else:
        sp = p.state_probe
        escape("write_file state", lambda: write(sp + b"write"))
        escape("create_file state", lambda: create(sp + b"new"))
        escape("unlink state", lambda: os.unlink(sp + b"unlink"))
        escape("rename state", lambda: os.rename(sp + b"rename", sp + b"renamed"), refer)
    escape("socket AF_INET", lambda: sock(socket.AF_INET))
    escape("socket AF_INET6", lambda: sock(socket.AF_INET6))
    escape("socket AF_NETLINK", lambda: sock(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    escape("socket AF_UNIX", lambda: sock(socket.AF_UNIX))
    escape("tcp_connect 127.0.0.1", tcp_connect, _DENIED + (errno.ENETUNREACH,))
    escape("read /etc/shadow", lambda: read(b"/etc/shadow", 1))
    escape("read /proc/PID/root/etc/shadow", lambda: read(victim + b"/root/etc/shadow", 1))
    escape("read_private_file", lambda: read(p.private_secret, 1))
    # The Python install is readable, not its whole prefix (/usr for Debian's).
    escape("read python binary", lambda: read(os.fsencode(os.path.realpath(sys.executable)), 1))
    escape("capset +cap_sys_admin", gain_cap)
    escape("ptrace_attach victim", lambda: syscall("ptrace", PTRACE_SEIZE, p.victim_pid, 0, 0))
    escape("signal victim", lambda: os.kill(p.victim_pid, signal.SIGCONT))
    escape("unshare CLONE_NEWUSER", lambda: syscall("unshare", CLONE_NEWUSER))
    escape("fork", fork)
    escape("mmap W+X", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                         | mmap.PROT_EXEC).close())

    def alias_mapping() -> None:  # a second view of shared memory (then: write + exec)
        shared = mmap.mmap(-1, 4096)
        addr = int(_ffi.cast("uintptr_t", _ffi.from_buffer(shared)))
        syscall("munmap", syscall("mremap", addr, 0, 4096, 1, 0), 4096)  # MREMAP_MAYMOVE
    escape("mremap alias", alias_mapping)
    # Last: if it works, this process is gone.  /bin/sh, not /bin/true, so
    # that a successful exec says so and exits non-zero.
    sys.stdout.flush()
    escape("execve /bin/sh", lambda: os.execv(b"/bin/sh", [b"sh", b"-c",
           b"echo 'escape execve /bin/sh: ESCAPED'; exit 111"]))
    return 1 if failures else 0
