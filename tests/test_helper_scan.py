"""gcroots-helper scan against the real Nix 2.8 (the oracle)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from gcroots.layout import StoreLayout
from gcroots.protocol.rootstream import Root

from . import support
from .support import HELPER, lines, nix_roots, tree_snapshot


def helper_scan(root: Path | str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [HELPER, "scan", "--root", str(root), *args]
    return subprocess.run(cmd, capture_output=True, check=check)


def our_roots(root, *args) -> bytes:
    """Our `scan` output, raw: compared byte for byte with Nix's."""
    return helper_scan(root, "--no-runtime", *args).stdout


def valid_paths(root: Path) -> list[str]:
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT path FROM ValidPaths ORDER BY id")]
    finally:
        db.close()


def private_homes(root: Path) -> None:
    """Give the generator's users' homes to real users, mode 0700."""
    for home, user in (("alice", support.ALICE), ("bob", support.BOB)):
        support.chown_tree(root / "home" / home, user, 0o700)


@pytest.mark.parametrize("seed,paths", [(1, 1000), (2, 1000), (3, 1000), (4, 10000)])
def test_scan_equals_nix_print_roots(scratch, users, seed, paths):
    root = scratch / "store"
    support.make_store(root, paths=paths, seed=seed, quirks=2, roots=200 if paths > 1000 else 50,
                       indirect=40, stale=5)
    private_homes(root)
    before = tree_snapshot(root)
    ours = our_roots(root)
    assert tree_snapshot(root) == before, "the helper modified the tree"
    theirs = nix_roots(root)
    assert ours == theirs
    # The indirect roots in the 0700 homes are among them.
    assert b"/home/alice/" in ours and b"/home/bob/" in ours


def test_helper_without_its_capabilities_refuses_to_scan(scratch, users):
    """Why the helper needs its privilege: an ordinary user cannot see the
    indirect roots in 0700 homes, and Nix 2.8 would skip them (EACCES) and
    call their paths garbage.  The helper refuses to scan at all, in one line."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=5, indirect=10, stale=0, quirks=0)
    private_homes(root)
    unpriv = subprocess.run(["runuser", "-u", support.DAEMON_USER, "--", HELPER, "scan", "--root",
                             str(root), "--no-runtime", "--all-candidates"], capture_output=True)
    assert unpriv.returncode == 1 and unpriv.stdout == b""
    assert unpriv.stderr.count(b"\n") == 1, unpriv.stderr
    assert b"lacks CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE" in unpriv.stderr


# Root in a user namespace of its own: every capability, but none over files
# of users outside it -- what root meets on NFS with root_squash.
SQUASHED = ["unshare", "--user", "--map-root-user"]


def test_unreadable_root_fails_the_scan_unless_accepted(scratch, users):
    """EACCES where a root leads fails the scan, naming the path and the
    likely causes (Nix 2.8 skips it); an operator may accept it for named
    prefixes, and then the scan goes on without those roots, warning."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=5, indirect=10, stale=0, quirks=0)
    private_homes(root)
    full = our_roots(root)
    homes = [b"%s/home/%s" % (os.fsencode(root), h) for h in (b"alice", b"bob")]
    assert all(h in full for h in homes)
    cmd = [*SQUASHED, HELPER, "scan", "--root", str(root), "--no-runtime"]
    squashed = subprocess.run(cmd, capture_output=True)
    assert squashed.returncode == 1 and squashed.stdout == b""
    err = squashed.stderr.decode()
    assert "Permission denied" in err and "/home/" in err and "NFS with root_squash" in err
    half = subprocess.run([*cmd, "--accept-unreadable", os.fsdecode(homes[0])], capture_output=True)
    assert half.returncode == 1 and b"/home/bob/" in half.stderr  # alice's accepted, not bob's
    # Spelled with a trailing slash, or a leading "//" (normpath keeps that:
    # the prefix then matched nothing and the scan still failed).
    both = subprocess.run([*cmd, "--accept-unreadable", os.fsdecode(homes[0]) + "/",
                           "--accept-unreadable", "/" + os.fsdecode(homes[1])],
                          capture_output=True)
    assert both.returncode == 0, both.stderr
    assert lines(both.stdout) == {x for x in lines(full) if not any(h in x for h in homes)}
    assert b"warning: " in both.stderr and b"Permission denied" in both.stderr


def test_helper_in_a_user_namespace_refuses_a_runtime_scan(scratch, users):
    """Root in a user namespace (systemd PrivateUsers=yes, unshare --user)
    holds every capability by capget, yet none over other users'
    processes: their /proc/PID/environ, maps, exe were EACCES and skipped
    silently (fd with a warning), and the scan reported complete without
    their runtime roots -- here a path alice's process names in its
    environment, which gc would then delete.  Now the runtime scan refuses
    up front; a scan without runtime roots still works (files that are
    EACCES there fail it, see above)."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=5, roots=5)
    sp = [p for p in valid_paths(root) if p not in our_roots(root).decode()][0]
    pw = users[support.ALICE]
    alice = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                              "--clear-groups", "env", f"GCROOTS_TEST={sp}", "sleep", "120"])
    try:
        while open(f"/proc/{alice.pid}/comm").read().strip() != "sleep":
            pass   # setpriv and env exec: then it is the sleep holding the environment
        cmd = [HELPER, "scan", "--root", str(root), "--all-candidates"]
        assert sp.encode() in subprocess.run(cmd, capture_output=True, check=True).stdout
        squashed = subprocess.run([*SQUASHED, *cmd], capture_output=True)
        assert squashed.returncode == 1 and squashed.stdout == b"", squashed
        assert squashed.stderr.count(b"\n") == 1, squashed.stderr
        assert b"runs in a user namespace (e.g. systemd PrivateUsers=yes" in squashed.stderr
        static = subprocess.run([*SQUASHED, *cmd, "--no-runtime"], capture_output=True)
        assert static.returncode == 0 and static.stdout == our_roots(root, "--all-candidates")
    finally:
        alice.kill()
        alice.wait()


def test_stale_links_reported_not_removed(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=6, indirect=5, stale=4, quirks=0)
    auto = root / "nix/var/nix/gcroots/auto"
    before = sorted(os.listdir(auto))
    out = helper_scan(root, "--no-runtime")
    assert sorted(os.listdir(auto)) == before
    assert out.stderr.count(b"stale link: ") == 4
    nix_roots(root)  # Nix removes them as a side effect of scanning
    assert len(os.listdir(auto)) == len(before) - 4


def _hostile_tree(root: Path, users) -> None:
    gc = root / "nix/var/nix/gcroots"
    valid = valid_paths(root)
    h = gc / "hostile"
    h.mkdir()
    hb = os.fsencode(h)
    sp, sp2, sp3 = valid[0], valid[1], valid[2]
    base = os.path.basename(sp)
    os.symlink("loop2", h / "loop1")
    os.symlink("loop1", h / "loop2")
    os.symlink("self", h / "self")
    os.symlink("..", h / "up")
    os.symlink("/", h / "slash")
    os.mkfifo(h / base)                         # a FIFO named like a store path
    with contextlib.chdir(h):  # a socket named like a store path (relative: sun_path is short)
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.basename(sp2))
        s.close()
    os.mknod(h / os.path.basename(sp3), 0o600 | 0o020000, os.makedev(1, 3))  # a char device
    os.symlink(sp, hb + b"/weird\nname\xff\x01")  # newline and invalid UTF-8
    os.symlink(sp2, hb + b"\xc3\x28")
    os.symlink("/nonexistent/x", h / "dangling")
    os.symlink(sp + "/sub/../../../etc", h / "subpath-dotdot")
    os.symlink(sp + "/", h / "trailing-slash")
    os.symlink("/nix/store//" + base, h / "double-slash")
    os.symlink("/nix/storex/" + base, h / "storex")
    os.symlink("/nix/store/" + "e" * 32 + "-bad-hash", h / "bad-hash")
    os.symlink("/nix/store/" + base[:32] + "-bad name", h / "bad-name")
    (h / "sub").mkdir()
    os.symlink(sp3, h / "sub" / "target")
    os.symlink("../sub/target", h / "sub" / "relative-indirect")
    os.symlink("sub/target", h / "relative-indirect2")
    os.symlink(str(h / "sub"), h / "dir-link")       # symlinked dir: not entered
    (h / ("a" * 32 + "-not-valid")).write_bytes(b"")  # well-formed name, not valid
    (h / base.replace(base[0], "e", 1)).write_bytes(b"")  # bad hash char
    (h / os.path.basename(sp2)).with_suffix(".x").write_bytes(b"")
    (h / "empty").mkdir()
    nested = h / "nested"
    d = nested
    for i in range(60):
        d = d / f"l{i}"
    d.mkdir(parents=True)
    os.symlink(sp3, d / "deep-root")
    # a user's own per-user dir with a root owned by them
    pu = gc / "per-user" / support.ALICE
    pu.mkdir(parents=True)
    os.symlink(valid[3], pu / "mine")
    support.chown_tree(pu, support.ALICE)
    # auto links to odd targets
    auto = gc / "auto"
    os.symlink(str(h / "loop1"), auto / "to-loop")
    os.symlink(str(h / "empty"), auto / "to-dir")
    os.symlink(str(h / "nope" / "x"), auto / "stale-enoent")
    os.symlink(hb + b"/weird\nname\xff\x01", os.fsencode(auto / "to-weird"))


def test_hostile_tree_equals_nix(scratch, users):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=7, roots=10, indirect=3, stale=1, quirks=1)
    _hostile_tree(root, users)
    before = tree_snapshot(root)
    out = helper_scan(root, "--no-runtime")
    assert tree_snapshot(root) == before
    ours = out.stdout
    assert ours == nix_roots(root)
    assert b"/hostile/weird\nname\xff\x01 -> /nix/store/" in ours
    assert b"/deep-root -> " in ours
    assert b"dir-link" not in ours and b"loop" not in ours


def nest(root: Path, levels: int) -> None:
    """gcroots/d/d/.../d (`levels` deep), a root at the bottom; made fd by fd
    (the full path may be longer than PATH_MAX)."""
    d = os.open(root / "nix/var/nix/gcroots", os.O_RDONLY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=d)
        nd = os.open("d", os.O_RDONLY, dir_fd=d)
        os.close(d)
        d = nd
    os.symlink(valid_paths(root)[0], "deep", dir_fd=d)
    os.close(d)


def _low_fd_limit() -> None:
    # A soft limit of 256 (systems often say 1024): the helper must raise it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


SANDBOX = pytest.mark.parametrize("sandbox", [(), ("--require-sandbox",)],
                                  ids=["plain", "sandboxed"])


@SANDBOX
def test_a_thousand_levels_deep_is_walked_like_nix(scratch, sandbox):
    """Any user can nest directories in their gcroots/per-user/$USER: Nix
    walks them to PATH_MAX, and so must we (no depth limit of our own, no
    recursion limit, one fd per level under a low soft fd limit)."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=8, roots=5, indirect=0, stale=0, quirks=0)
    nest(root, 1000)
    out = subprocess.run([HELPER, "scan", "--root", str(root), "--no-runtime", *sandbox],
                         capture_output=True, preexec_fn=_low_fd_limit)
    assert out.returncode == 0, out.stderr[-2000:]
    assert b"/d/d/deep -> /nix/store/" in out.stdout
    assert out.stdout == nix_roots(root)


@SANDBOX
def test_deep_nesting_past_path_max_fails_closed(scratch, sandbox):
    """10,000 levels: no crash, no fd exhaustion, no silent skip -- the scan
    fails with a clear error once a path would pass PATH_MAX, as Nix 2.8
    fails (ENAMETOOLONG)."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=8, roots=5, indirect=0, stale=0, quirks=0)
    nest(root, 10_000)
    out = helper_scan(root, "--no-runtime", *sandbox, check=False)
    assert out.returncode == 1
    assert b"scan failed: path " in out.stderr and b"longer than PATH_MAX" in out.stderr
    assert out.stdout == b""
    assert support.oracle(root, "nix-store", "--gc", "--print-roots", check=False).returncode != 0


@pytest.mark.parametrize("length", [4095, 4096])
def test_path_max_is_where_nix_stops_too(scratch, length):
    """A link whose full path is 4095 bytes (4096 with its NUL) is a root for
    both; one byte more and both fail."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=8, roots=5, indirect=0, stale=0, quirks=0)
    path = os.fsencode(root / "nix/var/nix/gcroots")
    while length - len(path) > 250:
        path += b"/" + b"n" * 200
    os.makedirs(path)
    fd = os.open(path, os.O_RDONLY)
    name = b"l" * (length - len(path) - 1)
    os.symlink(valid_paths(root)[0], name, dir_fd=fd)
    os.close(fd)
    assert len(path + b"/" + name) == length
    ours = helper_scan(root, "--no-runtime", check=False)
    theirs = support.oracle(root, "nix-store", "--gc", "--print-roots", check=False)
    if length < 4096:
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert path + b"/" + name + b" -> " in ours.stdout
        assert ours.stdout == nix_roots(root)
    else:
        assert theirs.returncode != 0 and b"File name too long" in theirs.stderr
        assert ours.returncode == 1 and b"longer than PATH_MAX" in ours.stderr


def test_hundred_thousand_entries_in_one_dir_bounded_memory(scratch):
    root = scratch / "store"
    support.make_store(root, paths=200, seed=9, roots=5, indirect=0, stale=0, quirks=0)
    valid = valid_paths(root)
    baseline = len(lines(our_roots(root)))
    big = root / "nix/var/nix/gcroots/big"
    big.mkdir()
    fd = os.open(big, os.O_RDONLY)
    for i in range(100_000):
        os.symlink(valid[i % len(valid)], f"r{i}", dir_fd=fd)
    os.close(fd)
    from gcroots.helper.scan import Scanner
    layout = StoreLayout.make(root=os.fsencode(root))
    tracemalloc.start()
    count = 0
    for rec in Scanner(layout, runtime=False).scan():
        count += isinstance(rec, Root)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count >= 100_000
    assert peak < 4 << 20, f"scanning 100k entries peaked at {peak} bytes"
    ours = our_roots(root)
    assert len(lines(ours)) == baseline + 100_000
    assert ours == nix_roots(root)


def test_protected_symlinks_are_read_not_followed(scratch, users):
    """A user's `result` link in a sticky world-writable dir: with
    fs.protected_symlinks=1 even root may not follow it, but reading it with
    readlink is fine -- and that is all the helper does."""
    root = scratch / "store"
    support.make_store(root, paths=200, seed=10, roots=5, indirect=0, stale=0, quirks=0)
    sp = valid_paths(root)[5]
    sticky = scratch / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    support.as_user(support.ALICE, "import os,sys; os.symlink(sys.argv[1], sys.argv[2])",
                    sp, str(sticky / "result")).check_returncode()
    os.symlink(str(sticky / "result"), root / "nix/var/nix/gcroots/auto/sticky")
    sysctl = Path("/proc/sys/fs/protected_symlinks")
    old = sysctl.read_text()
    sysctl.write_text("1")
    try:
        with pytest.raises(PermissionError):
            os.stat(sticky / "result")  # following is refused, even for root
        ours = our_roots(root)
        assert f"{sticky}/result -> {sp}".encode() in ours
        assert ours == nix_roots(root)
    finally:
        sysctl.write_text(old)


HOLDER = r"""
import mmap, os, sys, time
cwd, fd_file, mmap_file = sys.argv[1:4]
os.chdir(cwd)
f = open(fd_file, "rb")
f2 = open(fd_file, "rb")  # two fds, one target: Nix prints both labels
g = open(mmap_file, "rb")
m = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
g.close()
print("ready", flush=True)
time.sleep(600)
"""


def test_runtime_roots_on_real_nix_match_nix(scratch):
    """A process holding store paths as cwd, open fd, mapping and in its
    environment: every one found, labelled as Nix labels it."""
    src = scratch / "src"
    added = []
    for i, kind in enumerate(["cwd", "fd", "mmap", "env"]):
        d = src / f"gcroots-test-{kind}"
        d.mkdir(parents=True)
        (d / "data").write_bytes(f"gcroots runtime test {kind} {os.getpid()}\n".encode() * 64)
        added.append(support.oracle("/", "nix-store", "--add", str(d)).stdout.strip().decode())
    cwd, fd_path, mmap_path, env_path = added
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, cwd, fd_path + "/data", mmap_path + "/data"],
        stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "GCR_TEST": env_path + "/data"})
    try:
        assert holder.stdout.readline() == b"ready\n"
        prefix = f"/proc/{holder.pid}/".encode()
        ours = {x for x in lines(helper_scan("/").stdout) if x.startswith(prefix)}
        theirs = {x for x in lines(nix_roots("/", with_proc=True)) if x.startswith(prefix)}
        assert ours == theirs
        labels = {x.split(b" -> ")[0][len(prefix):] for x in ours}
        assert b"cwd" in labels and b"maps" in labels and b"environ" in labels
        fd_lines = [x for x in ours if x.split(b" -> ")[0][len(prefix):].startswith(b"fd/")]
        assert sum(x.endswith(b" -> " + fd_path.encode()) for x in fd_lines) == 2
        assert {x.split(b" -> ")[1].decode() for x in ours} == set(added)
    finally:
        holder.kill()
        holder.wait()


def test_cmdline_is_opt_in(scratch):
    sp = support.oracle("/", "nix-store", "--add", str(_mkfile(scratch, "cmdline"))).stdout.strip()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sp.decode()])
    try:
        label = f"/proc/{p.pid}/cmdline -> ".encode() + sp
        assert label not in lines(helper_scan("/").stdout)
        assert label in lines(helper_scan("/", "--cmdline").stdout)
    finally:
        p.kill()
        p.wait()


def _mkfile(scratch: Path, name: str) -> Path:
    f = scratch / f"gcroots-test-{name}"
    f.write_text(f"{name} {os.getpid()}\n")
    return f


def test_scan_refuses_missing_db(scratch):
    root = scratch / "empty"
    (root / "nix/var/nix/gcroots").mkdir(parents=True)
    out = helper_scan(root, "--no-runtime", check=False)
    assert out.returncode == 1
    assert b"no Nix database" in out.stderr


def test_scan_does_not_create_sqlite_side_files(scratch):
    root = scratch / "store"
    support.make_store(root, paths=100, seed=11, roots=5, indirect=0, stale=0, quirks=0)
    db_dir = root / "nix/var/nix/db"
    before = sorted(os.listdir(db_dir))
    helper_scan(root, "--no-runtime")
    assert sorted(os.listdir(db_dir)) == before


def test_proc_errors_in_unexpected_places_fail_the_scan(monkeypatch, scratch):
    """Only ENOENT/ESRCH/EACCES are skipped in /proc; e.g. EIO fails."""
    from gcroots.helper import scan as scan_mod
    layout = StoreLayout.make(root=os.fsencode(scratch))
    real = os.readlink

    def failing_readlink(path, *a, **kw):
        if isinstance(path, bytes) and path.endswith(b"/exe"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *a, **kw)

    monkeypatch.setattr(scan_mod.os, "readlink", failing_readlink)
    with pytest.raises(scan_mod.ScanError, match="Input/output error"):
        list(scan_mod.Scanner(layout, runtime=True).scan())


def test_hidden_home_directories_fail_the_scan(scratch):
    """If the helper's view hides /home (systemd ProtectHome=yes or tmpfs),
    every `result` link in a home would look stale and its paths garbage:
    the scan refuses.  A read-only view of the same /home is fine."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=12, roots=5, indirect=0, stale=0, quirks=0)
    scan = f"exec {HELPER} scan --root {root} --no-runtime"
    hidden = subprocess.run([*hiding("/home", root), HELPER, "scan", "--root", str(root),
                             "--no-runtime"], capture_output=True)
    assert hidden.returncode == 1, hidden.stderr
    assert b"directories are hidden from the helper (/home" in hidden.stderr
    read_only = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount --bind /home /home && mount -o remount,ro,bind /home "
                                f"&& {scan}"], capture_output=True)
    assert read_only.returncode == 0, read_only.stderr
    assert read_only.stdout == our_roots(root)


# DIR KEEP... -- COMMAND...: in a mount namespace of its own, a fresh tmpfs
# over DIR (what systemd's PrivateTmp=yes or ProtectHome=tmpfs amount to),
# then each KEEP that lived in DIR bound back in (through an fd opened
# before: its path is gone by then) -- so that only the rest is out of sight.
_HIDE = r"""
dir=$1; shift; kept=()
while [ "$1" != -- ]; do exec {fd}<"$1"; kept+=("$fd:$1"); shift; done; shift
mount -t tmpfs tmpfs "$dir" || exit
for k in "${kept[@]}"; do
  fd=${k%%:*}; mkdir -p "${k#*:}" && mount --no-canonicalize --bind "/proc/self/fd/$fd" "${k#*:}" || exit
  exec {fd}<&-
done
exec "$@"
"""


def hiding(directory: str, *keep: Path) -> list[str]:
    """The command prefix that runs a command with `directory` hidden but
    for `keep` and this checkout (its venv runs the helper), wherever the
    checkout lives -- under /tmp or /home too."""
    inside = sorted({str(k) for k in (*keep, support.REPO)
                     if str(k).startswith(directory.rstrip("/") + "/")}, key=len)
    return ["unshare", "-m", "--propagation", "private", "bash", "-c", _HIDE, "bash", directory,
            *inside, "--"]


def test_hidden_tmp_fails_the_scan(scratch):
    """`nix-build -o /tmp/ci-job/result`: gcroots/auto/X -> /tmp/ci-job/result
    -> a store path.  A helper that sees another /tmp (PrivateTmp=yes) would
    call the link stale and its path garbage: it refuses to scan.  With the
    real /tmp the same scan finds the root, as Nix does."""
    root = scratch / "store"
    support.make_store(root, paths=40, seed=13, roots=2, indirect=0, stale=0, quirks=0)
    sp = valid_paths(root)[3]
    job = scratch / "ci-job"
    job.mkdir()
    os.symlink(sp, job / "result")
    auto = root / "nix/var/nix/gcroots/auto"
    auto.mkdir(exist_ok=True)
    os.symlink(job / "result", auto / ("0" * 32))
    scan = [HELPER, "scan", "--root", str(root), "--no-runtime"]
    hidden = subprocess.run([*hiding("/tmp", root), *scan], capture_output=True)
    assert hidden.returncode == 1, hidden.stderr
    assert b"directories are hidden from the helper (/tmp:" in hidden.stderr
    assert b"PrivateTmp" in hidden.stderr and b"stale link" not in hidden.stderr
    # Any fresh tmpfs that hides what init sees, not only over the usual places.
    over_job = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs tmpfs "{job}" && exec "$@"', "sh", *scan],
                              capture_output=True)
    assert over_job.returncode == 1, over_job.stderr
    assert f"directories are hidden from the helper ({job}:".encode() in over_job.stderr
    visible = subprocess.run(["unshare", "-m", "--propagation", "private", *scan],
                             capture_output=True)
    assert visible.returncode == 0, visible.stderr
    assert f"{job}/result -> {sp}\n".encode() in visible.stdout
    assert visible.stdout == our_roots(root) == nix_roots(root)



def test_unknown_view_counts_as_hidden(tmp_path):
    """Without PID 1's mounts to compare with, the helper cannot know that
    it sees the real /tmp and homes: it assumes it does not (fail closed)."""
    from gcroots.helper.prepare import WATCHED_DIRS, hidden_dirs
    assert hidden_dirs(os.fsencode(tmp_path)) == sorted(WATCHED_DIRS)
    assert hidden_dirs() == []  # this test runs in init's view

BIG_HOLDER = r"""
import ctypes, os, resource, sys, time
long_file, store_file, maps, fds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long)
fd = os.open(long_file, os.O_RDONLY)
for _ in range(maps):   # PROT_READ, MAP_PRIVATE; offset 0 each time: no merging
    assert libc.mmap(None, 4096, 1, 2, fd, 0) not in (None, ctypes.c_void_p(-1).value)
held = [os.dup(fd) for _ in range(fds)]
store = os.open(store_file, os.O_RDONLY)
assert libc.mmap(None, 4096, 1, 2, store, 0) not in (None, ctypes.c_void_p(-1).value)
print("ready", flush=True)
time.sleep(600)
"""


def _long_file(scratch: Path) -> str:
    """A 4 KiB file at a path of ~4000 bytes, not in the store."""
    d = scratch / "long"
    while len(str(d)) < 3700:
        d = d / ("x" * 250)
    d.mkdir(parents=True)
    f = d / ("f" * (4000 - len(str(d)) - 1))
    f.write_bytes(b"x" * 4096)
    assert len(str(f)) == 4000
    return str(f)


def _hold(scratch: Path, maps: int, fds: int) -> tuple[subprocess.Popen, str]:
    data = scratch / "gcroots-test-big-holder"
    data.mkdir()
    (data / "data").write_bytes(f"big holder {os.getpid()} {maps} {fds}\n".encode() * 256)
    sp = support.oracle("/", "nix-store", "--add", str(data)).stdout.strip().decode()
    holder = subprocess.Popen([sys.executable, "-c", BIG_HOLDER, _long_file(scratch),
                               sp + "/data", str(maps), str(fds)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"ready\n"
    return holder, sp


# Forks and execs the helper from a small process: a child's peak RSS counts
# the memory of the process it was forked from (pytest's, were it ours).
RSS_PROBE = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\npeak-rss-kib {usage.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _scan_with_rss(*args: str) -> tuple[int, bytes, bytes, int]:
    """(exit code, stdout, stderr, the helper's peak RSS in KiB)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, HELPER, "scan", *args],
                         capture_output=True, timeout=300)
    err, _, peak = out.stderr.rpartition(b"\npeak-rss-kib ")
    return out.returncode, out.stdout, err, int(peak)


@SANDBOX
def test_maps_over_64_mib_are_read_not_refused(scratch, sandbox):
    """vm.max_map_count (65530) maps of a long path make /proc/PID/maps far
    bigger than any fixed limit; Nix reads it.  So do we, keeping only the
    lines that name the store: the mapped store path is found, with Nix's
    label, and the scan succeeds."""
    holder, sp = _hold(scratch, maps=18_000, fds=0)
    try:
        with open(f"/proc/{holder.pid}/maps", "rb") as f:
            assert sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b"")) > 64 << 20
        rc, out, err, _ = _scan_with_rss("--root", "/", *sandbox)
        assert rc == 0, err[-2000:]
        assert f"/proc/{holder.pid}/maps -> {sp}\n".encode() in out
    finally:
        holder.kill()
        holder.wait()


@SANDBOX
def test_many_fds_to_a_long_path_keep_memory_small(scratch, sandbox):
    """19,000 fds of a 4 KiB non-store path (~78 MB of link targets): only
    targets in the store are kept, so the helper stays small -- and the one
    fd into the store is still found."""
    holder, sp = _hold(scratch, maps=0, fds=19_000)
    try:
        assert len(os.listdir(f"/proc/{holder.pid}/fd")) > 19_000
        rc, out, err, peak_kib = _scan_with_rss("--root", "/", *sandbox)
        assert rc == 0, err[-2000:]
        assert re.search(rb"\n/proc/%d/fd/\d+ -> %s\n" % (holder.pid, sp.encode()), b"\n" + out)
        assert peak_kib < 64 << 10, f"the helper peaked at {peak_kib} KiB"
    finally:
        holder.kill()
        holder.wait()


def test_proc_files_keep_only_what_names_the_store(monkeypatch, tmp_path):
    """read_filtered keeps, chunk by chunk, what can hold a store path: the
    regex finds exactly what it finds in the whole file, whatever the chunk
    size; past MAX_KEPT of that it refuses (EFBIG), it never truncates."""
    from gcroots.helper import scan as scan_mod
    from gcroots.helper.scan import environ_regex
    sp = b"/nix/store/" + b"a" * 32 + b"-x"
    environ = (b"A=1\0B=" + b"y" * 5000 + b"\0PATH=/bin:" + sp + b"/bin:/nix/store/nix/store/"
               + sp + b"\0C=/nix/stor\0D=" + b"z" * 3000 + sp + b"\0E=" + sp)
    f = tmp_path / "environ"
    f.write_bytes(environ)
    env_re = environ_regex(b"/nix/store")
    whole = env_re.findall(environ)
    assert len(whole) == 5
    for chunk in (1, 3, 7, 10, 64, 1 << 20):
        monkeypatch.setattr(scan_mod, "CHUNK", chunk)
        kept = scan_mod.read_filtered(os.fsencode(f), b"\0", b"/nix/store", True)
        assert env_re.findall(kept) == whole, chunk
        assert len(kept) < 300   # of ~8,300
    maps = b"".join(b"7f00-7f01 r--p 0 00:00 1 /long/" + b"q" * 300 + b"\n" for _ in range(50))
    f.write_bytes(maps + b"7f02-7f03 r--p 0 00:00 1 " + sp + b"/lib/x.so\n" + maps)
    monkeypatch.setattr(scan_mod, "CHUNK", 100)
    assert scan_mod.read_filtered(os.fsencode(f), b"\n", b"/nix/store", False) == \
        b"7f02-7f03 r--p 0 00:00 1 " + sp + b"/lib/x.so"
    monkeypatch.setattr(scan_mod, "MAX_KEPT", 40)
    with pytest.raises(OSError) as e:
        scan_mod.read_filtered(os.fsencode(f), b"\n", b"/nix/store", False)
    assert e.value.errno == errno.EFBIG


@pytest.mark.parametrize("args,message", [
    (("--store-dir", "nix/store"), b"argument --store-dir: not an absolute path: 'nix/store'"),
    (("--state-dir", "var/nix"), b"argument --state-dir: not an absolute path: 'var/nix'"),
    (("--store-dir", "//"), b"error: the store dir cannot be /"),
])
@pytest.mark.parametrize("command", ["scan", "serve", "sandbox-check"])
def test_bad_layout_flags_are_usage_errors(command, args, message):
    out = subprocess.run([HELPER, command, *args, "--socket", "/nonexistent/x.sock"]
                         if command == "serve" else [HELPER, command, *args],
                         capture_output=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and b"usage: gcroots-helper " + command.encode() in out.stderr
    assert b"Traceback" not in out.stderr


def test_a_mount_below_home_that_the_helper_lacks_counts_as_hidden(scratch):
    """init has a file system mounted below /home (a home of its own) that
    the helper's view lacks: links there would look stale.  The helper and
    the standalone scan both refuse."""
    home = Path("/home/gcroots-test-mounted")
    home.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(home)], check=True)
    try:
        root = scratch / "store"
        support.make_store(root, paths=60, seed=12, roots=2, indirect=0, stale=0, quirks=0)
        code = ("import sys; from gcroots.helper.prepare import hidden_dirs; "
                "print(hidden_dirs())")
        seen = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f'umount "{home}" && exec "$@"', "sh", sys.executable, "-c", code],
                              capture_output=True, text=True, check=True).stdout
        assert repr(os.fsencode(home)) in seen
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f'umount "{home}" && exec "$@"', "sh", support.QUERY, "--standalone",
                              "--root", str(root), "--no-runtime", "dead"], capture_output=True)
        assert out.returncode == 1 and b"hidden" in out.stderr, out.stderr
    finally:
        subprocess.run(["umount", str(home)], check=True)
        home.rmdir()


def test_a_bind_mount_below_home_in_the_helpers_view_counts_as_hidden(scratch):
    """The helper's own view has another directory bound over a user's
    home (a unit's BindPaths=, say), not a tmpfs: `result` links there
    would look stale just the same, so the scan refuses.  A read-only bind
    of the same home is fine."""
    home = Path(f"/home/gcroots-test-bound-{os.getpid()}")
    other = scratch / "empty-home"
    home.mkdir()
    other.mkdir()
    try:
        root = scratch / "store"
        support.make_store(root, paths=60, seed=12, roots=2, indirect=0, stale=0, quirks=0)
        sp = valid_paths(root)[3]
        os.symlink(sp, home / "result")
        auto = root / "nix/var/nix/gcroots/auto"
        auto.mkdir(exist_ok=True)
        os.symlink(home / "result", auto / ("1" * 32))
        scan = [HELPER, "scan", "--root", str(root), "--no-runtime"]
        bound = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                f'mount --bind "{other}" "{home}" && exec "$@"', "sh", *scan],
                               capture_output=True)
        assert bound.returncode == 1, bound.stdout
        assert f"directories are hidden from the helper ({home}:".encode() in bound.stderr
        assert b"stale link" not in bound.stdout
        same = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f'mount --bind "{home}" "{home}" && mount -o remount,ro,bind '
                               f'"{home}" && exec "$@"', "sh", *scan], capture_output=True)
        assert same.returncode == 0, same.stderr
        assert f"{home}/result -> {sp}\n".encode() in same.stdout
    finally:
        shutil.rmtree(home)
