"""Creating listening sockets: no window in which whoever can write the
directory turns our chmod/chown onto a file of their choice; no second
instance stealing a live socket; clear one-line errors."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
import sys
import time

import pytest

from gcroots.layout import StoreLayout
from gcroots.sockets import listen_unix

from . import support
from .support import DAEMON, HELPER

# As fast as it can: swaps a socket that appears at the name for a link to
# the victim, and any private directory next to it for a link to the
# victim's directory.  A win is our chmod (or chown) reaching the victim.
SWAPPER = r"""
import os, stat, sys
d, victim, stop = sys.argv[1:4]
swaps = 0
while not os.path.exists(stop):
    try:
        if stat.S_ISSOCK(os.lstat(d + "/socket").st_mode):
            os.symlink(victim, d + "/.evil")
            os.rename(d + "/.evil", d + "/socket")
            swaps += 1
    except OSError:
        pass
    for n in os.listdir(d):
        if n.startswith(".socket."):
            try:
                os.rename(d + "/" + n, d + "/moved" + n)
                os.symlink(os.path.dirname(victim), d + "/" + n)
                swaps += 1
            except OSError:
                pass
print(swaps)
"""


def test_gc_socket_creation_has_no_window_for_a_symlink_swap(scratch, users, monkeypatch):
    """root collects a store another user owns (`--standalone gc` on the
    --take-store layout): that user owns <state>/gc-socket and swaps our new
    socket for a link to a file of root's, 1,000 times, while each of our
    steps is slowed down by 1 ms.  Nothing of root's changes."""
    from gcroots.daemon import gc
    root = scratch / "store"
    state = root / "nix/var/nix"
    (root / "nix/store").mkdir(parents=True)
    (state / "gc-socket").mkdir(parents=True)
    support.chown_tree(root / "nix", support.ALICE)
    victim_dir = scratch / "root-only"
    victim_dir.mkdir(mode=0o755)
    victim = victim_dir / "socket"   # named like the socket: a swapped directory leads here
    victim.write_bytes(b"root's secret\n")
    os.chmod(victim, 0o600)
    before = support.tree_snapshot(victim_dir)
    real_bind = socket.socket.bind
    monkeypatch.setattr(socket.socket, "bind",
                        lambda self, addr: (real_bind(self, addr), time.sleep(0.001))[0])
    for name in ("chmod", "chown", "rename"):
        monkeypatch.setattr(os, name, lambda *a, real=getattr(os, name), **k: (
            time.sleep(0.001), real(*a, **k))[1])
    monkeypatch.setattr(gc.RootsServer, "_accept_loop", lambda self: None)
    layout = StoreLayout.make(root=os.fsencode(root))
    path, stop = state / "gc-socket" / "socket", scratch / "stop"
    swapper = subprocess.Popen(["runuser", "-u", support.ALICE, "--", sys.executable, "-c",
                                SWAPPER, str(path.parent), str(victim), str(stop)],
                               stdout=subprocess.PIPE)
    made = 0
    try:
        for _ in range(1000):
            if path.is_symlink():
                path.unlink()   # what the swapper left (unlink does not follow it)
            server = gc.RootsServer(layout, lambda p: None)
            try:
                server.start()
            except (gc.GCError, OSError):   # a link or a directory was in our way: refused
                continue
            server._sock.close()
            made += 1
    finally:
        stop.touch()
        swaps = int(swapper.communicate(timeout=30)[0])
    assert support.tree_snapshot(victim_dir) == before, "a file of root's was changed"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600 and os.stat(victim).st_uid == 0
    assert made >= 500 and swaps >= 500, f"the race was not run ({made} sockets, {swaps} swaps)"


def test_socket_gets_its_mode_and_owner_from_the_start(scratch, users):
    daemon_uid = users[support.DAEMON_USER].pw_uid
    sock, file = listen_unix(os.fsencode(scratch / "a.sock"), 0o600, daemon_uid)
    with sock:
        st = os.lstat(scratch / "a.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == daemon_uid and os.path.samestat(st, file.st)
        assert os.listdir(scratch) == ["a.sock"]   # the private directory is gone
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(scratch / "a.sock"))
        c.close()
        file.remove()
        assert not (scratch / "a.sock").exists()


def test_socket_directory_others_can_write_is_refused(scratch, users):
    alice = users[support.ALICE]
    for mode, uid in ((0o755, alice.pw_uid), (0o775, 0), (0o1777, 0)):
        d = scratch / f"d{mode:o}-{uid}"
        d.mkdir()
        os.chown(d, uid, -1)
        os.chmod(d, mode)
        with pytest.raises(OSError, match=f"refusing to create socket {d}/x.sock: its directory is "
                                          f"writable by others \\(owner uid {uid}, mode "):
            listen_unix(os.fsencode(d / "x.sock"), 0o600)
        assert os.listdir(d) == []


def test_only_a_dead_socket_is_replaced(scratch):
    path = os.fsencode(scratch / "s.sock")
    live, file = listen_unix(path, 0o600)
    with pytest.raises(OSError, match="is served by a running process; refusing to take it over"):
        listen_unix(path, 0o600)
    live.close()   # its process is gone, the file stays: replaced
    again, file2 = listen_unix(path, 0o600)
    again.close()
    assert not os.path.samestat(file2.st, file.st)
    file.remove()   # no longer ours: left alone
    assert os.path.exists(path)
    (scratch / "f").write_text("x")
    with pytest.raises(OSError, match="exists and is not a socket; refusing to replace it"):
        listen_unix(os.fsencode(scratch / "f"), 0o600)


def test_a_socket_path_ending_in_a_slash_is_refused_before_making_anything(scratch):
    """`--socket /run/new/` names a directory, not a socket: one line saying
    so, and no directory made on the way (it once made them, then failed
    with "Address already in use")."""
    with pytest.raises(OSError, match=f"^refusing to create socket {scratch}/new/sub/: its path "
                                      "ends in '/'"):
        listen_unix(os.fsencode(scratch / "new" / "sub") + b"/", 0o600)
    assert not (scratch / "new").exists()


def test_helper_refuses_a_socket_dir_the_daemons_user_owns(scratch, users):
    """Without systemd, /run/gcroots may belong to gcrootsd's user: the
    helper (root) would then create its socket where that user can swap it."""
    run = scratch / "run"
    run.mkdir()
    os.chown(run, users[support.DAEMON_USER].pw_uid, -1)
    out = subprocess.run([HELPER, "serve", "--root", str(scratch), "--no-runtime", "--socket",
                          str(run / "helper.sock"), "--allow-user", support.DAEMON_USER],
                         capture_output=True, timeout=30)
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr == (f"gcroots-helper serve: refusing to create socket {run}/helper.sock: its "
                          f"directory is writable by others (owner uid "
                          f"{users[support.DAEMON_USER].pw_uid}, mode 0755); use one that only "
                          "this user (or root) can write\n").encode()


@pytest.mark.parametrize("prog", ["helper", "daemon"])
def test_unwritable_socket_directory_is_one_line_naming_it(scratch, users, prog):
    """gcrootsd as its user, asked for a socket in root's /run: one line."""
    pw = pwd.getpwnam(support.DAEMON_USER)
    run = scratch / "run"
    run.mkdir(mode=0o755)
    store = scratch / "store"
    support.make_store(store, paths=50, seed=3, roots=5)
    support.chown_tree(store, support.DAEMON_USER)
    as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    if prog == "helper":   # as root, in a directory below a file
        (scratch / "file").write_text("")
        cmd = [HELPER, "serve", "--root", str(store), "--no-runtime", "--socket",
               str(scratch / "file" / "helper.sock")]
        want = (f"gcroots-helper serve: cannot create socket {scratch}/file/helper.sock: Not a "
                f"directory ({scratch}/file)")
    else:
        cmd = [*as_user, DAEMON, "--root", str(store), "--socket", str(run / "d.sock")]
        want = f"gcrootsd: cannot create socket {run}/d.sock: Permission denied"
    out = subprocess.run(cmd, capture_output=True, timeout=60, env=dict(os.environ, HOME="/"))
    assert out.returncode == 1
    assert out.stderr.decode().startswith(want) and out.stderr.count(b"\n") == 1, out.stderr


def test_gc_socket_directory_swapped_for_a_link_is_refused(scratch, users):
    """The store's owner (root collects with `--standalone gc`) replaces
    <state>/gc-socket with a link to a directory of root's: root made its
    0666 socket there (any directory, any dead socket named `socket`
    replaced).  Now the collection refuses, in one line, before deleting
    anything, and nothing appears in root's directory."""
    root = scratch / "store"
    support.make_store(root, paths=50, seed=3, roots=5)
    support.chown_tree(root / "nix", support.ALICE)
    victim = scratch / "root-only"
    victim.mkdir(mode=0o755)
    gc_socket = root / "nix/var/nix/gc-socket"
    made = support.as_user(support.ALICE, "import os, shutil, sys; os.path.isdir(sys.argv[1]) "
                           "and shutil.rmtree(sys.argv[1]); os.symlink(sys.argv[2], sys.argv[1])",
                           str(gc_socket), str(victim))
    assert made.returncode == 0, made.stderr
    store_before = sorted(os.listdir(root / "nix/store"))
    out = support.standalone(root, "gc", "--yes", check=False)
    assert out.returncode == 1 and out.stdout == b"", out
    assert out.stderr.decode() == (f"gcroots-query: gc: refusing to create socket {gc_socket}/socket: "
                                   "its directory path goes through a symbolic link "
                                   f"({gc_socket}); give its real path\n")
    assert os.listdir(victim) == [] and sorted(os.listdir(root / "nix/store")) == store_before


def test_helper_socket_below_a_directory_others_can_write_is_refused(scratch, users):
    """A root-owned socket directory inside alice's directory: alice can
    rename it away and put her own in its place, with her socket, which
    gcrootsd would then take for the helper's.  Refused at start, like a
    socket directory reached through a symbolic link."""
    alice = users[support.ALICE]
    hers = scratch / "alices"
    hers.mkdir(mode=0o755)
    os.chown(hers, alice.pw_uid, -1)
    (hers / "run").mkdir(mode=0o755)
    (scratch / "real").mkdir(mode=0o755)
    (scratch / "lnk").symlink_to(scratch / "real")
    for sock, why in ((hers / "run" / "helper.sock",
                       f"{hers} is writable by others (owner uid {alice.pw_uid}, mode 0755)"),
                      (hers / "new" / "helper.sock",   # not made there first
                       f"{hers} is writable by others (owner uid {alice.pw_uid}, mode 0755)"),
                      (scratch / "lnk" / "helper.sock",
                       f"its directory path goes through a symbolic link ({scratch}/lnk)")):
        out = subprocess.run([HELPER, "serve", "--root", str(scratch), "--no-runtime", "--socket",
                              str(sock), "--allow-user", support.DAEMON_USER],
                             capture_output=True, timeout=30)
        assert out.returncode == 1 and out.stdout == b"", out
        assert out.stderr.decode().startswith(
            f"gcroots-helper serve: refusing to create socket {sock}: {why}"), out.stderr
        assert out.stderr.count(b"\n") == 1
    assert sorted(os.listdir(hers)) == ["run"] and os.listdir(hers / "run") == []
    assert os.listdir(scratch / "real") == []


def test_removal_never_takes_a_socket_a_second_instance_put_there(scratch, monkeypatch):
    """Our process stopped; while its removal runs (its lstat slowed down
    by 0.5 s), a second instance replaces the dead socket with its own
    live one.  Removal must leave the second instance's socket in place."""
    import threading
    from gcroots import sockets
    path = os.fsencode(scratch / "s.sock")
    first, first_file = listen_unix(path, 0o600)
    first.close()   # stopped: its socket is dead
    checked, replaced = threading.Event(), threading.Event()
    real_lstat = os.lstat

    def slow_lstat(*a, **k):
        st = real_lstat(*a, **k)
        if threading.current_thread().name == "remover":
            checked.set()
            replaced.wait(5)
        return st
    monkeypatch.setattr(os, "lstat", slow_lstat)
    remover = threading.Thread(target=first_file.remove, name="remover")
    remover.start()
    assert checked.wait(5)
    second, second_file = sockets.listen_unix(path, 0o600)
    replaced.set()
    remover.join()
    with second:
        st = real_lstat(path)
        assert os.path.samestat(st, second_file.st)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
