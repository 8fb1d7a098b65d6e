"""The privilege-separated pipeline for real: gcroots-helper as root, gcrootsd
as an unprivileged user, gcroots-query as various users."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gcroots.daemon.nixconf import GCSettings, NixConfError, load_gc_settings
from gcroots.daemon.temproots import read_temp_roots, remove_stale
from gcroots.layout import StoreLayout

from . import support
from .support import Pipeline, standalone


def new_store(scratch: Path, seed: int, **kw) -> Path:
    root = scratch / "store"
    opts = dict(paths=800, quirks=1, roots=30, indirect=6, stale=1)
    opts.update(kw)
    support.make_store(root, seed=seed, **opts)
    return root


def test_private_root_in_third_users_home(scratch, users, pipelines):
    """An indirect root inside carol's 0700 home keeps its path alive through
    the helper, although the daemon's user could not have read it."""
    root = new_store(scratch, 61)
    victim = standalone(root, "dead").stdout.split()[5]
    home = root / "home" / "carol"
    (home / "proj").mkdir(parents=True)
    result = home / "proj" / "result"
    os.symlink(victim, result)
    os.symlink(result, root / "nix/var/nix/gcroots/auto/carols-result")
    support.chown_tree(home, support.CAROL, 0o700)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    why = p.query("why", victim.decode())
    assert why.returncode == 0, why.stderr
    assert why.stdout.startswith(str(result).encode() + b" -> " + victim)
    assert victim not in p.query("dead").stdout.split()
    # The daemon's own user is blind to it: scanning by itself it would call
    # the path dead.
    blind = subprocess.run(["runuser", "-u", support.DAEMON_USER, "--", support.QUERY,
                            "--standalone", "--root", str(root), "--no-runtime",
                            "--allow-unprivileged-scan", "dead"], capture_output=True)
    assert victim in blind.stdout.split()
    # ... which is why, without being told to, it refuses both to answer
    # `dead` and to collect (one refusal, client/standalone.py _refused).
    for command, consequence in ((["dead"], b"call live paths dead"),
                                 (["gc", "--yes"], b"delete live paths")):
        refused = subprocess.run(["runuser", "-u", support.DAEMON_USER, "--", support.QUERY,
                                  "--standalone", "--root", str(root), "--no-runtime", *command],
                                 capture_output=True)
        assert refused.returncode == 3 and refused.stdout == b"", refused
        assert b"--standalone " + command[0].encode() + b" needs root" in refused.stderr
        assert consequence in refused.stderr
    assert os.path.lexists(os.fsencode(root) + victim)
    # Without the helper, the daemon refuses instead of answering with less.
    p.stop_helper()
    out = p.query("dead")
    assert out.returncode == 1 and out.stdout == b""
    assert b"no complete root set" in out.stderr and b"cannot reach the helper" in out.stderr


class CuttingProxy:
    """Sits between gcrootsd and the helper, forwards `limit` bytes of the
    helper's stream, then kills the helper and closes: a helper that died
    mid-stream."""

    def __init__(self, path: Path, helper_sock: Path, helper: subprocess.Popen, limit: int):
        self.path, self.helper_sock, self.helper, self.limit = path, helper_sock, helper, limit
        self.forwarded = 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        os.chmod(path, 0o666)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        client, _ = self.listener.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(self.helper_sock))
        upstream.sendall(client.recv(4096))  # the daemon's hello
        while self.forwarded < self.limit:
            data = upstream.recv(min(4096, self.limit - self.forwarded))
            if not data:
                break
            client.sendall(data)
            self.forwarded += len(data)
        self.helper.send_signal(signal.SIGKILL)
        client.close()
        upstream.close()
        self.listener.close()


def test_helper_killed_mid_stream_means_no_answer(scratch, users, pipelines):
    root = new_store(scratch, 62, roots=400, indirect=20)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    p.start_helper()
    events, end, total = support.read_root_stream(p.helper_sock)
    assert end.complete and total > 20000
    proxy_sock = p.run / "proxy.sock"
    p.helper_sock, real_sock = proxy_sock, p.helper_sock
    p.start_daemon()
    rng = random.Random(62)
    for limit in sorted(rng.sample(range(1, total), 6)) + [total - 1]:
        if p.helper is None or p.helper.poll() is not None:
            p.helper_sock = real_sock
            p.start_helper()
            p.helper_sock = proxy_sock
        if proxy_sock.exists():
            proxy_sock.unlink()
        proxy = CuttingProxy(proxy_sock, real_sock, p.helper, limit)
        out = p.query("dead")
        proxy.thread.join(10)
        assert out.returncode == 1, (limit, out)
        assert out.stdout == b""
        assert b"no complete root set" in out.stderr, out.stderr
        p.helper.wait(10)
        p.helper = None


HOLDER = r"""
import fcntl, os, sys, time
path = os.path.join(sys.argv[1], str(os.getpid()))
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
for entry in sys.argv[2:]:  # "PARTIAL:x" is written without its NUL (a write in progress)
    os.write(fd, entry[8:].encode() if entry.startswith("PARTIAL:") else entry.encode() + b"\0")
print("ready", flush=True)
time.sleep(600)
"""


def test_live_keeps_what_a_temp_root_keeps_unregistered(scratch, users, pipelines):
    """`live` computes no dead set: gcrootsd takes the unregistered entries
    a temp root keeps from the listing it keeps (inotify), not from a new
    listing of the store dir.  One such entry made before gcrootsd started,
    one while it runs: both are live, as with --standalone."""
    root = new_store(scratch, 64)
    before, during = ("/nix/store/" + c * 32 + "-being-built" for c in "34")
    (root / before.lstrip("/")).mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root / "nix/var/nix/temproots"),
                               before, during], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        p = Pipeline(root, scratch / "run")
        pipelines.append(p)
        p.start()
        assert before.encode() in p.query("live", check=True).stdout.split()
        (root / during.lstrip("/")).mkdir()
        live = p.query("live", check=True).stdout
        assert {before.encode(), during.encode()} <= set(live.split())
        assert live == standalone(root, "live").stdout
    finally:
        holder.kill()
        holder.wait()


def test_unprivileged_clients_see_censored_labels(scratch, users, pipelines):
    root = new_store(scratch, 63)
    dead = standalone(root, "dead").stdout.split()
    runtime_path, temp_path = dead[3].decode(), dead[4].decode()
    sleeper = subprocess.Popen(["sleep", "600"], env={"GCR_RUNTIME": runtime_path})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root / "nix/var/nix/temproots"),
                               temp_path], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        p = Pipeline(root, scratch / "run", helper_args=(),
                     daemon_args=("--admin-group", support.ADMIN_GROUP))
        pipelines.append(p)
        p.start()
        runtime_line = f"/proc/{sleeper.pid}/environ -> {runtime_path}".encode()
        temp_line = f"{{temp:{holder.pid}}} -> {temp_path}".encode()
        for user in (None, support.CAROL):  # root, and a member of the admin group
            out = p.query("roots", user=user)
            assert out.returncode == 0, out.stderr
            assert runtime_line in out.stdout.splitlines() and temp_line in out.stdout.splitlines()
        out = p.query("roots", user=support.BOB)
        lines = out.stdout.splitlines()
        assert f"{{censored}} -> {runtime_path}".encode() in lines
        assert f"{{censored}} -> {temp_path}".encode() in lines
        assert not any(line.startswith((b"/proc/", b"{temp:")) for line in lines)
        # static and indirect labels are not censored (Nix does not either)
        assert any(b"/nix/var/nix/gcroots/" in line for line in lines)
        why = p.query("why", runtime_path, user=support.BOB)
        assert why.stdout.startswith(b"{censored} -> " + runtime_path.encode())
        # the paths are alive for everyone
        for user in (None, support.BOB):
            dead_now = p.query("dead", user=user).stdout.split()
            assert runtime_path.encode() not in dead_now and temp_path.encode() not in dead_now
    finally:
        sleeper.kill()
        holder.kill()
        sleeper.wait()
        holder.wait()


def test_json_on_every_query_and_exit_codes(scratch, users, pipelines):
    root = new_store(scratch, 64)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    data = {}
    for cmd in ("roots", "live", "dead", "cost", "stats"):
        out = p.query(cmd, "--json")
        assert out.returncode == 0, out.stderr
        data[cmd] = json.loads(out.stdout)
    assert {"link", "path", "kind"} == set(data["roots"][0])
    assert all(x.startswith("/nix/store/") for x in data["live"] + data["dead"])
    assert data["stats"]["live_paths"] == len(data["live"])
    assert data["stats"]["dead_paths"] == len(data["dead"])
    assert {"nar_bytes", "paths", "store_path", "labels"} == set(data["cost"][0])
    why = json.loads(p.query("why", "--json", data["live"][0]).stdout)
    assert why["chains"][0]["chain"][-1] == data["live"][0]
    assert p.query("why", data["dead"][0]).returncode == 5
    assert p.query("bogus").returncode == 2  # usage error
    bad = subprocess.run([support.QUERY, "--socket", str(scratch / "nope.sock"), "dead"],
                         capture_output=True)
    assert bad.returncode == 1 and b"cannot connect to gcrootsd" in bad.stderr


def test_unknown_command_on_the_wire_is_a_bad_request(scratch, users, pipelines):
    from gcroots.client import conn
    from gcroots.protocol.admin import Status
    root = new_store(scratch, 65, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    answer = conn.request(str(p.sock), "rm -rf /")
    assert answer.status == Status.BAD_REQUEST and "unknown command" in answer.message


def test_daemon_retries_then_recovers_when_helper_returns(scratch, users, pipelines):
    root = new_store(scratch, 66, paths=300)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    p.start_daemon()  # no helper yet
    t0 = time.monotonic()
    out = p.query("dead")
    assert out.returncode == 1 and b"is gcroots-helper running?" in out.stderr
    assert time.monotonic() - t0 > 3  # it backed off and retried first
    attempts = [e for e in p.daemon_events() if e.get("event") == "helper_attempt_failed"]
    assert [e["attempt"] for e in attempts][:4] == [1, 2, 3, 4]
    p.start_helper()
    assert p.query("dead").returncode == 0


def test_structured_logs(scratch, users, pipelines):
    root = new_store(scratch, 67, paths=300)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    p.query("dead", user=support.BOB)
    events = p.daemon_events()
    analysis = [e for e in events if e.get("event") == "analysis"][-1]
    assert analysis["roots"] > 0 and analysis["live"] > 0 and analysis["dead"] > 0
    assert analysis["seconds_total"] > 0 and analysis["component"] == "gcrootsd"
    request = [e for e in events if e.get("event") == "request"][-1]
    assert request["command"] == "dead" and request["privileged"] is False
    assert request["peer_uid"] == users[support.BOB].pw_uid and request["status"] == "ok"


def test_the_graph_follows_nix_commits_before_any_query(scratch, users, pipelines):
    """gcrootsd follows the DB when Nix commits to it (server._follow_loop,
    inotify on the DB's directory), not when the next query comes: after a
    nix-store --add the graph is followed with no query asked, the query
    after it has nothing left to follow, and its answer is Nix's."""
    root = new_store(scratch, 71, paths=300)
    p = Pipeline(root, scratch / "run", daemon_args=("--log-level", "debug"))
    pipelines.append(p)
    p.start()
    p.query("dead", check=True)

    def followed() -> list[dict]:
        return [e for e in p.daemon_events() if e.get("event") == "graph_followed"]
    before = len(followed())
    (scratch / "added").write_text("added\n")
    added = support.oracle(root, "nix-store", "--add", str(scratch / "added")).stdout.strip()
    deadline = time.monotonic() + 20
    while len(followed()) == before:
        assert time.monotonic() < deadline, "the graph did not follow Nix's commit"
        time.sleep(0.05)
    assert followed()[-1]["paths"] == 301
    dead = p.query("dead", check=True).stdout.split()
    assert added in dead
    assert sorted(dead) == sorted(support.oracle(root, "nix-store", "--gc",
                                                 "--print-dead").stdout.split())
    assert not [e for e in p.daemon_events() if e.get("event") == "graph_stale"]


def test_sd_notify_ready_status_watchdog(scratch, users):
    root = new_store(scratch, 68, paths=200)
    p = Pipeline(root, scratch / "run")
    p.give_store_to_daemon()
    p.start_helper()
    notify = scratch / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(notify))
    os.chmod(notify, 0o666)
    rx.settimeout(20)
    p.env = {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"}
    try:
        p.start_daemon(wait=False)
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                any("READY=1" in m for m in seen) and sum("WATCHDOG=1" in m for m in seen) >= 2):
            seen.append(rx.recv(4096).decode())
        assert any("READY=1" in m for m in seen)
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in seen)
        assert sum("WATCHDOG=1" in m for m in seen) >= 2
        support.wait_for_socket(p.sock)
        p.query("dead")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = rx.recv(4096).decode()
            if "last analysis" in m:
                break
        else:
            pytest.fail("no STATUS after an analysis")
    finally:
        p.stop()
        rx.close()


# -- units ------------------------------------------------------------------

def test_nix_conf_reading(tmp_path):
    conf = tmp_path / "nix.conf"
    (tmp_path / "extra.conf").write_text("keep-outputs = true # trailing comment\n")
    conf.write_text("# comment\nsandbox = false\ngc-keep-derivations = false\ninclude extra.conf\n"
                    "!include missing.conf\n")
    env = {"NIX_CONF_DIR": str(tmp_path)}
    assert load_gc_settings(env) == GCSettings(keep_derivations=False, keep_outputs=True)
    env["NIX_CONFIG"] = "keep-derivations = true\nkeep-outputs = false"
    assert load_gc_settings(env) == GCSettings(True, False)
    assert load_gc_settings({"NIX_CONF_DIR": str(tmp_path / "none")}) == GCSettings(True, False)
    conf.write_text("keep-outputs = yes\nkeep-derivations = 0\n")  # Nix's other spellings
    assert load_gc_settings(env | {"NIX_CONFIG": ""}) == GCSettings(False, True)
    conf.write_text("keep-outputs = maybe\n")
    with pytest.raises(NixConfError, match="expected true or false"):
        load_gc_settings(env | {"NIX_CONFIG": ""})
    conf.write_bytes(b"# caf\xe9 in Latin-1\nkeep-outputs = true\n")  # not UTF-8: still read
    assert load_gc_settings(env | {"NIX_CONFIG": ""}) == GCSettings(True, True)
    conf.write_text("include nowhere.conf\n")
    with pytest.raises(NixConfError, match="does not exist"):
        load_gc_settings({"NIX_CONF_DIR": str(tmp_path)})


def test_nix_conf_user_files_as_nix_reads_them(tmp_path):
    """System file, then the user's files (the first XDG dir wins), then
    NIX_CONFIG; NIX_USER_CONF_FILES replaces the XDG search."""
    system, home, xdg1, xdg2 = (tmp_path / d for d in ("etc", "home", "xdg1", "xdg2"))
    for d, text in ((system, "keep-outputs = true\nkeep-derivations = false\n"),
                    (home / ".config", "keep-outputs = false\n"),
                    (xdg1, "keep-derivations = true\n"), (xdg2, "keep-derivations = false\n")):
        (d / "nix" if d != system else d).mkdir(parents=True)
        ((d / "nix" if d != system else d) / "nix.conf").write_text(text)
    env = {"NIX_CONF_DIR": str(system), "HOME": str(home), "XDG_CONFIG_DIRS": f"{xdg1}:{xdg2}"}
    assert load_gc_settings(env) == GCSettings(keep_derivations=True, keep_outputs=False)
    assert load_gc_settings(env | {"XDG_CONFIG_HOME": str(tmp_path / "none")}) == GCSettings(True, True)
    only = {"NIX_USER_CONF_FILES": f"{xdg2}/nix/nix.conf"}
    assert load_gc_settings(env | only) == GCSettings(False, True)
    assert load_gc_settings(env | only | {"NIX_CONFIG": "keep-outputs = false"}) == GCSettings(False, False)


CA_DRV = ('(derivation { name = "x"; system = "x"; builder = "/bin/sh"; __contentAddressed = true; '
          'outputHashMode = "recursive"; outputHashAlgo = "sha256"; }).drvPath')


@pytest.mark.parametrize("system,user,nix_config", [
    ("experimental-features = nix-command", "", None),
    ("experimental-features = nix-command   ca-derivations  # two", "", None),
    ("include extra.conf\n!include missing.conf", "", None),  # extra.conf: extra-... ca
    ("experimental-features = ca-derivations", "experimental-features = nix-command", None),
    ("experimental-features = ca-derivations", "", "experimental-features ="),
    ("experimental-features = nix-command", "", "extra-experimental-features = ca-derivations"),
    ("extra-experimental-features = ca-derivations\nexperimental-features = nix-command", "", None),
    ("experimental-features = nix-command", "extra-experimental-features = ca-derivations", None),
    ("extra-experimental-features = ca-derivations", "extra-experimental-features = flakes", None),
    ("experimental-features = ca-derivations\r", "", None),
    ("experimental-features=ca-derivations", "", None),          # not a Nix config line
    ("gc-keep-outputs = maybe", "", None),                        # a bad boolean, as Nix reads it
])
def test_experimental_features_read_as_nix_reads_them(tmp_path, system, user, nix_config):
    """Whether ca-derivations is on, for the same files and environment,
    is what Debian's Nix 2.8 says (it refuses a CA derivation when off);
    a file Nix rejects is rejected."""
    etc, home = tmp_path / "etc", tmp_path / "home"
    (home / ".config/nix").mkdir(parents=True)
    etc.mkdir()
    (etc / "nix.conf").write_text(system + "\n")
    (etc / "extra.conf").write_text("extra-experimental-features = ca-derivations\n")
    (home / ".config/nix/nix.conf").write_text(user + "\n")
    env = {"NIX_CONF_DIR": str(etc), "HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    if nix_config is not None:
        env["NIX_CONFIG"] = nix_config
    nix = subprocess.run(["nix-instantiate", "--store", "dummy://", "--eval", "-E", CA_DRV],
                         env=dict(env, PATH=os.environ["PATH"]), capture_output=True)
    try:
        ours = load_gc_settings(env).ca_derivations
    except NixConfError:
        assert nix.returncode == 1 and b"feature 'ca-derivations' is disabled" not in nix.stderr
        return
    assert ours == (nix.returncode == 0), nix.stderr


def test_temp_roots_reading(tmp_path):
    layout = StoreLayout.make(root=os.fsencode(tmp_path))
    d = tmp_path / "nix/var/nix/temproots"
    d.mkdir(parents=True)
    good = "/nix/store/" + "a" * 32 + "-good"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d), good,
                               "/nix/store/" + "b" * 32 + "-bad name", "garbage",
                               "PARTIAL:/nix/store/" + "c" * 32 + "-partial"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        (d / "12345").write_bytes(b"/nix/store/" + b"d" * 32 + b"-dead-owner\0")
        (d / ".keepme").write_bytes(b"")
        (d / "notapid").write_bytes(b"")
        t = read_temp_roots(layout)
        labels = {lbl for lbl, _ in t.roots}
        assert labels == {f"{{temp:{holder.pid}}}".encode()}
        assert {p for _, p in t.roots} == {good.encode()}
        # the unparsable path still protects its hash part; the partial
        # entry (no NUL yet) is ignored as Nix ignores it
        assert t.hashes == {b"a" * 32, b"b" * 32}
        assert [os.path.basename(f) for f in t.stale_files] == [b"12345"]
        assert any("notapid" in w for w in t.warnings)
        assert (d / "12345").exists()  # reading never deletes
        # The collector (holding gc.lock) removes what the reader calls
        # stale, and only that: a live owner's file, hidden and misnamed
        # files stay.
        with open(d / "12345", "rb") as old_fd:
            assert remove_stale(layout) == 1
            assert old_fd.read() == b"dnix/store/" + b"d" * 32 + b"-dead-owner\0"  # (as Nix)
        assert sorted(os.listdir(d)) == sorted([".keepme", "notapid", str(holder.pid)])
        assert remove_stale(layout) == 0
    finally:
        holder.kill()
        holder.wait()


def test_socket_option_ignored_under_socket_activation(scratch, users, pipelines):
    root = new_store(scratch, 69, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    p.start_helper()
    pw = users[support.DAEMON_USER]
    daemon = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(p.sock), "setpriv", f"--reuid={pw.pw_uid}",
         f"--regid={pw.pw_gid}", "--init-groups", "--", support.DAEMON, "--root", str(root),
         "--helper-socket", str(p.helper_sock), "--socket", str(p.sock)],
        stderr=subprocess.DEVNULL)
    try:
        support.wait_for_socket(p.sock)
        inode = os.stat(p.sock).st_ino
        assert p.query("stats").returncode == 0  # activates gcrootsd
        assert os.stat(p.sock).st_ino == inode
        assert p.query("dead").returncode == 0
    finally:
        daemon.terminate()
        daemon.wait()


def test_prometheus_metrics_file_and_port(scratch, users, pipelines):
    import socket as _socket
    import urllib.request
    root = new_store(scratch, 70, paths=400)
    metrics = scratch / "run" / "metrics" / "gcroots.prom"
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Pipeline(root, scratch / "run", daemon_args=(
        "--metrics-file", str(metrics), "--metrics-address", f"127.0.0.1:{port}",
        "--metrics-interval", "1h"))
    pipelines.append(p)
    p.start()
    dead = len(p.query("dead").stdout.split())
    p.query("gc", "--yes")
    text = metrics.read_text()
    assert f"gcroots_dead_paths {float(dead)}" in text or "gcroots_dead_paths 0.0" in text
    assert 'gcroots_roots{kind="static"}' in text and "gcroots_live_paths" in text
    assert f"gcroots_gc_deleted_paths_total {float(dead)}" in text
    assert "gcroots_gc_freed_bytes_total" in text and 'gcroots_failures_total{what="gc"} 0.0' in text
    assert 'gcroots_last_success_timestamp_seconds{what="gc"}' in text
    served = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"gcroots_gc_deleted_paths_total {float(dead)}" in served
    p.stop_helper()
    p.query("dead")  # fails: no helper
    assert 'gcroots_failures_total{what="analysis"} 1.0' in metrics.read_text()


# -- robustness against the helper and against local users ------------------

def _daemon(tmp_path: Path, **kw):
    from gcroots.daemon.server import Daemon
    return Daemon(StoreLayout.make(root=os.fsencode(tmp_path)), b"/nonexistent/helper.sock",
                  GCSettings(True, False), **kw)


async def test_helper_closing_before_our_hello_is_an_incomplete_scan(tmp_path, monkeypatch):
    """The helper closes connections beyond its cap at once; our hello then
    fails with EPIPE (trio.BrokenResourceError, not an OSError).  That is a
    failed scan, not an exception that takes the daemon down."""
    import trio
    from gcroots.daemon import rootsource
    from gcroots.daemon.engine import IncompleteRoots

    async def closed_peer(path):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.close()
        return trio.SocketStream(trio.socket.from_stdlib_socket(ours))

    monkeypatch.setattr(trio, "open_unix_socket", closed_peer)
    layout = StoreLayout.make(root=os.fsencode(tmp_path))
    with pytest.raises(IncompleteRoots, match="closed the connection"):
        await rootsource.fetch_roots(b"/x/helper.sock", layout)


async def test_metrics_loop_survives_unexpected_errors(tmp_path):
    d = _daemon(tmp_path, metrics_interval=0)
    calls = []

    class _Stop(BaseException):  # not caught by the loop: ends the test
        pass

    async def broken_analysis(*, want_dead):
        calls.append(want_dead)
        if len(calls) == 3:
            raise _Stop()
        raise RuntimeError("something unexpected")

    d.analysis = broken_analysis
    with pytest.raises(_Stop):
        await d._metrics_loop()
    assert len(calls) == 3  # it went on after two unexpected errors


class ClosingServer:
    """A socket that accepts each connection and closes it at once (a daemon
    that gave up on us, or crashed)."""

    def __init__(self, path: Path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            c.close()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.mark.parametrize("argv", [["why", "/nix/store/" + "a" * 32 + "-x"], ["roots"],
                                  ["gc", "--yes"]])
def test_query_fails_when_the_daemon_closes_at_once(tmp_path, monkeypatch, capfd, argv):
    """Closed before or after our request went out: either way exit 1 with a
    clear message, never 0 (`why` 0 means alive, `gc --yes` collected).  Many
    runs, to meet both sides of the race."""
    from gcroots.client import cli
    server = ClosingServer(tmp_path / "d.sock")
    try:
        for _ in range(25):
            monkeypatch.setattr(sys, "argv", ["gcroots-query", "--socket", str(tmp_path / "d.sock"),
                                              *argv])
            assert cli.entry() == 1
            out, err = capfd.readouterr()
            assert out == "" and "gcroots-query" in err and "gcrootsd" in err, err
    finally:
        server.close()


def test_query_output_reader_leaving_is_still_exit_0():
    """`gcroots-query dead | head`: the reader left; that is not our error."""
    code = ("import sys; from gcroots.client import cli\n"
            "def main():\n"
            "    sys.stdout.buffer.write(b'/nix/store/x\\n' * 100000); sys.stdout.flush(); return 0\n"
            "cli.main = main; sys.exit(cli.entry())")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    assert p.wait(30) == 0 and p.stderr.read() == b""


async def test_shared_scans_one_in_flight_shared_by_all(autojump_clock):
    import trio
    from gcroots.daemon.engine import IncompleteRoots
    from gcroots.daemon.rootsource import SharedScans
    gate, calls, results = trio.Event(), [], []

    async def fetch():
        calls.append(trio.current_time())
        await gate.wait()
        if len(calls) == 1:
            return f"rootset {len(calls)}"
        raise IncompleteRoots("the helper went away")

    scans = SharedScans(fetch)

    async def ask(**kw):
        try:
            results.append(await scans.get(nursery, **kw))
        except IncompleteRoots as e:
            results.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
        await trio.sleep(1)
        gate.set()
    assert len(calls) == 1 and results == ["rootset 1"] * 20
    # A failure is shared too: every waiter gets its own IncompleteRoots.
    results.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert len(calls) == 2 and len({id(e) for e in results}) == 5
    assert all(isinstance(e, IncompleteRoots) and "went away" in str(e) for e in results)


async def test_shared_scans_collection_never_uses_a_scan_from_before_its_lock(autojump_clock):
    import trio
    from gcroots.daemon.rootsource import SharedScans
    gates, results = [trio.Event(), trio.Event()], {}

    async def fetch():
        n = scans.started
        await gates[n - 1].wait()
        return f"scan {n}"

    scans = SharedScans(fetch)

    async def ask(name, started_after=None):
        results[name] = await scans.get(nursery, started_after=started_after)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "query")          # scan 1 starts now
        await trio.sleep(1)
        locked = trio.current_time()              # the collection takes gc.lock
        nursery.start_soon(ask, "gc", locked)
        nursery.start_soon(ask, "query2")         # joins scan 1
        await trio.sleep(1)
        gates[0].set()
        await trio.sleep(1)
        assert results == {"query": "scan 1", "query2": "scan 1"}
        gates[1].set()
    assert results["gc"] == "scan 2" and scans.started == 2


def test_a_flood_of_queries_shares_helper_scans(scratch, users, pipelines):
    """Many clients at once (the helper serves 16 connections and closes the
    rest): every one gets a complete answer, from shared scans."""
    from concurrent.futures import ThreadPoolExecutor
    from gcroots.client import conn
    from gcroots.protocol.admin import Status
    root = new_store(scratch, 71, paths=300, roots=300, indirect=20)
    p = Pipeline(root, scratch / "run", daemon_args=("--metrics-file", str(scratch / "run" / "m.prom")))
    pipelines.append(p)
    p.start()
    n = 48
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        try:
            return conn.request(str(p.sock), "roots").status
        except conn.DaemonError as e:
            return str(e)

    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(one, range(n)))
    assert statuses == [Status.OK] * n, [s for s in statuses if s != Status.OK][:3]
    assert p.daemon.poll() is None
    events = p.daemon_events()
    scans = [e for e in events if e.get("event") == "root_scan"]
    assert sum(e["waiters"] for e in scans) >= n and len(scans) < n
    assert not [e for e in events if e.get("event") == "helper_attempt_failed"]


def _answer_of(data: bytes):
    """Parse a whole answer the daemon sent."""
    from gcroots.protocol import admin
    from gcroots.protocol.rootstream import NEED_DATA
    c = admin.ClientConnection()
    c.request("x")
    c.receive_data(data)
    c.receive_data(b"")
    while True:
        event = c.next_event()
        assert event is not NEED_DATA
        if isinstance(event, admin.AnswerEnd):
            return event


async def _handle_raw(d, request: bytes):
    """One request through Daemon._handle over a socketpair: the bytes sent back."""
    import trio
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        theirs.sendall(request)
        await d._handle(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        out = b""
        while chunk := theirs.recv(65536):
            out += chunk
    return out


async def test_internal_error_reaches_the_client(tmp_path):
    from gcroots.protocol import admin
    d = _daemon(tmp_path)

    async def broken_dispatch(*args):
        raise RuntimeError("a bug")

    d._dispatch = broken_dispatch
    end = _answer_of(await _handle_raw(d, admin.ClientConnection().request("roots")))
    assert end.complete and end.status == admin.Status.ERROR
    assert "internal error" in end.message and "a bug" in end.message


async def test_a_peer_gone_mid_answer_is_a_stream_error(tmp_path):
    """A peer that hangs up while its answer goes out ends the request as a
    stream error (dropped, one line), not as a bug of gcrootsd's: sendmsg's
    bare BrokenPipeError was logged as request_internal_error with its
    traceback, twice per request, and any user could make thousands a
    second (adversarial review)."""
    import trio
    d = _daemon(tmp_path)
    ours, theirs = trio.socket.socketpair()

    async def read_then_go() -> None:
        await theirs.recv(70000)
        theirs.close()
    async with trio.open_nursery() as n:
        n.start_soon(read_then_go)
        with ours, pytest.raises(trio.BrokenResourceError):
            await d._send_buffers(trio.SocketStream(ours), [bytes(1 << 20)] * 4)


async def test_a_peer_that_reads_a_little_now_and_then_is_dropped(tmp_path, monkeypatch):
    """SEND_TIMEOUT bounds each wait for room; the whole answer must also go
    out within SEND_TIMEOUT plus its size at MIN_SEND_RATE, or the peer is
    dropped: one that read a little every so often kept its connection (and
    the graph its answer is views of) for as long as it liked (adversarial
    review: still served after 7 times SEND_TIMEOUT)."""
    import trio

    from gcroots.daemon import server
    monkeypatch.setattr(server, "SEND_TIMEOUT", 0.5)
    monkeypatch.setattr(server, "MIN_SEND_RATE", 1 << 30)
    d = _daemon(tmp_path)
    ours, theirs = trio.socket.socketpair()

    async def trickle() -> None:
        with trio.move_on_after(10):
            while await theirs.recv(1 << 16):
                await trio.sleep(0.02)   # progress well within SEND_TIMEOUT each time
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        with ours, pytest.raises(trio.TooSlowError):
            await d._send_buffers(trio.SocketStream(ours), [bytes(8 << 20)])
        n.cancel_scope.cancel()
    assert trio.current_time() - t0 < 2.0
    theirs.close()


async def test_send_buffers_sends_every_byte_in_order_through_partial_sends(tmp_path):
    """Views and bytes of all sizes, a big answer (its send buffer grown)
    and a small one, read slowly in odd sizes: every partial sendmsg
    resumes where it stopped."""
    import trio
    d = _daemon(tmp_path)
    rng = random.Random(7)
    blob = rng.randbytes(8 << 20)
    for total_max in (3000, 40 << 20):
        buffers: list = []
        size = 0
        while size < total_max:
            n = rng.choice([1, 7, 100, 4000, 70000, 300000, 6 << 20])
            a = rng.randrange(len(blob) - n)
            piece = memoryview(blob)[a:a + n] if rng.random() < 0.5 else rng.randbytes(n)
            buffers.append(piece)
            size += len(piece)
        ours, theirs = trio.socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        got = bytearray()

        async def read() -> None:
            with theirs:
                while chunk := await theirs.recv(rng.choice([1, 4096, 100000, 1 << 20])):
                    got.extend(chunk)
                    await trio.sleep(0)
        async with trio.open_nursery() as n:
            n.start_soon(read)
            with ours:
                await d._send_buffers(trio.SocketStream(ours), buffers, grow=True)
        assert bytes(got) == b"".join(buffers)


async def test_only_a_privileged_peers_big_answer_grows_the_send_buffer(tmp_path):
    """A peer that does not read pins what the socket holds in the kernel
    (until SEND_TIMEOUT): an unprivileged one's stays at the default."""
    import trio
    d = _daemon(tmp_path)
    for grow in (False, True):
        ours, theirs = trio.socket.socketpair()
        before = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        data = [bytes(8 << 20)]

        async def read() -> None:
            with theirs:
                while await theirs.recv(1 << 20):
                    pass
        async with trio.open_nursery() as n:
            n.start_soon(read)
            with ours:
                await d._send_buffers(trio.SocketStream(ours), data, grow=grow)
                after = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert (after > before) == grow, (grow, before, after)


async def test_answer_too_big_for_a_frame_is_an_error_answer(tmp_path):
    from gcroots.daemon.server import RequestError
    from gcroots.protocol import admin
    d = _daemon(tmp_path)
    conn = admin.ServerConnection()
    with pytest.raises(RequestError, match="could not build the answer") as e:
        await d.build(conn, lambda: conn.row(b"ok") + conn.row(b"x" * 70000))
    assert e.value.status == admin.Status.ERROR and conn.rows_sent == 0


@pytest.mark.parametrize("options", ["[" * 30000 + "]" * 30000, '{"a":' * 10000 + "1" + "}" * 10000,
                                     "[1]", "{", '{"a": ' + "[" * 17 + "]" * 17 + "}"])
async def test_bad_request_options_are_bad_requests(tmp_path, options):
    from gcroots.protocol import admin
    from gcroots.protocol.framing import encode_frame
    d = _daemon(tmp_path)
    request = admin.ClientConnection().request("roots")
    hello = request[:len(request) - len(encode_frame(2, "ss", ["roots", "{}"]))]
    end = _answer_of(await _handle_raw(d, hello + encode_frame(2, "ss", ["roots", options])))
    assert end.complete and end.status == admin.Status.BAD_REQUEST, end


def test_bad_queries_refused_before_a_scan_and_cost_labels_bounded(scratch, users, pipelines):
    """`cost --top x` is refused before any helper scan; 20 links with 3.5 KB
    names to one path (any user can make them) still give a `cost` answer."""
    from gcroots.client import conn
    from gcroots.protocol.admin import Status
    root = new_store(scratch, 72, paths=200)
    victim = standalone(root, "dead").stdout.split()[3]
    deep = root / "home" / "alice"
    for i in range(14):
        deep = deep / (f"{i:02d}" + "d" * 248)
    deep.mkdir(parents=True)
    for i in range(20):
        os.symlink(victim, deep / f"result-{i}")
        os.symlink(deep / f"result-{i}", root / f"nix/var/nix/gcroots/auto/long-{i}")
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    bad = conn.request(str(p.sock), "cost", {"top": "x"})
    assert bad.status == Status.BAD_REQUEST and "top must be an integer" in bad.message
    assert not [e for e in p.daemon_events() if e.get("event") == "root_scan"]
    out = p.query("cost", "--top", "0", "--json", user=support.BOB)
    assert out.returncode == 0, out.stderr
    row = [r for r in json.loads(out.stdout) if r["store_path"] == victim.decode()][0]
    assert 1 < len(row["labels"]) < 20 and row["labels"][-1].startswith("{... and ")
    shown = len(row["labels"]) - 1
    assert row["labels"][-1] == f"{{... and {20 - shown} more}}"


def test_connection_limits():
    from gcroots.daemon.server import ConnectionLimits, Peer
    limits = ConnectionLimits(per_user=2, privileged=3, total=4)
    bob, carol, eve = (Peer(1, uid, uid, frozenset(), False) for uid in (1001, 1002, 1003))
    root = Peer(1, 0, 0, frozenset(), True)
    assert limits.admit(bob) is None and limits.admit(bob) is None
    assert "from uid 1001" in limits.admit(bob)
    assert limits.admit(carol) is None and limits.admit(carol) is None
    assert "serving 4 connections" in limits.admit(eve)       # the unprivileged total
    assert [limits.admit(root) for _ in range(3)] == [None] * 3  # not refused by that total
    assert "from uid 0" in limits.admit(root)
    limits.release(bob)
    assert limits.admit(eve) is None and "serving 4" in limits.admit(bob)
    for peer in (bob, carol, carol, eve, root, root, root):
        limits.release(peer)
    assert limits.by_uid == {} and limits.unprivileged == 0


HOLD_CONNECTIONS = r"""
import json, select, socket, sys
from gcroots.client import conn
from gcroots.protocol import admin
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    socks.append(s)
answers, refused = {}, []
while len(refused) < n - 8:   # the connections over the limit are answered at once
    ready, _, _ = select.select([s for s in socks if s not in refused], [], [], 30)
    assert ready, "no answer"
    for s in ready:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        c = admin.ClientConnection()
        c.request("ping")
        c.receive_data(data)
        c.receive_data(b"")
        while not isinstance(e := c.next_event(), admin.AnswerEnd):
            pass
        answers.setdefault("refused", []).append([e.complete, e.status.name, e.message])
        refused.append(s)
# while 8 are held, gcroots-query's own connection is refused too, with a message
try:
    a = conn.request(path, "stats")
    answers["query"] = [a.status.name, a.message]
except conn.DaemonError as e:
    answers["query"] = ["DaemonError", str(e)]
for s in socks:  # the 8 held ones are served
    if s not in refused:
        s.sendall(admin.ClientConnection().request("ping"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answers.setdefault("held", []).append(b"pong" in data)
print(json.dumps(answers))
"""


def test_connections_per_user_are_capped(scratch, users, pipelines):
    root = new_store(scratch, 73, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    out = support.as_user(support.BOB, HOLD_CONNECTIONS, str(p.sock), "12")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert len(answers["refused"]) == 4
    for complete, status, message in answers["refused"]:
        assert complete and status == "BUSY" and "too many connections" in message
    assert answers["query"][0] == "BUSY" and "too many connections" in answers["query"][1]
    assert answers["held"] == [True] * 8
    # root is not limited to 8, and the daemon serves on
    assert p.query("stats").returncode == 0
    out = support.as_user(support.BOB, HOLD_CONNECTIONS, str(p.sock), "9")
    assert out.returncode == 0 and json.loads(out.stdout)["held"] == [True] * 8


def test_query_waits_for_room_in_a_full_listen_backlog(tmp_path):
    """A daemon busy accepting: the client waits for room instead of failing
    at once with EAGAIN (a timeout set before connect() made it so)."""
    from gcroots.client import conn
    from gcroots.protocol import admin
    path = str(tmp_path / "d.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    else:
        pytest.fail("the backlog never filled")
    full = threading.Event()

    def serve():
        full.wait()
        time.sleep(0.3)  # the client is (most likely) waiting in connect() by now
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            server = admin.ServerConnection()
            with c:
                c.sendall(server.hello() + server.end(admin.Status.OK, "pong"))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        full.set()
        answer = conn.request(path, "ping")
        assert answer.status == admin.Status.OK and answer.message == "pong"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for s in fillers:
            s.close()


# -- junk connections: answered with END when possible, counted, not logged each --

async def test_protocol_errors_and_timeouts_are_answered_with_end(tmp_path, monkeypatch):
    import trio

    from gcroots.daemon import server
    from gcroots.protocol import admin
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.3)
    d = _daemon(tmp_path)
    end = _answer_of(await _handle_raw(d, b"GET / HTTP/1.1\r\n\r\n"))
    assert end.complete and end.status == admin.Status.BAD_REQUEST
    assert end.message.startswith("protocol error: ")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:   # connects, says nothing
        await d._handle(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        data = b""
        while chunk := theirs.recv(65536):
            data += chunk
    end = _answer_of(data)
    assert end.complete and end.status == admin.Status.BAD_REQUEST
    assert end.message == "no request within 0.3 s of connecting"
    assert d._dropped == {"protocol_error": 1, "timeout": 1}


JUNK = r"""
import socket, sys, time
from gcroots.protocol import admin
path = sys.argv[1]
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if i % 3 == 0:
        s.sendall(b"\x00\x00\x00\x05garbage")   # a protocol error
    elif i % 3 == 1:
        s.sendall(admin.ClientConnection().request("ping")[:7])   # hangs up mid-hello
    s.close()
"""


def test_junk_connections_are_counted_and_summarised_not_logged_each(scratch, users,
                                                                      pipelines):
    root = new_store(scratch, 74, paths=200)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Pipeline(root, scratch / "run", daemon_args=("--metrics-address", f"127.0.0.1:{port}"))
    pipelines.append(p)
    p.start()
    size = p.daemon_log_path.stat().st_size
    out = support.as_user(support.BOB, JUNK, str(p.sock), "600")
    assert out.returncode == 0, out.stderr
    assert p.query("stats").returncode == 0   # serving on
    time.sleep(11)   # one summary interval
    added = p.daemon_log_path.read_bytes()[size:]
    events = [json.loads(line) for line in added.splitlines()]
    assert len(added) < 4000, added   # not ~330 bytes for each of 600 connections
    summary = [e for e in events if e["event"] == "connections_dropped"]
    assert len(summary) in (1, 2) and summary[-1]["last_peer_uid"] == users[support.BOB].pw_uid
    counts = {}
    for e in summary:
        for reason, n in e["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
    # (+1 hang-up: the test's own wait for the socket)
    assert counts == {"protocol_error": 200, "hangup": 401}
    assert [e["command"] for e in events if e["event"] == "request"] == ["stats"]
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'gcroots_connections_dropped_total{reason="protocol_error"} 200.0' in text
    assert 'gcroots_connections_dropped_total{reason="hangup"} 401.0' in text


ANSWERED = r"""
import socket, sys, threading
from gcroots.protocol import admin
path, n, threads, command = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def run():
    for i in range(n):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(admin.ClientConnection().request(command))
            while s.recv(65536):
                pass
ts = [threading.Thread(target=run) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


def test_a_flood_of_answered_requests_cannot_flood_the_log(scratch, users, pipelines):
    """Requests that are answered bypassed the junk summary: one user wrote
    ~930 request lines/s with pings (journald's default limit is 10,000 per
    30 s, and then it drops gcrootsd's gc events too), 120 KB per line with
    unknown 60 KB commands (~34 MB/s), and with `stats` an analysis line per
    query and a root_scan line per scan (~380 lines/s); with a broken root
    entry of hers, an error line per scan.  Now what an unprivileged uid's
    requests log is a few requests' worth per interval (the rest counted in
    one `requests_not_logged` line), fields are bounded, and other users'
    requests are still logged in full."""
    root = new_store(scratch, 81, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    alice = users[support.ALICE]
    per_user = root / "nix/var/nix/gcroots/per-user" / support.ALICE
    per_user.mkdir(parents=True)
    os.chown(per_user, alice.pw_uid, alice.pw_gid)
    size = p.daemon_log_path.stat().st_size
    floods = ((400, 1, "ping"), (100, 1, "x" * 60000), (50, 8, "stats"), ("loop", 0, ""),
              (25, 8, "stats"))
    for n, threads, command in floods:
        if n == "loop":   # from now on every scan fails, blaming her
            for name, target in (("loop", "loop"), ("result", per_user / "loop" / "result")):
                os.symlink(target, per_user / name)
                os.chown(per_user / name, alice.pw_uid, alice.pw_gid, follow_symlinks=False)
            continue
        out = support.as_user(support.ALICE, ANSWERED, str(p.sock), str(n), str(threads), command)
        assert out.returncode == 0, out.stderr
    assert p.query("stats", user=support.BOB).returncode == 1
    assert p.query("stats").returncode == 1
    time.sleep(11)   # one summary interval
    added = p.daemon_log_path.read_bytes()[size:]
    events = [json.loads(line) for line in added.splitlines()]
    assert len(events) < 300 and len(added) < 200_000, (len(events), len(added))
    requests = [e for e in events if e["event"] == "request"]
    for who in (users[support.BOB].pw_uid, 0):
        assert [e["command"] for e in requests if e["peer_uid"] == who] == ["stats"]
    assert all(len(json.dumps(e)) < 3000 for e in events)
    logged = sum(e["peer_uid"] == alice.pw_uid for e in requests)
    not_logged = sum(e["counts"].get(str(alice.pw_uid), 0) for e in events
                     if e["event"] == "requests_not_logged")
    assert logged + not_logged == 400 + 100 + 8 * 50 + 8 * 25


# -- process hygiene -----------------------------------------------------------

async def test_internal_error_log_lines_carry_the_traceback(tmp_path, capsys):
    from gcroots import log
    from gcroots.protocol import admin
    log.configure("gcrootsd", json=True)
    d = _daemon(tmp_path)

    async def broken_dispatch(*args):
        raise RuntimeError("a bug")

    d._dispatch = broken_dispatch
    await _handle_raw(d, admin.ClientConnection().request("roots"))
    line = [json.loads(x) for x in capsys.readouterr().err.splitlines()
            if '"request_internal_error"' in x][0]
    exc = line["exception"][0]
    assert exc["exc_type"] == "RuntimeError" and exc["exc_value"] == "a bug"
    assert exc["frames"][-1]["name"] == "broken_dispatch"
    assert "locals" not in exc["frames"][-1]


def test_unwritable_metrics_file_does_not_break_queries(scratch, users, pipelines):
    """A metrics dir gcrootsd cannot write (or a missing /var/lib/gcroots):
    queries answer, the failure is logged once with the path and exported."""
    root = new_store(scratch, 75, paths=200)
    locked = scratch / "locked"
    locked.mkdir(mode=0o755)   # root's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Pipeline(root, scratch / "run", daemon_args=(
        "--metrics-file", str(locked / "metrics" / "gcroots.prom"),
        "--metrics-address", f"127.0.0.1:{port}", "--metrics-interval", "1h"))
    pipelines.append(p)
    p.start()
    for _ in range(3):
        out = p.query("dead")
        assert out.returncode == 0, out.stderr
    failed = [e for e in p.daemon_events() if e["event"] == "metrics_write_failed"]
    assert len(failed) == 1 and failed[0]["path"] == str(locked / "metrics" / "gcroots.prom")
    assert failed[0]["error"] == "Permission denied"
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "gcroots_metrics_write_failures_total 4.0" in text   # the loop's analysis, 3 queries
    os.chown(locked, users[support.DAEMON_USER].pw_uid, -1)
    assert p.query("dead").returncode == 0
    assert (locked / "metrics" / "gcroots.prom").exists()
    assert [e["event"] for e in p.daemon_events()].count("metrics_write_recovered") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_stops_in_one_line_and_removes_its_socket(scratch, users, pipelines, sig):
    root = new_store(scratch, 76, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    inode = os.stat(p.sock).st_ino
    second = subprocess.run(["setpriv", f"--reuid={users[support.DAEMON_USER].pw_uid}",
                             f"--regid={users[support.DAEMON_USER].pw_gid}", "--init-groups",
                             support.DAEMON, "--root", str(root), "--helper-socket",
                             str(p.helper_sock), "--socket", str(p.sock)],
                            capture_output=True, timeout=60, env=dict(os.environ, HOME="/"))
    assert second.returncode == 1 and second.stderr.endswith(
        f"gcrootsd: {p.sock} is served by a running process; refusing to take it over "
        "(stop that one first)\n".encode())
    assert os.stat(p.sock).st_ino == inode and p.query("stats").returncode == 0
    size = p.daemon_log_path.stat().st_size
    p.daemon.send_signal(sig)
    assert p.daemon.wait(20) == 0
    p.daemon = None
    added = p.daemon_log_path.read_bytes()[size:].decode()
    assert "Traceback" not in added and "Group" not in added
    assert [json.loads(x)["event"] for x in added.splitlines()] == ["daemon_stopped"]
    assert json.loads(added)["signal"] == sig.name
    assert not p.sock.exists()


def test_closed_log_pipe_stops_the_daemon(scratch, users, pipelines):
    root = new_store(scratch, 77, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    p.start_helper()
    pw = users[support.DAEMON_USER]
    r, w = os.pipe()
    daemon = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                               "--init-groups", support.DAEMON, "--root", str(root),
                               "--helper-socket", str(p.helper_sock), "--socket", str(p.sock)],
                              stderr=w, env=dict(os.environ, HOME="/"))
    os.close(w)
    try:
        support.wait_for_socket(p.sock, daemon)
        os.close(r)
        p.query("stats")   # it logs: EPIPE
        assert daemon.wait(20) == 1
        assert not p.sock.exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# -- a scan that cannot be complete: refused, said clearly, nothing deleted ----

DEEP_CWD = r"""
import os, sys, time
os.chdir(sys.argv[1])
depth = len(sys.argv[1])
while depth <= 4200:           # deeper than PATH_MAX: made and entered one level at a time
    os.mkdir("d" * 200)
    os.chdir("d" * 200)
    depth += 201
print(os.getpid(), flush=True)
time.sleep(120)
"""


def test_a_process_deeper_than_path_max_blocks_collection_naming_it(scratch, users, pipelines):
    """A process whose cwd is deeper than PATH_MAX: readlink of
    /proc/PID/cwd fails (ENAMETOOLONG), the process's runtime roots are
    unknown, so the scan fails, as Nix 2.8's does -- and every client is
    told which process and whose, so the operator knows what to end."""
    root = new_store(scratch, 81, paths=200)
    p = Pipeline(root, scratch / "run", helper_args=())
    pipelines.append(p)
    p.start()
    alice = users[support.ALICE]
    top = scratch / "deep"
    top.mkdir()
    os.chown(top, alice.pw_uid, alice.pw_gid)
    holder = subprocess.Popen([sys.executable, "-c", DEEP_CWD, str(top)], user=alice.pw_uid,
                              group=alice.pw_gid, extra_groups=[], stdout=subprocess.PIPE)
    try:
        pid = int(holder.stdout.readline())
        store_before = sorted(os.listdir(root / "nix/store"))
        gc = p.query("gc", "--yes")
        err = gc.stderr.decode()
        assert gc.returncode == 1 and gc.stdout == b"", err
        assert (f"cannot read '/proc/{pid}/cwd': File name too long" in err
                and f"process '/proc/{pid}' belongs to {support.ALICE} (uid {alice.pw_uid}), "
                "who (or root) must end it" in err), err
        assert sorted(os.listdir(root / "nix/store")) == store_before
    finally:
        holder.kill()
        holder.wait()
    assert p.query("gc", "--yes").returncode == 0

def test_one_users_looping_root_link_blocks_collection_with_a_message_naming_it(scratch, users,
                                                                                 pipelines):
    """A link in gcroots/per-user/<user> whose target loops (ELOOP) fails
    every scan, as in Nix 2.8 -- dropping a root is never the answer.  Every
    client is told which entry, whose, and why; the journal and a metric say
    it once per scan however many queries shared it; once the link is gone,
    collection works."""
    from concurrent.futures import ThreadPoolExecutor
    root = new_store(scratch, 78, paths=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Pipeline(root, scratch / "run", daemon_args=("--metrics-address", f"127.0.0.1:{port}"))
    pipelines.append(p)
    p.start()
    alice = users[support.ALICE]
    per_user = root / "nix/var/nix/gcroots/per-user" / support.ALICE
    home = root / "home" / "loopy"
    for d in (per_user, home):
        d.mkdir(parents=True)
        os.chown(d, alice.pw_uid, alice.pw_gid)
    bad = per_user / "result"
    made = support.as_user(support.ALICE, "import os, sys; os.symlink('loop', sys.argv[1]); "
                           "os.symlink(sys.argv[2], sys.argv[3])", str(home / "loop"),
                           str(home / "loop" / "result"), str(bad))
    assert made.returncode == 0, made.stderr
    store_before = sorted(os.listdir(root / "nix/store"))
    gc = p.query("gc", "--yes")
    assert gc.returncode == 1 and gc.stdout == b""
    err = gc.stderr.decode()
    assert f"root entry '{bad}' belongs to {support.ALICE} (uid {alice.pw_uid})" in err
    assert "Too many levels of symbolic links" in err and "no complete root set" in err
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: p.query("dead"), range(6)))
    assert all(o.returncode == 1 and f"root entry '{bad}'".encode() in o.stderr for o in outs)
    assert sorted(os.listdir(root / "nix/store")) == store_before
    events = p.daemon_events()
    failed = [e for e in events if e["event"] == "root_scan_failed"]
    scans = [e for e in events if e["event"] == "root_scan" and not e["ok"]]
    # One line per scan, however many requests waited for it.  How many
    # shared one is timing (a failing scan takes ~3 ms): 7 scans happen.
    assert len(failed) == len(scans) and all(e["owner"] == support.ALICE for e in failed)
    assert all(str(bad) not in (e.get("error") or "") for e in events if e["event"] == "request")
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert (f'gcroots_root_scan_failures_total{{owner="{support.ALICE}"}} '
            f'{float(len(failed))}') in text
    bad.unlink()   # what the README tells the operator (or alice) to do
    gc = p.query("gc", "--yes")
    assert gc.returncode == 0, gc.stderr
    assert p.query("dead").stdout == b""


def test_a_broken_root_entry_blames_its_owner_and_nobody_else(scratch, users, pipelines):
    """The blamed owner comes from the helper's lstat, not from text a user
    controls: bob's looping link whose target reads "belongs to uid
    <alice's>" must not make the error, the log or the metric blame alice;
    nor may a ~4 KB target (non-UTF-8 bytes, 4x longer once escaped) push
    the blame out of the message or make the log line huge."""
    root = new_store(scratch, 80, paths=200)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    alice, bob = users[support.ALICE], users[support.BOB]
    per_user = root / "nix/var/nix/gcroots/per-user" / support.BOB
    home = root / "home" / "bobs"
    for d in (per_user, home):
        d.mkdir(parents=True)
        os.chown(d, bob.pw_uid, bob.pw_gid)
    bad = per_user / "result"
    framing = os.fsencode(home / "loop" / f"belongs to uid {alice.pw_uid}" / "result")
    burying = os.fsencode(home / "loop") + (b"/" + b"\xff" * 200) * 19
    for target in (framing, burying):
        made = support.as_user(support.BOB, "import os, sys; os.path.lexists(sys.argv[1]) or "
                               "os.symlink('loop', sys.argv[1]); os.symlink(os.fsencode("
                               "sys.argv[2]), sys.argv[3])", str(home / "loop"),
                               os.fsdecode(target), str(bad))
        assert made.returncode == 0, made.stderr
        dead = p.query("dead")
        assert dead.returncode == 1 and dead.stdout == b""
        err = dead.stderr.decode(errors="replace")
        assert f"root entry '{bad}' belongs to {support.BOB} (uid {bob.pw_uid})" in err, err
        assert support.ALICE not in err and len(err) < 4000, err
        failed = [e for e in p.daemon_events() if e["event"] == "root_scan_failed"][-1]
        assert failed["owner"] == support.BOB and len(failed["error"]) < 4000, failed
        bad.unlink()
    assert p.query("dead").returncode == 0


def test_helper_without_its_capabilities_means_no_collection(scratch, users, pipelines):
    """Issue 12's repro: the shipped unit's command without its
    AmbientCapabilities= (a dedicated user, a bounding set, nothing
    effective).  It used to serve, skip the 0700 homes (EACCES) and let gc
    delete what their `result` links keep alive; now it refuses to start
    and gc refuses with it.  Nothing is deleted."""
    root = new_store(scratch, 79, paths=400, indirect=10)
    for home, user in (("alice", support.ALICE), ("bob", support.BOB)):
        support.chown_tree(root / "home" / home, user, 0o700)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.give_store_to_daemon()
    hu = support.ensure_user(support.HELPER_USER)
    log = scratch / "helper-nocaps.log"
    with open(log, "wb") as f:
        helper = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(p.helper_sock), "--fdname=gcroots",
             "unshare", "-n", "setpriv", f"--reuid={hu.pw_uid}", f"--regid={hu.pw_gid}",
             "--clear-groups", "--bounding-set=-all,+dac_read_search,+sys_ptrace",
             "--inh-caps=-all", support.HELPER, "serve", "--allow-user", support.DAEMON_USER,
             "--require-sandbox", "--root", str(root), "--no-runtime"], stderr=f)
    try:
        support.wait_for_socket(p.helper_sock)
        p.start_daemon()
        before = sorted(os.listdir(root / "nix/store"))
        gc = p.query("gc", "--yes")
        assert gc.returncode == 1 and b"no complete root set" in gc.stderr, gc
        assert sorted(os.listdir(root / "nix/store")) == before
        assert b"refusing to start: the helper (uid %d) lacks CAP_DAC_READ_SEARCH and " \
               b"CAP_SYS_PTRACE" % hu.pw_uid in log.read_bytes()
    finally:
        helper.terminate()
        helper.wait()


_ARENAS = r"""
import ctypes, os, sys, threading
from gcroots.daemon.store import one_malloc_arena
if sys.argv[1] == "one":
    one_malloc_arena()
kept, together = [], threading.Barrier(4)
def work():
    together.wait()  # all four alive at once: none takes an arena another left
    kept.append([bytearray(n) for n in range(1000, 100000, 997)])  # malloc's, below its mmap threshold
    together.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
out = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
f = libc.fdopen(out, b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
"""


@pytest.mark.parametrize("mode, arenas", [("one", 1), ("default", 5)])
def test_one_malloc_arena_keeps_every_thread_in_one(tmp_path, mode, arenas):
    """gcrootsd calls one_malloc_arena before its threads start: what the
    graph's load frees in one thread, the next analysis reuses (the default,
    an arena per thread, is shown too: it is what that call changes)."""
    out = tmp_path / "malloc_info.xml"
    subprocess.run([sys.executable, "-c", _ARENAS, mode, str(out)], check=True)
    assert out.read_text().count("<heap nr=") == arenas


async def test_a_collection_cancelled_while_the_roots_are_scanned_ends_its_collection(tmp_path):
    """A client that hangs up during a gc's scan cancels the collection
    (forward_progress's send fails): its end() still runs -- the deletion
    workers started after begin() stop, gc.lock is free for the next one,
    and the daemon no longer counts a collection as running (else the graph
    would never follow the DB again)."""
    import trio
    from gcroots.daemon.gc import Collection, GCOptions
    from gcroots.daemon.server import Peer
    from gcroots.protocol import admin
    support.tiny_store(tmp_path, ["a", "b"], refs=[], derivers={}, roots=[0])
    d = _daemon(tmp_path)
    started: list = []

    async def scan_forever(**kw):
        started.append([w.proc for w in made[0]._pool.workers])
        await trio.sleep_forever()
    d.root_set = scan_forever
    made: list = []
    real_start = Collection.start_deleters

    def start_deleters(self):
        real_start(self)
        made.append(self)

    class HungUp:
        async def send_all(self, data):
            raise trio.BrokenResourceError("the client hung up")
    try:
        Collection.start_deleters = start_deleters
        with pytest.raises(BaseException):
            await d._gc_command(HungUp(), admin.ServerConnection(), admin.Request("gc", {}, ()),
                                Peer(1, 0, 0, frozenset(), True))
    finally:
        Collection.start_deleters = real_start
    assert started and started[0] and [p.poll() for p in started[0]] == [0] * len(started[0])
    assert d.gc_running == {}
    again = Collection(d.layout, d.settings, GCOptions())
    again.lock.acquire(wait=0)   # free: not left held by the cancelled one
    again.lock.release()
