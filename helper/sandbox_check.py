"""gcroots-helper sandbox-check: apply the sandbox in a child process, try
every way out of it and every operation the scan needs, one line each.

Never imported by `serve`: the serving helper carries only the sandbox
itself (helper/sandbox.py), not this prober.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from gcroots.layout import StoreLayout
from gcroots.log import Logger

from ._ffi import ffi
from .prepare import CLONE_NEWNET
from .sandbox import LAYERS, SandboxError, apply_for_serving, cap_sets, capset, syscall

# -- sandbox-check ---------------------------------------------------------------------------
# A harness process prepares probes, forks a child that applies the sandbox
# and tries to escape, then checks from outside that nothing changed and
# cleans up (the sandboxed child could not).  The child prints one line per
# attempt:  "escape NAME: blocked ERRNO (...)" | "escape NAME: ESCAPED" |
# "escape NAME: UNEXPECTED ERRNO (...)" | "works NAME: ok" | "works NAME: FAILED ..."

PTRACE_SEIZE, CLONE_NEWUSER, CAP_SYS_ADMIN = 0x4206, 0x10000000, 21
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


Snapshot = dict[bytes, tuple[int, int, bytes | None] | None]


def _snapshot(top: bytes, names: Iterable[bytes] | None = None) -> Snapshot:
    out: Snapshot = {}
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


def check(layout: StoreLayout, *, skip: Iterable[str], log: Logger, readlinks: Sequence[bytes] = ()) -> int:
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
    ready_r, ready_w = os.pipe()   # prober: sandboxed; what its netns layer saw
    go_r, go_w = os.pipe()         # harness (closed): looked, carry on
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the sandboxed prober
        code = 2
        try:
            listener.close()
            os.close(ready_r)
            os.close(go_w)
            code = _prober(layout, probes, frozenset(skip), log, (ready_w, go_r))
        except BaseException as e:
            print(f"sandbox-check: prober failed: {e!r}", flush=True)
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    seen = os.read(ready_r, 4096).decode()   # "" if the prober failed first
    problems = _netns_by_netlink(pid, seen) if seen else []
    os.close(go_w)
    os.close(ready_r)
    _, status = os.waitpid(pid, 0)
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


def _netns_by_netlink(pid: int, seen: str) -> list[str]:
    """What the serving check saw of the prober's network namespace (its
    netns layer's links, from /proc/self/net/dev and SIOCGIFFLAGS) against
    what netlink lists there: pyroute2, in a child that enters the namespace
    (the sandboxed prober may open no socket; serve never imports pyroute2)."""
    if seen == "-":
        print("netns links: not compared (the netns layer is missing)", flush=True)
        return []
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the lister
        try:
            os.close(r)
            syscall("setns", os.open(b"/proc/%d/ns/net" % pid, os.O_RDONLY | os.O_CLOEXEC),
                    CLONE_NEWNET)
            from pyroute2 import IPRoute
            with IPRoute() as ip:
                os.write(w, ", ".join(f"{m.get_attr('IFLA_IFNAME')}({'up' if m['flags'] & 1 else 'down'})"
                                      for m in ip.get_links()).encode())
        except BaseException as e:
            os.write(w, f"!{e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    listed = b""
    while chunk := os.read(r, 1 << 16):
        listed += chunk
    os.close(r)
    os.waitpid(child, 0)
    shown, netlink = seen.split(", not the host's")[0], listed.decode()
    if netlink.startswith("!"):   # e.g. setns without CAP_SYS_ADMIN: cannot verify, not an escape
        print(f"netns links: not compared (netlink: {netlink[1:]})", flush=True)
        return []
    print(f"netns links: the serving check saw {shown}; netlink (pyroute2) lists {netlink}",
          flush=True)
    return [] if netlink == shown else [f"netlink lists links {netlink!r}, the serving check saw {shown!r}"]


def _prober(layout: StoreLayout, p: _Probes, skip: frozenset[str], log: Logger,
            sync: tuple[int, int]) -> int:
    try:
        box = apply_for_serving(dataclasses.replace(layout, store_dir=p.tmp), require=False,
                                log=log, skip=skip, runtime=True)
    except SandboxError as e:
        print(f"sandbox-check: cannot apply the sandbox: {e}", flush=True)
        return 1
    for layer in LAYERS:
        print(f"layer {layer}: " + (f"MISSING ({box.missing[layer]})" if layer in box.missing else "active"))
    sys.stdout.flush()
    os.write(sync[0], str(box.details.get("netns", {}).get("links", "-")).encode())
    os.close(sync[0])
    os.read(sync[1], 1)   # end of file: the harness has listed our links with netlink
    os.close(sync[1])
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
        have = cap_sets()
        capset(have["Eff"] | 1 << CAP_SYS_ADMIN, have["Prm"] | 1 << CAP_SYS_ADMIN, have["Inh"])

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
        def readable(path: bytes = path) -> bool:
            return bool(os.readlink(path))
        works(f"readlink {os.fsdecode(path)}", readable)
    works("read_proc_self_status", lambda: b"\nSeccomp:" in read(b"/proc/self/status"))
    works("list_gcroots", lambda: os.listdir(layout.gcroots_dir) is not None)
    for name in (b"exe", b"cwd", b"fd/", b"maps", b"environ"):
        def read_victim(name: bytes = name) -> bool:
            return victim_reads(name)
        works(f"read_process_{os.fsdecode(name).strip('/')} victim", read_victim)
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
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(shared)))
        syscall("munmap", syscall("mremap", addr, 0, 4096, 1, 0), 4096)  # MREMAP_MAYMOVE
    escape("mremap alias", alias_mapping)
    # Last: if it works, this process is gone.  /bin/sh, not /bin/true, so
    # that a successful exec says so and exits non-zero.
    sys.stdout.flush()
    escape("execve /bin/sh", lambda: os.execv(b"/bin/sh", [b"sh", b"-c",
           b"echo 'escape execve /bin/sh: ESCAPED'; exit 111"]))
    return 1 if failures else 0
