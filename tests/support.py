"""Test support: generated stores, the real Nix as oracle, test users, and a
small synchronous client for the helper's sockets."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gcroots.protocol.receive import RootStreamReceiver, StreamEnd
from gcroots.protocol.rootstream import NEED_DATA, Root, ScanWarning, StaleLink

from . import storegen

REPO = Path(__file__).resolve().parent.parent
NIX_ORACLE = Path(storegen.ORACLE)
VENV_BIN = Path(sys.executable).parent
HELPER = str(VENV_BIN / "gcroots-helper")
DAEMON = str(VENV_BIN / "gcrootsd")
QUERY = str(VENV_BIN / "gcroots-query")

# Real, unprivileged users and a group, made for this session only (the
# pid in the name lets a later session remove what a killed one left):
# concurrent runs on one machine cannot disturb each other.  conftest.py
# creates them at the start and removes everything ensure_user() and
# ensure_group() made at the end.
SESSION_PREFIX = "gcrt-"
SESSION = f"{SESSION_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-"
ALICE, BOB, DAEMON_USER, CAROL = (SESSION + n for n in ("alice", "bob", "daemon", "carol"))
HELPER_USER = SESSION + "helper"
ADMIN_GROUP = SESSION + "admins"
SCRATCH_PREFIX = "gcroots-test-pid"
created_users: list[str] = []
created_groups: list[str] = []
# Paths this session added to the real /nix/store (through oracle("/", "nix-store", "--add")).
real_store_added: list[str] = []


def scratch_dir() -> Path:
    """A fresh world-traversable dir in /tmp, named after this session's pid."""
    d = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def ensure_user(name: str, home_mode: int = 0o700) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment",
                        "gcroots test user", name], check=True)
        created_users.append(name)
        pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, home_mode)
    return pw


def ensure_group(name: str, members: list[str]) -> None:
    if subprocess.run(["getent", "group", name], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", name], check=True)
        created_groups.append(name)
    for m in members:
        subprocess.run(["usermod", "-a", "-G", name, m], check=True)


def remove_users_and_groups(users: list[str], groups: list[str]) -> list[str]:
    """userdel -r / groupdel; returns what could not be removed (with why)."""
    failed = []
    for cmd, names in ((["userdel", "--remove"], users), (["groupdel"], groups)):
        for name in names:
            out = subprocess.run([*cmd, name], capture_output=True, text=True)
            if out.returncode not in (0, 6):  # 6: no such user/group
                failed.append(f"{name}: {out.stderr.strip()}")
    return failed


def make_store(root: Path, paths: int = 1000, seed: int = 1, *, roots: int = 50,
               indirect: int = 10, stale: int = 3, quirks: int = 1, profiles: int = 2,
               generations: int = 3, users: int = 2, expected: Path | None = None,
               extra: list[str] | None = None, **options) -> dict:
    """A generated store (tests/storegen.py) under `root`; `expected` gets
    nix-store's roots/live/dead sets for it.  `extra`: more storegen
    command-line options, e.g. ["--store-dir", D, "--state-dir", V]."""
    options.update(storegen.options(extra or []))
    return storegen.generate(root, paths, seed, roots=roots, indirect=indirect, stale=stale,
                             quirks=quirks, profiles=profiles, generations=generations,
                             users=users, expected=None if expected is None else str(expected),
                             **options)


def oracle(root: Path | str, *args: str, check: bool = True, extra_config: str = "",
           input: bytes | None = None) -> subprocess.CompletedProcess:
    """A Nix command through tests/nix-oracle (single-user, offline, as root).
    Paths it adds to the real /nix/store are deleted at the session's end."""
    out = storegen.nix(root, *args, extra_config=extra_config, input=input)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): "
                             f"{out.stderr.decode(errors='replace')[-2000:]}")
    if str(root) == "/" and args[:2] == ("nix-store", "--add") and out.returncode == 0:
        real_store_added.extend(out.stdout.decode().split())
    return out


def lines(data: bytes) -> set[bytes]:
    return {line for line in data.split(b"\n") if line}


def nix_roots(root: Path | str, *, with_proc: bool = False) -> bytes:
    """nix-store --gc --print-roots output, minus /proc lines unless asked
    (the pieces of a label containing a newline are kept in place).
    NB: Nix removes stale gcroots/auto links and stale temproots files."""
    out = oracle(root, "nix-store", "--gc", "--print-roots").stdout
    if with_proc:
        return out
    return b"".join(line + b"\n" for line in out.split(b"\n")[:-1]
                    if not line.startswith(b"/proc/"))


def tree_snapshot(top: Path) -> dict[bytes, tuple]:
    """Everything observable about a tree short of file contents of the
    store: type, mode, owner, size, mtime, link targets, file bytes."""
    snap: dict[bytes, tuple] = {}
    topb = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(topb):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode) and b"/nix/store/" not in p:
                with open(p, "rb") as f:
                    extra = f.read()
            snap[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)
    return snap


def chown_tree(path: Path, user: str, mode: int | None = None) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, pw.pw_uid, pw.pw_gid)
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)
    if mode is not None:
        os.chmod(path, mode)


def wait_for_socket(path: Path | str, proc: subprocess.Popen | None = None,
                    timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(os.fsdecode(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} appeared")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


def read_root_stream(path: Path | str, timeout: float = 60.0):
    """Connect to a helper socket; return (events, StreamEnd, bytes received)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(os.fsdecode(path))
    rx = RootStreamReceiver()
    s.sendall(rx.hello())
    events = []
    total = 0
    try:
        while True:
            ev = rx.next_event()
            if ev is NEED_DATA:
                data = s.recv(65536)
                total += len(data)
                rx.receive_data(data)
                continue
            events.append(ev)
            if isinstance(ev, StreamEnd):
                return events[:-1], ev, total
    finally:
        s.close()


def roots_of(events) -> set[tuple[bytes, bytes]]:
    return {(e.label, e.store_path) for e in events if isinstance(e, Root)}


def stale_of(events) -> set[tuple[bytes, bytes]]:
    return {(e.link, e.target) for e in events if isinstance(e, StaleLink)}


def warnings_of(events) -> list[ScanWarning]:
    return [e for e in events if isinstance(e, ScanWarning)]


def as_user(user: str, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code as another user, with this venv's interpreter."""
    return subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code, *args],
                           capture_output=True, timeout=timeout)


def copy_store(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


def json_lines(path: Path) -> list[dict]:
    """The JSON log lines of a log file (anything else in it skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Pipeline:
    """gcroots-helper (as root) + gcrootsd (as an unprivileged user) on a store.

    The store is handed to the daemon's user (it runs as the store owner);
    its socket lives in a run dir owned by that user, the helper's in one
    of root's (the helper refuses a directory others can write)."""

    def __init__(self, root: Path, run: Path, *, daemon_user: str = DAEMON_USER,
                 helper_args: tuple[str, ...] = ("--no-runtime",),
                 daemon_args: tuple[str, ...] = (), env: dict | None = None,
                 layout_args: tuple[str, ...] | None = None):
        self.root, self.run = root, run
        self.layout_args = layout_args or ("--root", str(root))
        self.daemon_user = daemon_user
        self.helper_args, self.daemon_args = helper_args, daemon_args
        self.env = env
        self.helper: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        run.mkdir(parents=True, exist_ok=True)
        pw = pwd.getpwnam(daemon_user)
        os.chown(run, pw.pw_uid, pw.pw_gid)
        helper_run = run.parent / f"{run.name}-helper"
        helper_run.mkdir(mode=0o755, exist_ok=True)
        self.helper_sock = helper_run / "helper.sock"
        self.sock = run / "gcrootsd.sock"

    def give_store_to_daemon(self) -> None:
        for top in ("nix", "store", "var"):
            if (self.root / top).exists():
                chown_tree(self.root / top, self.daemon_user)

    def start_helper(self) -> None:
        self.helper_log = open(self.run.parent / "helper.log", "ab")
        self.helper = subprocess.Popen(
            [HELPER, "serve", *self.layout_args, "--socket", str(self.helper_sock),
             "--allow-user", self.daemon_user, *self.helper_args], stderr=self.helper_log)
        wait_for_socket(self.helper_sock, self.helper)

    def start_daemon(self, wait: bool = True) -> None:
        self.daemon_log_path = self.run.parent / "daemon.log"
        self.daemon_log = open(self.daemon_log_path, "ab")
        env = dict(os.environ, **(self.env or {}))
        pw = pwd.getpwnam(self.daemon_user)
        # setpriv execs (runuser would stay as the parent): the pid is gcrootsd's.
        self.daemon = subprocess.Popen(
            ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
             DAEMON, *self.layout_args,
             "--helper-socket", str(self.helper_sock), "--socket", str(self.sock),
             *self.daemon_args], stderr=self.daemon_log, env=env)
        if wait:
            wait_for_socket(self.sock, self.daemon)

    def start(self) -> "Pipeline":
        self.give_store_to_daemon()
        self.start_helper()
        self.start_daemon()
        return self

    def stop_helper(self) -> None:
        if self.helper is not None:
            self.helper.kill()
            self.helper.wait()
            self.helper = None

    def stop(self) -> None:
        self.stop_helper()
        if self.daemon is not None:
            stop_process(self.daemon)
            self.daemon = None

    def daemon_events(self) -> list[dict]:
        return json_lines(self.daemon_log_path)

    def query(self, *args: str, user: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        cmd = [QUERY, "--socket", str(self.sock), *args]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, check=check, timeout=300)


def standalone(root: Path | str, *args: str, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([QUERY, "--standalone", "--root", str(root), "--no-runtime", *args],
                         capture_output=True, timeout=300, env=dict(os.environ, **(env or {})))
    if check and out.returncode != 0:
        raise AssertionError(f"gcroots-query --standalone {' '.join(args)} failed "
                             f"({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    return out


NIX_SCHEMA = storegen.SCHEMA


def tiny_store(root: Path, paths: list[str], refs: list[tuple[int, int]],
               derivers: dict[int, int], roots: list[int], files: int = 1) -> list[str]:
    """A synthetic store in Nix 2.8's layout and schema: `paths` are names,
    `refs` (referrer, reference) index pairs, `derivers` output -> .drv
    (the .drv lists the output in DerivationOutputs), `roots` get
    gcroots/ symlinks.  Returns the store paths."""
    import sqlite3
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    store = root / "nix/store"
    state = root / "nix/var/nix"
    for d in (store, state / "db", state / "gcroots", state / "temproots", state / "profiles"):
        d.mkdir(parents=True, exist_ok=True)
    full = []
    for i, name in enumerate(paths):
        h = "".join(alphabet[(i * 7 + k * 13 + i // 32) % 32] for k in range(32))
        h = alphabet[i % 32] + alphabet[(i // 32) % 32] + h[2:]
        full.append(f"/nix/store/{h}-{name}")
    db = sqlite3.connect(state / "db/db.sqlite")
    db.executescript(NIX_SCHEMA)
    for i, p in enumerate(full):
        d = store / p.split("/")[-1]
        d.mkdir()
        for k in range(files):
            (d / f"f{k}").write_bytes(f"{p} {k}\n".encode() * 40)
        drv = full[derivers[i]] if i in derivers else None
        db.execute("INSERT INTO ValidPaths (id, path, hash, registrationTime, deriver, narSize) "
                   "VALUES (?, ?, ?, 1, ?, ?)", (i + 1, p, "sha256:" + "0" * 64, drv, 1000 + i))
    for a, b in set(refs):
        db.execute("INSERT INTO Refs VALUES (?, ?)", (a + 1, b + 1))
    for out, drv in derivers.items():
        db.execute("INSERT INTO DerivationOutputs VALUES (?, ?, ?)",
                   (drv + 1, f"out{out}", full[out]))
    db.commit()
    db.close()
    (state / "db/schema").write_text("10")
    (state / "db/big-lock").write_text("")
    for r in roots:
        link = state / "gcroots" / f"root-{r}"
        if not link.is_symlink():
            os.symlink(full[r], link)
    return full


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         check=True).stdout
    return int(out.split()[0])


def valid_set(root: Path) -> set[bytes]:
    import sqlite3
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    db.text_factory = bytes
    try:
        return {r[0] for r in db.execute("SELECT path FROM ValidPaths")}
    finally:
        db.close()


def verify_clean(root: Path) -> None:
    """nix-store --verify --check-contents finds nothing wrong."""
    out = oracle(root, "nix-store", "--verify", "--check-contents", check=False)
    text = out.stderr.decode(errors="replace")
    bad = [line for line in text.splitlines()
           if not line.startswith(("checking ", "reading the Nix store", "warning: "))]
    assert out.returncode == 0 and not bad, text


def collect_in_process(root: Path, settings=None, options=None, before_execute=None):
    """One collection of the store at `root` in this process, Nix-style
    phases (begin, plan from an in-process scan, execute, end); returns it."""
    from gcroots.daemon import engine
    from gcroots.daemon.gc import Collection, GCOptions
    from gcroots.daemon.nixconf import GCSettings
    from gcroots.daemon.store import StoreDB
    from gcroots.layout import StoreLayout
    layout = StoreLayout.make(root=os.fsencode(root))
    c = Collection(layout, settings or GCSettings(), options or GCOptions())
    db = StoreDB.open(layout)
    c.begin()
    try:
        c.start_deleters()   # as gcrootsd and --standalone
        c.plan(engine.scan_in_process(layout, runtime=False), db)
        if before_execute:
            before_execute(c)
        c.execute(layout.db_path)
    finally:
        c.end()
        db.close()
    return c
