"""gcroots-helper scan against the real Nix 2.8 (the oracle)."""

from __future__ import annotations

import contextlib
import errno
import os
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


def test_unprivileged_scan_misses_private_roots(scratch, users):
    """Why the helper needs its privilege: the same scan as an ordinary user
    cannot see the indirect roots in 0700 homes (it warns about them)."""
    root = scratch / "store"
    support.make_store(root, paths=500, seed=5, indirect=10, stale=0, quirks=0)
    private_homes(root)
    privileged = our_roots(root)
    unpriv = subprocess.run(["runuser", "-u", support.DAEMON_USER, "--", HELPER, "scan", "--root",
                             str(root), "--no-runtime", "--all-candidates"], capture_output=True)
    assert unpriv.returncode == 0, unpriv.stderr
    missing = {line for line in lines(privileged) if b"/home/" in line}
    assert missing and not (missing & lines(unpriv.stdout))
    assert b"Permission denied" in unpriv.stderr


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


def test_deep_nesting_fails_closed(scratch):
    """10,000 levels: no crash, no fd exhaustion, no silent skip -- the scan
    fails with a clear error (Nix 2.8 also fails: ENAMETOOLONG)."""
    root = scratch / "store"
    support.make_store(root, paths=100, seed=8, roots=5, indirect=0, stale=0, quirks=0)
    d = os.open(root / "nix/var/nix/gcroots", os.O_RDONLY)
    for _ in range(10_000):
        os.mkdir("d", dir_fd=d)
        nd = os.open("d", os.O_RDONLY, dir_fd=d)
        os.close(d)
        d = nd
    os.symlink(valid_paths(root)[0], "deep", dir_fd=d)
    os.close(d)
    out = helper_scan(root, "--no-runtime", check=False)
    assert out.returncode == 1
    assert b"scan failed: directory nesting deeper than" in out.stderr
    assert out.stdout == b""
    assert support.oracle(root, "nix-store", "--gc", "--print-roots", check=False).returncode != 0


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
        assert any(label.startswith(b"fd/") for label in labels)
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
    hidden = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none /home && {scan}"], capture_output=True)
    assert hidden.returncode == 1, hidden.stderr
    assert b"home directories are hidden from the helper (/home" in hidden.stderr
    read_only = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount --bind /home /home && mount -o remount,ro,bind /home "
                                f"&& {scan}"], capture_output=True)
    assert read_only.returncode == 0, read_only.stderr
    assert read_only.stdout == our_roots(root)
