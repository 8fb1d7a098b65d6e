"""The helper's seccomp filters: the allow-lists (the serving process's and
its /proc reader's), compiled into classic BPF by libseccomp.

The long-lived serving process never loads this module (nor libseccomp's
rule compiler runs in it): `serve`'s launcher step (helper/launch.py)
compiles both programs before its exec -- the same pid after it, which
main_rules names -- and hands them over in a sealed memfd (launch._hand_over;
read by sandbox.handed_over); the serving process installs its own
after Landlock and the reader's in the reader child, as each did when it
compiled them itself.  `scan --sandbox` and sandbox-check, which no
launcher prepares, compile them in-process from here (compiled()).  What
each filter stops is in helper/sandbox.py's docstring.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Iterable


from ._ffi import ffi
from .sandbox import (PR_CAPBSET_READ, PR_GET_DUMPABLE, PR_GET_NAME, PR_GET_NO_NEW_PRIVS,
                      PR_GET_SECCOMP, PR_GET_SECUREBITS, Programs, _seccomp)

# libseccomp builds the filter (the arch check, a foreign arch or x32 number
# killing the process, the syscall numbers); we export it and install it
# ourselves with prctl(PR_SET_SECCOMP): systemd's @system-service allows
# prctl but not seccomp(2).  Argument filters are libseccomp comparisons;
# an int argument is compared on its low 32 bits (mask LOW), as the kernel
# reads it.

SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
ALLOW, EPERM, LOW = SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno.EPERM, 0xFFFFFFFF
_NE, _EQ, _MASKED_EQ = 1, 4, 7    # SCMP_CMP_*
CLONE_THREAD = 0x10000
# Namespace flags; CLONE_THREAD excludes most of them already, but say it.
# (CLONE_NEWTIME only exists for clone3: in clone's low byte is the exit signal.)
CLONE_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
PROT_WRITE, PROT_EXEC = 0x2, 0x4
OPEN_WRITE = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
              | (getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY))

# A rule: None (allow), an action, or alternatives (any one allows), each a
# tuple of comparisons (all must hold) (arg, op, datum_a, datum_b).
Rule = list[tuple[tuple[int, int, int, int], ...]]
Rules = dict[str, Rule | int | None]


def _unless_bits(arg: int, mask: int) -> Rule:
    return [((arg, _MASKED_EQ, mask, 0),)]


def _one_of(arg: int, values: Iterable[int]) -> Rule:
    return [((arg, _MASKED_EQ, LOW, v),) for v in values]


# What both processes need: a request in or a connection's bytes out,
# readlink and read-only opens (Landlock agrees), and memory W^X: no
# mapping both writable and executable, no page made executable later
# (dlopen maps code read+exec directly, so lazy imports still work).
# mremap(old, 0, ...) makes a second view of a shared mapping: an
# executable one could then be written through a writable alias.
_BOTH: Rules = {
    **dict.fromkeys("read write close fstat newfstatat lseek getdents64 readlink readlinkat recvfrom "
                    "sendto poll ppoll brk munmap madvise futex exit exit_group getpid gettid "
                    "rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack clock_gettime "
                    "gettimeofday getrandom restart_syscall".split()),
    "openat": _unless_bits(2, OPEN_WRITE), "open": _unless_bits(1, OPEN_WRITE),
    "mmap": [((2, _MASKED_EQ, PROT_WRITE | PROT_EXEC, v),) for v in (0, PROT_WRITE, PROT_EXEC)],
    "mprotect": _unless_bits(2, PROT_EXEC), "pkey_mprotect": _unless_bits(2, PROT_EXEC),
    "mremap": [((1, _NE, 0, 0),)]}


def reader_rules() -> Rules:
    """The /proc reader: a request in, readlink/read-only opens of
    /proc/PID/*, the answer out.  No threads, no accept, no ioctl."""
    return dict(_BOTH)


def main_rules(pid: int) -> Rules:
    """The serving/scanning process: everything the scan, sqlite3 (for
    `scan`), logging, threads and accept()ed sockets need."""
    return {**_BOTH, **dict.fromkeys(
        "readv writev pread64 statx lstat stat access faccessat faccessat2 getcwd set_robust_list "
        "rseq set_tid_address getppid getuid geteuid getgid getegid getresuid getresgid getgroups "
        "sched_yield sched_getaffinity nanosleep clock_nanosleep clock_getres time select pselect6 "
        "epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 accept4 accept shutdown "
        "getsockopt getsockname getpeername uname sysinfo capget dup dup2 dup3 getrlimit "
        "getcpu".split()),
        "fcntl": _one_of(1, (0, 1, 2, 3, 4, 5, 6, 7, 36, 37, 38, 1030)),  # dup/fd flags/fl flags/locks
        # TCGETS TIOCGWINSZ FIONREAD FIONBIO FIONCLEX FIOCLEX, not TIOCSTI & co.
        "ioctl": _one_of(1, (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)),
        "prctl": _one_of(0, (PR_GET_DUMPABLE, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
                             PR_GET_SECUREBITS, PR_GET_NO_NEW_PRIVS)),
        "prlimit64": [((2, _EQ, 0, 0),)],              # read limits only (new limit NULL)
        "tgkill": _one_of(0, (pid,)),                  # raise() in our own process only
        # Threads only (no fork), and no namespaces with them.  glibc tries
        # clone3 first, whose flags live in memory we cannot inspect: ENOSYS
        # makes it fall back to clone.
        "clone": [((0, _MASKED_EQ, CLONE_NS | CLONE_THREAD, CLONE_THREAD),)],
        "clone3": SECCOMP_RET_ERRNO | errno.ENOSYS}


def _scmp(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"libseccomp {what}: {os.strerror(-rc)}")


def build_filter(rules: Rules, default: int = EPERM) -> bytes:
    """The classic BPF program (8 bytes an instruction) for `rules`, names
    this architecture lacks left out, `default` for every other call."""
    ctx = _seccomp.seccomp_init(default)
    _scmp(-errno.ENOMEM if ctx == ffi.NULL else 0, "seccomp_init")
    try:   # (its no_new_privs attribute only matters to seccomp_load, which we do not use)
        for name, rule in rules.items():
            nr = int(_seccomp.seccomp_syscall_resolve_name(name.encode()))   # < 0: not on this arch
            action, alternatives = (rule, [()]) if isinstance(rule, int) else (ALLOW, rule or [()])
            for cmps in alternatives if nr >= 0 else ():
                array = ffi.new("struct scmp_arg_cmp[]", list(cmps) or 1)
                _scmp(_seccomp.seccomp_rule_add_array(ctx, action, nr, len(cmps), array), f"rule for {name}")
        with open(os.memfd_create("seccomp", os.MFD_CLOEXEC), "rb") as memfd:
            _scmp(_seccomp.seccomp_export_bpf(ctx, memfd.fileno()), "export_bpf")
            memfd.seek(0)
            prog = bytearray(memfd.read())
    finally:
        _seccomp.seccomp_release(ctx)
    # The one part libseccomp cannot say here: a foreign arch's (or x32's)
    # call must kill the process, but libseccomp accepts KILL_PROCESS only
    # after asking the kernel through seccomp(2), which systemd's
    # @system-service denies.  Its default for them is KILL_THREAD (0),
    # which nothing else of ours returns: those returns (BPF_RET | BPF_K,
    # 0x06) become KILL_PROCESS.
    for i in range(0, len(prog), 8):
        if (insn := struct.unpack_from("=HBBI", prog, i))[0] == 0x06 and insn[3] == 0:
            struct.pack_into("=I", prog, i + 4, SECCOMP_RET_KILL_PROCESS)
    return bytes(prog)



def compiled(pid: int) -> Programs | str:
    """Both programs -- the process `pid`'s (main_rules) and its /proc
    reader's -- or why they cannot be built (the seccomp layer is then
    missing)."""
    try:
        return build_filter(main_rules(pid)), build_filter(reader_rules())
    except OSError as e:
        return str(e)
