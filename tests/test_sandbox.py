"""The helper's kernel sandbox (helper/sandbox.py), each layer proven by
trying to break it: with every layer on, and with layers switched off one
after the other, so that each expectation below can (and does) fail when
the layer behind it is missing."""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import struct
import sys
import time
from pathlib import Path

import pytest

from gcroots.helper import sandbox, seccomp_filters
from gcroots.helper._ffi import ffi

from . import support
from .support import HELPER, lines, nix_roots, read_root_stream, roots_of
from .test_helper_scan import HOLDER, private_homes, valid_paths

HELPER_USER = support.HELPER_USER
TWO_CAPS = "0000000000080004"   # CAP_DAC_READ_SEARCH | CAP_SYS_PTRACE
NO_CAPS = "0000000000000000"
AS_USER = ["setpriv", f"--reuid={HELPER_USER}", f"--regid={HELPER_USER}", "--clear-groups",
           "--inh-caps=-all,+dac_read_search,+sys_ptrace",
           "--ambient-caps=+dac_read_search,+sys_ptrace"]
BOUNDING = ["--bounding-set=-all,+dac_read_search,+sys_ptrace"]


@pytest.fixture(scope="module")
def store(users):
    """A store with indirect roots in real users' 0700 homes (shared by the
    module: the sandbox tests only read it, or clean up after themselves)."""
    top = support.scratch_dir()
    root = top / "store"
    support.make_store(root, paths=600, seed=41, roots=40, indirect=12, stale=2, quirks=2)
    private_homes(root)
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


@pytest.fixture(scope="module")
def helper_user():
    return support.ensure_user(HELPER_USER)


@pytest.fixture
def user_sock_dir(tmp_path, helper_user) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    os.chown(d, helper_user.pw_uid, helper_user.pw_gid)
    return d


# -- sandbox-check ---------------------------------------------------------------------

CHECK_LINE = re.compile(r"^(layer|works|escape) (.+?): (active|MISSING|ok|FAILED|blocked|ESCAPED|"
                        r"UNEXPECTED) ?(\w*)")


def sandbox_check(*args: str, prefix: list[str] = ()) -> dict:
    out = subprocess.run([*prefix, HELPER, "sandbox-check", *args], capture_output=True,
                         timeout=60)
    res = {"rc": out.returncode, "stdout": out.stdout.decode(), "stderr": out.stderr.decode(),
           "layer": {}, "works": {}, "escape": {}}
    for line in res["stdout"].splitlines():
        m = CHECK_LINE.match(line)
        if m:
            kind, name, outcome, code = m.groups()
            res[kind][name] = code if outcome == "blocked" else f"{outcome} {code}".strip()
    return res


FS = ("write_file tmp", "create_file tmp", "unlink tmp", "rename tmp", "mkdir tmp", "symlink tmp",
      "truncate tmp", "chmod tmp", "write_file state", "create_file state", "unlink state",
      "rename state")
SOCKETS = ("socket AF_INET", "socket AF_INET6", "socket AF_NETLINK", "socket AF_UNIX")
READS = ("read /etc/shadow", "read /proc/PID/root/etc/shadow", "read_private_file",
         "read python binary")
# Every escape with every layer on: seccomp answers first (EPERM) except
# for plain reads, which it allows and Landlock refuses (EACCES).
ALL_LAYERS = {**{n: "EPERM" for n in FS + SOCKETS}, "tcp_connect 127.0.0.1": "EPERM",
              **{n: "EACCES" for n in READS}, "capset +cap_sys_admin": "EPERM",
              "ptrace_attach victim": "EPERM", "signal victim": "EPERM",
              "unshare CLONE_NEWUSER": "EPERM", "fork": "EPERM", "mmap W+X": "EPERM",
              "mremap alias": "EPERM", "execve /bin/sh": "EPERM"}
# Without seccomp, Landlock is the first to say no -- and what it does not
# cover escapes: chmod, sockets, user namespaces, fork, W+X memory.
NO_SECCOMP = {**ALL_LAYERS, **{n: "EACCES" for n in FS}, "chmod tmp": "ESCAPED",
              **{n: "ESCAPED" for n in SOCKETS}, "tcp_connect 127.0.0.1": "EACCES",
              "unshare CLONE_NEWUSER": "ESCAPED", "fork": "ESCAPED", "mmap W+X": "ESCAPED",
              "mremap alias": "ESCAPED", "execve /bin/sh": "EACCES"}
# Without Landlock either: only the network namespace and the capability
# drop remain.  Root's uid still owns files; CAP_SYS_PTRACE still attaches.
NO_SECCOMP_LANDLOCK = {**{n: "ESCAPED" for n in ALL_LAYERS}, "tcp_connect 127.0.0.1": "ENETUNREACH",
                       "capset +cap_sys_admin": "EPERM"}
NEEDED = ["readlink_private_link", "lstat_private_link", "read_proc_self_status", "list_gcroots",
          "read_process_exe victim", "read_process_cwd victim", "read_process_fd victim",
          "read_process_maps victim", "read_process_environ victim"]


def home_link(store: Path, home: str) -> Path:
    for dirpath, dirnames, filenames in os.walk(store / "home" / home):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p.is_symlink():
                return p
    raise AssertionError(f"no link in {home}'s home")


def test_sandbox_check_every_escape_blocked_for_its_reason(store, users):
    alice_link = home_link(store, "alice")
    home = os.stat(store / "home" / "alice")
    assert stat.S_IMODE(home.st_mode) == 0o700 and home.st_uid == users[support.ALICE].pw_uid
    res = sandbox_check("--root", str(store), "--readlink", str(alice_link))
    assert res["rc"] == 0, res["stdout"] + res["stderr"]
    assert res["layer"] == {name: "active" for name in sandbox.LAYERS}
    assert res["works"] == {**{n: "ok" for n in NEEDED}, f"readlink {alice_link}": "ok"}
    assert res["escape"] == ALL_LAYERS
    # netlink (pyroute2, from outside the sandbox) lists what the netns layer saw.
    assert "netns links: the serving check saw lo(down); netlink (pyroute2) lists lo(down)\n" \
        in res["stdout"]
    assert res["stdout"].endswith("sandbox-check: PASS: every escape was blocked, "
                                  "every needed operation works\n")


@pytest.mark.parametrize("skip,expected,message", [
    ("seccomp", NO_SECCOMP, "prober exited with 1; the temp dir was modified"),  # chmod
    ("seccomp,landlock", NO_SECCOMP_LANDLOCK, "execve succeeded"),
    ("seccomp,landlock,netns", {**NO_SECCOMP_LANDLOCK, "tcp_connect 127.0.0.1": "ESCAPED"},
     "execve succeeded"),
    ("seccomp,landlock,caps", {**NO_SECCOMP_LANDLOCK, "capset +cap_sys_admin": "ESCAPED"},
     "execve succeeded"),
])
def test_each_layer_stops_something(store, skip, expected, message):
    """Take the layers away one by one: each time, exactly the escapes that
    layer stopped get through (or are stopped by the next one), and the
    check fails and says so."""
    res = sandbox_check("--root", str(store), "--sandbox-skip", skip)
    assert res["rc"] == 1
    assert res["escape"] == expected
    assert {n for n, v in res["layer"].items() if v != "active"} == set(skip.split(","))
    assert res["works"] == {n: "ok" for n in NEEDED}
    assert f"sandbox-check: FAIL: {message}" in res["stdout"]
    # The harness cleaned up after the escaped prober.
    gcroots = store / "nix/var/nix/gcroots"
    assert not [n for n in os.listdir(gcroots) if n.startswith(".gcroots-sandbox-check")]


def test_sandbox_check_as_dedicated_user(store, users, helper_user):
    res = sandbox_check("--root", str(store), prefix=["unshare", "-n", *AS_USER, *BOUNDING])
    assert res["rc"] == 0, res["stdout"] + res["stderr"]
    assert res["layer"] == {name: "active" for name in sandbox.LAYERS}
    # It cannot write to root's state dir in the first place, so those
    # probes are skipped (and said to be); everything else as for root.
    assert "skip state dir escapes: cannot prepare probes" in res["stdout"]
    assert res["escape"] == {k: v for k, v in ALL_LAYERS.items() if not k.endswith(" state")}
    assert res["works"] == {n: "ok" for n in NEEDED}


def test_sandbox_check_with_a_read_only_state_dir(store, users):
    """systemd's ProtectSystem=strict: the probes cannot be made (EROFS), and
    cleaning up the probes that were never made is no failure."""
    gcroots = store / "nix/var/nix/gcroots"
    script = 'mount -o bind,ro "$1" "$1" && shift && exec "$@"'
    res = sandbox_check("--root", str(store),
                        prefix=["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                                "sh", str(gcroots)])
    assert res["rc"] == 0, res["stdout"] + res["stderr"]
    assert "skip state dir escapes: cannot prepare probes" in res["stdout"]
    assert "Read-only file system" in res["stdout"]
    assert res["escape"] == {k: v for k, v in ALL_LAYERS.items() if not k.endswith(" state")}


# -- a serving helper ------------------------------------------------------------------------

class Served:
    def __init__(self, proc: subprocess.Popen, log: Path, sock: Path):
        self.proc, self.log_path, self.sock = proc, log, sock

    def events(self) -> list[dict]:
        return support.json_lines(self.log_path)

    def event(self, name: str) -> dict:
        return next(e for e in self.events() if e.get("event") == name)

    def wait_listening(self, timeout: float = 20) -> None:
        """The socket accepts before the sandbox is on; this waits for both."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == "helper_listening" for e in self.events()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"helper exited {self.proc.returncode}: "
                                     + self.log_path.read_text())
            time.sleep(0.05)
        raise TimeoutError("helper did not start listening")


@pytest.fixture
def serve_helper(tmp_path):
    started: list[Served] = []

    def start(store: Path, *args: str, prefix: list[str] = (), sock_dir: Path | None = None,
              runtime: bool = True) -> Served:
        sock = (sock_dir or tmp_path) / f"helper-{len(started)}.sock"
        log = tmp_path / f"helper-{len(started)}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([*prefix, HELPER, "serve", "--root", str(store), "--socket",
                                     str(sock), *([] if runtime else ["--no-runtime"]), *args],
                                    stderr=f)
        h = Served(proc, log, sock)
        started.append(h)
        return h

    yield start
    for h in started:
        support.stop_process(h.proc)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_confined(pid: int) -> None:
    st = status(pid)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == (TWO_CAPS, TWO_CAPS, TWO_CAPS)
    assert (st["CapInh"], st["CapAmb"]) == (NO_CAPS, NO_CAPS)


def netns_links(pid: int) -> list[str]:
    ip = shutil.which("ip") or "/sbin/ip"
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", ip, "-o", "link"], check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def candidates(store: Path) -> set[tuple[bytes, bytes]]:
    out = subprocess.run([HELPER, "scan", "--root", str(store), "--no-runtime",
                          "--all-candidates"], capture_output=True, check=True).stdout
    return {tuple(line.split(b" -> ", 1)) for line in lines(out)}


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "dedicated-user"])
def test_serving_helper_is_confined(store, users, helper_user, serve_helper, user_sock_dir,
                                    as_user):
    prefix, sock_dir = [], None
    if as_user:
        # Like systemd's User= + AmbientCapabilities= + CapabilityBoundingSet=
        # + PrivateNetwork=: the helper cannot unshare, it checks instead.
        prefix, sock_dir = ["unshare", "-n", *AS_USER, *BOUNDING], user_sock_dir
    h = serve_helper(store, "--require-sandbox", prefix=prefix, sock_dir=sock_dir)
    h.wait_listening()
    reader = h.event("proc_reader_started")["pid"]
    assert status(reader)["PPid"] == str(h.proc.pid)
    for pid in (h.proc.pid, reader):
        assert_confined(pid)
        assert status(pid)["Uid"].split()[0] == str(helper_user.pw_uid if as_user else 0)
        links = netns_links(pid)
        assert len(links) == 1 and re.match(r"1: lo: <LOOPBACK> .* state DOWN ", links[0]), links
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    netns = h.event("sandbox_layer")
    assert netns["layer"] == "netns" and netns["how"] == (
        "inherited (unshare: EPERM)" if as_user else "unshared")
    # And it serves complete, correct streams, private homes included.
    events, end, _ = read_root_stream(h.sock)
    assert end.complete, end.reason
    served = {r for r in roots_of(events) if not r[0].startswith(b"/proc/")}
    assert served == candidates(store)
    assert any(b"/home/alice/" in label for label, _ in served)


def test_reader_death_fails_scans_closed(store, serve_helper, tmp_path):
    nix_sock = tmp_path / "nix.sock"
    h = serve_helper(store, "--require-sandbox", "--nix-roots-daemon-socket", str(nix_sock))
    h.wait_listening()
    assert read_root_stream(h.sock)[1].complete
    reader = h.event("proc_reader_started")["pid"]
    os.kill(reader, signal.SIGKILL)
    while status(reader)["State"][0] not in "ZX":
        time.sleep(0.01)
    events, end, _ = read_root_stream(h.sock)
    assert not end.complete
    assert "the /proc reader" in end.reason
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(nix_sock))
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert data.startswith(b"gcroots-helper: root scan failed")


@pytest.mark.parametrize("layer", sandbox.LAYERS)
def test_require_sandbox_refuses_a_missing_layer(store, serve_helper, tmp_path, layer):
    sock = tmp_path / "refused.sock"
    out = subprocess.run([HELPER, "serve", "--root", str(store), "--socket", str(sock),
                          "--require-sandbox", "--sandbox-skip", layer],
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    assert b"refusing to run without the full sandbox (--require-sandbox); missing: " \
        + layer.encode() + b": skipped on request" in out.stderr
    # Without --require-sandbox it serves, and says loudly what is missing.
    h = serve_helper(store, "--sandbox-skip", layer)
    h.wait_listening()
    assert read_root_stream(h.sock)[1].complete
    [warning] = [e for e in h.events() if e.get("event") == "sandbox_incomplete"]
    assert warning["level"] == "warning"
    assert "RUNNING WITH A WEAKER SANDBOX" in warning["message"]
    if layer == "no_new_privs":
        # The kernel itself refuses Landlock and seccomp without it.
        assert set(warning["missing"]) == {"no_new_privs", "landlock", "seccomp"}
        assert "requires no_new_privs first" in warning["missing"]["landlock"]
        assert "requires no_new_privs first" in warning["missing"]["seccomp"]
    else:
        assert set(warning["missing"]) == {layer}


def test_dedicated_user_without_reduced_bounding_set_is_refused(store, user_sock_dir):
    """setpriv/systemd without CapabilityBoundingSet=: the helper has no
    CAP_SETPCAP to shrink the bounding set itself, so it refuses."""
    out = subprocess.run(["unshare", "-n", *AS_USER, HELPER, "serve", "--root", str(store),
                          "--socket", str(user_sock_dir / "x.sock"), "--require-sandbox"],
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    assert b"caps: bounding set 0x" in out.stderr
    assert b"CapabilityBoundingSet=" in out.stderr


NETNS_REFUSED = (b"netns: network namespace inherited (unshare: EPERM) has links other than lo "
                 b"(down, or up in a namespace not the host's): ")


def test_netns_that_is_not_empty_is_refused(store, user_sock_dir):
    """Without the right to unshare, the inherited namespace is checked: the
    host's, with its links, is refused."""
    out = subprocess.run([*AS_USER, *BOUNDING, HELPER, "serve", "--root", str(store),
                          "--socket", str(user_sock_dir / "x.sock"), "--require-sandbox"],
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    assert NETNS_REFUSED + b"lo(up), " in out.stderr


def test_netns_of_init_with_lo_up_is_refused(store, user_sock_dir):
    """A loopback that is up is accepted only in a namespace that is not the
    host's (init's).  Here init is the sh of a new PID namespace (with its own
    /proc), sharing the helper's network namespace."""
    out = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                          'ip link set lo up && "$@"; exit $?', "sh", *AS_USER, *BOUNDING, HELPER,
                          "serve", "--root", str(store), "--socket",
                          str(user_sock_dir / "x.sock"), "--require-sandbox"],
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    assert NETNS_REFUSED + b"lo(up);" in out.stderr


def test_private_netns_with_lo_up_is_accepted(store, users, serve_helper, user_sock_dir):
    """systemd's PrivateNetwork=yes: a namespace of the unit's own with `lo`
    up (systemd brings it up).  It reaches only the unit itself: accepted."""
    prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *AS_USER,
              *BOUNDING]
    h = serve_helper(store, "--require-sandbox", prefix=prefix, sock_dir=user_sock_dir)
    h.wait_listening()
    netns = h.event("sandbox_layer")
    assert netns["layer"] == "netns" and netns["active"]
    assert netns["links"] == "lo(up), not the host's namespace"
    links = netns_links(h.proc.pid)
    assert len(links) == 1 and re.match(r"1: lo: <LOOPBACK,UP,LOWER_UP> ", links[0]), links
    assert read_root_stream(h.sock)[1].complete


# -- the oracle, sandboxed ------------------------------------------------------------------

def test_sandboxed_scan_and_stream_equal_nix(store, users, serve_helper):
    scan = subprocess.run([HELPER, "scan", "--require-sandbox", "--root", str(store),
                           "--no-runtime"], capture_output=True, check=True)
    assert b'"event": "sandbox_applied"' in scan.stderr
    h = serve_helper(store, "--require-sandbox", runtime=False)
    h.wait_listening()
    events, end, _ = read_root_stream(h.sock)
    assert end.complete
    theirs = nix_roots(store)   # last: Nix deletes stale auto links
    assert scan.stdout == theirs
    assert b"/home/alice/" in theirs and b"/home/bob/" in theirs
    valid = set(valid_paths(store))
    served = {lbl + b" -> " + sp for lbl, sp in roots_of(events) if sp.decode() in valid}
    assert served == lines(theirs)


def test_sandboxed_runtime_roots_of_another_user_equal_nix(scratch, users):
    """A process of another user holding store paths as cwd, open fd,
    mapping and in its environment: the sandboxed scan (through the /proc
    reader) finds each, as Nix does.  Under Landlock alone it could not."""
    src = scratch / "src"
    added = []
    for kind in ("cwd", "fd", "mmap", "env"):
        d = src / f"gcroots-sandbox-test-{kind}"
        d.mkdir(parents=True)
        (d / "data").write_bytes(f"gcroots sandbox test {kind} {os.getpid()}\n".encode() * 64)
        added.append(support.oracle("/", "nix-store", "--add", str(d)).stdout.strip().decode())
    cwd, fd_path, mmap_path, env_path = added
    alice = pwd.getpwnam(support.ALICE)
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}", "--clear-groups",
         sys.executable, "-c", HOLDER, cwd, fd_path + "/data", mmap_path + "/data"],
        stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "GCR_TEST": env_path + "/data"})
    try:
        assert holder.stdout.readline() == b"ready\n"
        assert status(holder.pid)["Uid"].split()[0] == str(alice.pw_uid)
        prefix = f"/proc/{holder.pid}/".encode()
        out = subprocess.run([HELPER, "scan", "--require-sandbox", "--root", "/"],
                             capture_output=True, check=True)
        assert b'"event": "sandbox_applied"' in out.stderr
        ours = {x for x in lines(out.stdout) if x.startswith(prefix)}
        theirs = {x for x in lines(nix_roots("/", with_proc=True)) if x.startswith(prefix)}
        assert ours == theirs
        labels = {x.split(b" -> ")[0][len(prefix):] for x in ours}
        assert {b"cwd", b"maps", b"environ"} <= labels
        assert any(label.startswith(b"fd/") for label in labels)
    finally:
        holder.kill()
        holder.wait()


# -- pieces ------------------------------------------------------------------------------------

READER_PROBE = r"""
import errno, os
from gcroots.helper.sandbox import ProcReader
from gcroots.helper.seccomp_filters import build_filter, reader_rules
exe = os.readlink("/proc/self/exe").encode()
# Only what names the store leaves the reader: exe outside it is not handed
# over, and of maps only the paths (no addresses of our memory).
other = ProcReader.start(build_filter(reader_rules()), b"/nonexistent-store")
kept = dict(other(b"/proc/%d" % os.getpid()))
print("withheld", b"exe" not in kept and b"cwd" not in kept and kept[b"maps"] == b"")
r = ProcReader.start(build_filter(reader_rules()), os.path.dirname(exe))
items = dict(r(b"/proc/%d" % os.getpid()))
print("exe", items[b"exe"] == exe,
      all(line.startswith(os.path.dirname(exe) + b"/") for line in items[b"maps"].split(b"\n")))
for bad in (b"/etc", b"/proc/1/root", b"/proc/self", b"/proc/1/../../etc"):
    try:
        r(bad)
        print("answered", bad)
    except OSError as e:
        print("refused", e.errno == errno.EIO)
"""


def test_proc_reader_reads_only_proc_pid():
    out = subprocess.run([sys.executable, "-c", READER_PROBE], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.split("\n")[:6] == ["withheld True", "exe True True"] + ["refused True"] * 4, out
    assert "refusing a malformed request" in out.stderr


def _header_numbers(path: str) -> dict[str, int]:
    nums, alias = {}, {}
    for line in open(path):
        m = re.match(r"#define __NR(3264)?_(\w+)\s+(\S+)", line)
        if m:
            key = ("3264_" if m.group(1) else "") + m.group(2)
            if m.group(3).isdigit():
                nums[key] = int(m.group(3))
            elif m.group(3).startswith("__NR3264_"):
                alias[m.group(2)] = "3264_" + m.group(3)[len("__NR3264_"):]
    nums.update({name: nums[target] for name, target in alias.items() if target in nums})
    return nums


def test_filtered_syscalls_are_the_kernel_headers_names():
    """libseccomp resolves each name of our filters (and of the set-up calls)
    to the number in this architecture's kernel headers; a misspelt name,
    which the filter would silently leave out, is known to no table."""
    x86 = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"
    generic = "/usr/include/asm-generic/unistd.h"
    if not (os.path.exists(x86) and os.path.exists(generic)):
        pytest.skip("kernel headers (linux-libc-dev) not installed")
    tables = _header_numbers(x86), _header_numbers(generic)
    native = tables[0] if sandbox.ARCH == "x86_64" else tables[1]
    names = {*seccomp_filters.main_rules(1), *seccomp_filters.reader_rules(), "capset", "ptrace", "unshare",
             "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"}
    for name in sorted(names):
        assert any(name in t for t in tables), name
        if name in native:
            assert sandbox.syscall_number(name) == native[name], name


# Runs argv[1:] as systemd's SystemCallFilter=@system-service would: with
# seccomp(2) denied (EPERM), which makes libseccomp refuse KILL_PROCESS.
AS_UNDER_SYSTEMD = r"""
import os, sys
from cffi import FFI
from gcroots.helper import sandbox as s, seccomp_filters as f
ffi = FFI()
ffi.cdef("void *seccomp_init(uint32_t); int seccomp_load(void *);"
         "int seccomp_rule_add_array(void *, uint32_t, int, unsigned int, void *);")
lib = ffi.dlopen(s.LIBSECCOMP)
ctx = lib.seccomp_init(f.ALLOW)
assert lib.seccomp_rule_add_array(ctx, f.EPERM, s.syscall_number("seccomp"), 0, ffi.NULL) == 0
s.prctl(s.PR_SET_NO_NEW_PRIVS, 1)
assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("under_systemd", [False, True], ids=["plain", "seccomp2_denied"])
def test_foreign_arch_and_x32_syscalls_kill_the_process(under_systemd):
    """libseccomp's arch check, with its bad-arch returns made KILL_PROCESS:
    an x32 call on x86_64 kills the whole process -- also where seccomp(2)
    is denied (systemd's unit), so that libseccomp cannot offer it."""
    if sandbox.ARCH != "x86_64":
        pytest.skip("x32 is an x86_64 matter")
    prog = seccomp_filters.build_filter(seccomp_filters.main_rules(1))
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    assert (0x06, 0, 0, seccomp_filters.SECCOMP_RET_KILL_PROCESS) in insns
    assert not [i for i in insns if i[0] == 0x06 and i[3] == 0]   # no KILL_THREAD
    code = ("import ctypes, os, threading\n"
            "from gcroots.helper import sandbox as s, seccomp_filters as f\n"
            "s.prctl(s.PR_SET_NO_NEW_PRIVS, 1)\n"
            "s.install_filter(f.build_filter(f.main_rules(os.getpid())))\n"
            "print('filtered', flush=True)\n"
            "t = threading.Thread(target=ctypes.CDLL(None).syscall, args=(0x40000000 | 39,))\n"
            "t.start(); t.join()\n"   # x32 getpid, in a thread: the process must die
            "print('survived', flush=True)\n")
    prefix = [sys.executable, "-c", AS_UNDER_SYSTEMD] if under_systemd else []
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == -signal.SIGSYS and out.stdout == "filtered\n", out


def test_landlock_rights_are_all_the_kernel_knows():
    """The kernel rejects rights it does not know: ours for its ABI are
    accepted, one more bit is not -- so we handle every right there is."""
    abi = sandbox.landlock_abi()
    if abi < 7:
        pytest.skip(f"Landlock ABI {abi}")
    attr = ffi.new("struct landlock_ruleset_attr *")

    def create(fs: int, net: int, scoped: int) -> int:
        attr.handled_access_fs, attr.handled_access_net, attr.scoped = fs, net, scoped
        try:
            fd = sandbox.syscall("landlock_create_ruleset", attr, 24, 0)
        except OSError as e:
            return e.errno
        os.close(fd)
        return 0

    fs = sandbox.landlock_fs_rights(abi)
    assert create(fs, 3, 3) == 0
    assert create(fs | fs + 1, 3, 3) == 22  # EINVAL
    assert create(fs, 7, 3) == 22
    assert create(fs, 3, 7) == 22
    assert [sandbox.landlock_fs_rights(a) for a in range(1, 8)] == \
        [0x1FFF, 0x3FFF, 0x7FFF, 0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF]


def test_network_links_agree_with_ip_link():
    """The netns check's view of the links (no netlink) is `ip link`'s."""
    code = "from gcroots.helper import sandbox as s; print(sorted(s.network_links()))"
    ip = "ip -o link | awk '{sub(/:$/, \"\", $2); sub(/@.*/, \"\", $2); print $2, ($3 ~ /[<,]UP[,>]/)}'"
    for setup in ("", "ip link set lo up && "):
        out = subprocess.run(["unshare", "-n", "sh", "-c", setup + f'exec "{sys.executable}" -c '
                              f'"{code}"'], capture_output=True, text=True, check=True).stdout
        assert out.strip() == f"[('lo', {bool(setup)})]"
    links = subprocess.run(["sh", "-c", ip], capture_output=True, text=True, check=True).stdout
    want = sorted((name, up == "1") for name, up in (line.split() for line in links.splitlines()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(want)


OVERSIZED = r"""
import errno, os
from gcroots.helper import sandbox, seccomp_filters
from gcroots.helper._ffi import ffi
from gcroots.helper.scan import ScanError, Scanner
from gcroots.layout import StoreLayout
sandbox.MAX_ANSWER = 100      # the reader (forked below) answers nothing bigger
program = seccomp_filters.build_filter(seccomp_filters.reader_rules())
r = sandbox.ProcReader.start(program, b"/usr")   # "/usr" as the store: maps kept
for _ in range(2):            # and lives on: every answer the same
    print(r(b"/proc/%d" % os.getpid()))
try:
    list(Scanner(StoreLayout.make(), proc_reader=r).scan())
except ScanError as e:
    print("scan failed:", e)
"""


def test_an_oversized_reader_answer_fails_the_scan_not_the_reader():
    out = subprocess.run([sys.executable, "-c", OVERSIZED], capture_output=True, text=True,
                         timeout=60)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["[(b'fd', OSError(90, 'Message too long'))]"] * 2, out
    assert lines[2].startswith("scan failed: cannot read '/proc/") and "errno 90" in lines[2], out


def test_reader_answer_sends_a_repeated_target_once():
    """Half a million fds on one long store path must not make the reader's
    answer (every fd/N label kept) grow with the path's length each time."""
    target = b"/nix/store/" + b"a" * 32 + b"-x/" + b"f" * 3000
    items = [(b"exe", OSError(errno.EACCES, "denied"))]
    items += [(b"fd/%d" % n, target) for n in range(20000)] + [(b"maps", b""), (b"environ", b"")]
    payload = sandbox._encode_items(items)
    assert len(payload) < 20000 * 30 + 4000
    decoded = sandbox._decode_items(payload, b"/proc/1", b"environ")
    assert [n for n, _ in decoded] == [n for n, _ in items]
    assert all(v == target for n, v in decoded if n.startswith(b"fd/"))
    assert isinstance(decoded[0][1], OSError) and decoded[-1] == (b"environ", b"")
    bad = sandbox._encode_items([(b"fd/1", target), (b"fd/2", target), (b"fd", OSError(5, "x"))])
    with pytest.raises(OSError, match="malformed"):  # a reference forward, not back
        sandbox._decode_items(bad.replace(struct.pack("=iI", -1, 0), struct.pack("=iI", -1, 5)),
                              b"/proc/1", b"environ")


def _reader_answering(*answers: bytes) -> sandbox.ProcReader:
    """A ProcReader whose peer (the test, on a real socket pair) has already
    sent its seccomp status and then `answers`, one frame each."""
    ours, theirs = socket.socketpair()
    for payload in (b"ok", *answers):
        sandbox._send_frame(theirs, payload)
    reader = sandbox.ProcReader(ours, os.getpid())
    reader._peer = theirs   # kept open: no EOF before the answers are read
    return reader


@pytest.mark.parametrize("items", [[], [(b"exe", b"/nix/store/x")], [(b"maps", b"")],
                                   [(b"fd/1", b"/nix/store/x"), (b"maps", b"")]])
def test_a_reader_answer_that_is_not_a_whole_process_fails_the_scan(items):
    """An answer cut before environ (an empty one above all), whatever made
    the reader send it, must never pass for "this process holds no roots":
    it breaks the reader, and every later call fails too."""
    reader = _reader_answering(sandbox._encode_items(items),
                               sandbox._encode_items([(b"maps", b""), (b"environ", b"")]))
    with pytest.raises(OSError, match="not a whole process"):
        reader(b"/proc/1")
    with pytest.raises(OSError, match="the /proc reader is gone"):
        reader(b"/proc/1")


@pytest.mark.parametrize("items, cmdline", [
    ([(b"maps", b""), (b"environ", b"")], False),
    ([(b"maps", b""), (b"environ", b""), (b"cmdline", b"")], True),
    ([(b"exe", b"/nix/store/x"), (b"fd", OSError(errno.EACCES, "denied"))], False)])
def test_a_whole_process_answer_passes(items, cmdline):
    reader = _reader_answering(sandbox._encode_items(items))
    assert [n for n, _ in reader(b"/proc/1", cmdline)] == [n for n, _ in items]


@pytest.mark.parametrize("command", [["scan", "--no-runtime"], ["serve", "--socket", "SOCK"],
                                     ["serve", "--socket", "SOCK", "--require-sandbox"]])
def test_without_libseccomp_the_helper_refuses_in_one_line(scratch, command):
    """libseccomp supplies the system call numbers every raw call uses (caps,
    Landlock, seccomp): without it each command refuses at once, in one line
    naming the library, before listening or scanning."""
    lib = libseccomp_file()
    sock = scratch / "helper.sock"
    argv = " ".join(str(sock) if a == "SOCK" else a for a in command)
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind /dev/null {lib} && "
                          f"exec {HELPER} {argv} --root {scratch}"], capture_output=True,
                         timeout=30)
    assert out.returncode == 1 and out.stdout == b"", out
    assert re.fullmatch(rb"gcroots-helper: cannot load libseccomp\.so\.2 \(install libseccomp2\): "
                        rb"[^\n]*\n", out.stderr), out.stderr
    assert not sock.exists()


def libseccomp_file() -> str:
    """The real file libseccomp.so.2 resolves to, as the dynamic loader finds it."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    path = re.search(r"libseccomp\.so\.2 \([^)]*\) => (\S+)", out)[1]
    return os.path.realpath(path)


def test_serve_without_proc_refuses_in_one_line(scratch):
    """With no /proc, the helper cannot read its capabilities: unknown
    counts as lacking (it refuses to start), said in one line, never a
    traceback."""
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs none /proc && exec "$0" serve --socket "$1"',
                          HELPER, str(scratch / "s.sock")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert "refusing to start" in out.stderr and "/proc/thread-self/status" in out.stderr
    assert not (scratch / "s.sock").exists()


@pytest.mark.parametrize("flag", ["--root=", "--socket=", "--nix-roots-daemon-socket=",
                                  "--allow-user="])
def test_serve_refuses_an_empty_value_as_a_usage_error(scratch, flag):
    """An empty value is a typo, not a setting: --root '' would mean the
    host's /, --socket= no socket at all."""
    out = subprocess.run([HELPER, "serve", "--socket", str(scratch / "s.sock"), flag],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("must not be empty"), out.stderr
    assert not (scratch / "s.sock").exists()


@pytest.mark.parametrize("command", ["serve", "scan", "sandbox-check"])
def test_an_unknown_sandbox_layer_to_skip_is_a_usage_error(store, scratch, command):
    """A typo in --sandbox-skip names the flag and the layers (exit 2), for
    every command, before anything is bound or read."""
    extra = ["--socket", str(scratch / "s.sock")] if command == "serve" else []
    out = subprocess.run([HELPER, command, "--root", str(store), *extra,
                          "--sandbox-skip", "landlock,seccom"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.strip().splitlines()[-1].endswith(
        "--sandbox-skip: unknown layer 'seccom' (layers: netns, caps, no_new_privs, landlock, "
        "seccomp)"), out.stderr
    assert not (scratch / "s.sock").exists()
