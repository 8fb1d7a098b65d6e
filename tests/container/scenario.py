#!/usr/bin/python3
"""The multi-user host scenario, run *inside* the booted Debian container by
gcroots-scenario.service (Debian's python3, standard library only).

Debian's own nix-daemon (nix-setup-systemd: nix-daemon.socket/.service)
builds everything: alice and bob build through it (NIX_REMOTE=daemon) into
`result` links in their 0700 homes, root through it too.  Then both
deployment models of README "Deploying on Debian", one after the other on
the same store:

  stock     nix-daemon as root, the store root's: scripts/install (which
            picks the model) with its reruns and repairs, the units enabled,
            every check below, a scheduled collection while alice and bob
            build, a build after it; then scripts/install --uninstall.
  rootless  --take-store refused while nix-daemon is (configured to run as)
            root; nix-daemon made to run as the user `nix` by the drop-in
            tests/container/nix-daemon-rootless.conf; install --take-store;
            the model's checks, a collection while alice and bob build
            through the unprivileged daemon; --uninstall refused while that
            daemon owns the store, then done, giving the store back to root.

Every check is recorded on its own (ok + detail) in a JSON report that the
host-side test (tests/test_container.py) asserts; a failing check never stops
the others.  Finally the container powers off (the unit's ExecStopPost).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
NIX_FILE = SRC / "tests/container/scenario.nix"
ROOTLESS_DROPIN = SRC / "tests/container/nix-daemon-rootless.conf"
INSTALL = SRC / "scripts/install"
WHEELS = Path("/var/cache/gcroots-wheels")
RESULTS = Path(sys.argv[1] if len(sys.argv) > 1 else "/results")
STORE = Path("/nix/store")
HELPER_SOCK = "/run/gcroots/helper.sock"
METRICS = Path("/var/lib/gcroots/metrics/gcroots.prom")
BULK = Path("/nix/var/nix/gcroots/bulk")
BULK_LINKS = 100_000          # makes one helper scan last a few seconds
UNITS = ("gcroots-helper.socket", "gcrootsd.socket", "gcroots-helper.service",
         "gcrootsd.service")
UNIT_FILES = ("gcroots-helper.socket", "gcroots-helper.service", "gcroots-helper-nix-roots.socket",
              "gcrootsd.socket", "gcrootsd.service", "gcroots-gc.service", "gcroots-gc.timer")
CAPS = "0000000000080004"     # CAP_DAC_READ_SEARCH (2) | CAP_SYS_PTRACE (19)
STORE_NAME = re.compile(r"^[0-9a-df-np-sv-z]{32}-[^/]+$")
PERMISSION = re.compile(r"permission denied|operation not permitted|PermissionError", re.I)
# The scheduled collection keeps gc.lock at least this long (gcroots-query gc
# --throttle, through GC_ARGS): builds that start meanwhile must announce
# their temporary roots on the GC socket.
GC_THROTTLE = "3"

# Root uses the nix-daemon too (in the rootless model a Nix run as root on the
# local store would create root-owned files the store's owner cannot delete).
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "NIX_REMOTE": "daemon", "LANG": "C.UTF-8"}
PIP_ENV = {**DAEMON_ENV, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS),
           "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def say(text: str) -> None:
    print(text, flush=True)


def sh(cmd, *, user: str | None = None, check: bool = True, env=None, timeout: float = 300,
       input: str | None = None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                         input=input, stdin=None if input is not None else subprocess.DEVNULL)
    say(f"+ {shlex.join(cmd)}  -> {out.returncode} ({time.monotonic() - t0:.1f}s)")
    if check and out.returncode != 0:
        raise Failed(f"{shlex.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}"
                     f"{out.stdout[-1000:]}")
    return out


class Failed(Exception):
    pass


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise Failed(message)


class Report:
    def __init__(self) -> None:
        self.checks: dict[str, dict] = {}
        self.info: dict[str, object] = {}
        self.setup_error: str | None = None
        self.t0 = time.monotonic()
        self.phase = ""   # "stock" or "rootless": the prefix of check names

    def ok(self, name: str) -> bool:
        return self.checks.get(f"{self.phase}.{name}", {}).get("ok", False)

    @contextmanager
    def check(self, name: str):
        name = f"{self.phase}.{name}"
        notes: list[str] = []
        t0 = time.monotonic()
        say(f"== check {name}")
        try:
            yield notes
        except Exception as e:
            tb = "" if isinstance(e, Failed) else "\n" + traceback.format_exc(limit=4)
            self.checks[name] = {"ok": False, "detail": "\n".join([*notes, f"FAILED: {e}{tb}"])}
            say(f"== check {name}: FAILED: {e}{tb}")
        else:
            self.checks[name] = {"ok": True, "detail": "\n".join(notes)}
            say(f"== check {name}: ok")
        self.checks[name]["seconds"] = round(time.monotonic() - t0, 2)
        self.write()

    def write(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS / "report.json.tmp"
        tmp.write_text(json.dumps({"checks": self.checks, "info": self.info,
                                   "setup_error": self.setup_error,
                                   "seconds": round(time.monotonic() - self.t0, 1)}, indent=1))
        tmp.rename(RESULTS / "report.json")


# -- the world -------------------------------------------------------------------

def nix(*args: str, timeout: float = 300, user: str | None = None) -> str:
    """The real Nix 2.8 through the nix-daemon, as root or as a user."""
    env = dict(DAEMON_ENV, HOME=pwd.getpwnam(user).pw_dir) if user else DAEMON_ENV
    return sh(["env", *(f"{k}={v}" for k, v in env.items()), *args] if user else args,
              user=user, env=None if user else env, timeout=timeout).stdout.strip()


def store_entries() -> set[str]:
    return {f"/nix/store/{n}" for n in os.listdir(STORE) if STORE_NAME.match(n)
            and not n.endswith(".lock")}


def owners(*tops: str) -> dict[str, tuple[int, int, int]]:
    """(uid, gid, mode) of everything under these, not following links."""
    out = {}
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            for p in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                out[p] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


class World:
    def __init__(self) -> None:
        self.out: dict[str, str] = {}
        self.drv: dict[str, str] = {}
        self.holder: subprocess.Popen | None = None

    def build(self, attr: str, link: str | None = None, user: str | None = None) -> str:
        """nix-build -A attr through the daemon, as `user` (into `link`) or root."""
        self.drv[attr] = nix("nix-instantiate", str(NIX_FILE), "-A", attr)
        args = ["-o", link] if link else ["--no-out-link"]
        self.out[attr] = nix("nix-build", str(NIX_FILE), "-A", attr, *args, user=user)
        return self.out[attr]

    def entries(self, *attrs: str) -> set[str]:
        """Outputs and derivations (keep-derivations keeps a live output's .drv)."""
        return {self.out[a] for a in attrs} | {self.drv[a] for a in attrs}

    LIVE1 = ("libc", "zlib", "aliceApp", "bobTool", "ciJob", "heldDep", "held")
    GARBAGE1 = ("oldLib", "oldApp", "scratch")
    LIVE2 = ("libc", "zlib", "aliceApp", "ciJob", "heldDep", "held")
    GARBAGE2 = ("bobTool", "laterDep", "later")
    LIVE_R = ("rlLib", "rlApp")
    GARBAGE_R = ("rlOld", "rlScratch")


def add_user(name: str) -> pwd.struct_passwd:
    sh(["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "nix-users", name])
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return pw


def user_dir(user: str, path: str) -> None:
    sh(["mkdir", "-p", path], user=user)


def setup(world: World, report: Report) -> None:
    """Users and the first store, all built through Debian's root nix-daemon."""
    t0 = time.monotonic()
    # The container has no network: no substituter (only the daemon's
    # nix.conf counts for builds through it).
    with open("/etc/nix/nix.conf", "a") as f:
        f.write("substituters =\n")
    sh(["systemctl", "stop", "nix-daemon.service"])   # the next connection reads it
    add_user("alice")
    add_user("bob")
    for user, d in (("alice", "/home/alice/webapp"), ("alice", "/home/alice/old-webapp"),
                    ("bob", "/home/bob/tool"), ("alice", "/home/alice/conc"),
                    ("bob", "/home/bob/conc")):
        user_dir(user, d)
    world.build("aliceApp", "/home/alice/webapp/result", user="alice")
    world.build("bobTool", "/home/bob/tool/result", user="bob")
    # A CI job's result under /tmp: a unit with PrivateTmp= would not see it.
    user_dir("bob", "/tmp/bob-ci")
    world.build("ciJob", "/tmp/bob-ci/result", user="bob")
    world.build("oldApp", "/home/alice/old-webapp/result", user="alice")
    sh(["rm", "/home/alice/old-webapp/result"], user="alice")  # its gcroots/auto link is stale
    world.build("scratch")
    world.build("held")
    for attr in ("libc", "zlib", "heldDep", "oldLib"):
        world.build(attr)
    report.info["nix_build_seconds"] = round(time.monotonic() - t0, 1)
    report.info["nix_version"] = sh(["nix-store", "--version"]).stdout.strip()

    # bob's long-running process holds a file of `held` open (fd 3); nothing
    # else keeps `held` alive.  setpriv execs (no fork): the pid is the holder.
    bob = pwd.getpwnam("bob")
    readme = world.out["held"] + "/README"
    world.holder = subprocess.Popen(
        ["setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--init-groups", "--",
         "/bin/sh", "-c", f'exec 3< "{readme}"; exec sleep 3600'],
        cwd="/", stdin=subprocess.DEVNULL, start_new_session=True)
    fd = f"/proc/{world.holder.pid}/fd/3"
    for _ in range(200):
        try:
            if os.readlink(fd) == readme:
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise Failed(f"bob's holder process never opened {readme}")
    report.info["holder_pid"] = world.holder.pid


def query(*args: str, user: str | None = None, check: bool = True,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return sh(["/usr/local/bin/gcroots-query", *args], user=user, check=check, timeout=timeout)


def prop(unit: str, *names: str) -> dict[str, str]:
    out = sh(["systemctl", "show", unit, *(f"--property={n}" for n in names)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(unit: str) -> int:
    return int(prop(unit, "MainPID")["MainPID"])


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def journal(unit: str) -> list[dict]:
    """The unit's own processes' journal entries (not systemd's messages about it)."""
    out = sh(["journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_UNIT={unit}"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(unit: str) -> list[dict]:
    got = []
    for entry in journal(unit):
        msg = entry.get("MESSAGE")
        if isinstance(msg, list):   # journald stores non-UTF-8 messages as byte arrays
            msg = bytes(msg).decode(errors="replace")
        try:
            got.append(json.loads(msg))
        except (TypeError, ValueError):
            got.append({"event": None, "unparsed": msg})
    return got


def wait_until(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise Failed(f"timed out after {timeout}s waiting for {what}")


def roots_json(user: str | None = None) -> list[dict]:
    out = query("--json", "roots", user=user)
    return json.loads(out.stdout)


def helper_busy(helper: int, daemon: int) -> bool:
    """Has the helper accepted a connection from gcrootsd (a scan is under
    way)?  Both run with PrivateNetwork=, and a connection's sockets live in
    the connecting side's network namespace: look there."""
    out = ""
    for ns in ([], ["nsenter", "-t", str(daemon), "-n"]):
        out += subprocess.run([*ns, "ss", "-xpH"], capture_output=True, text=True).stdout
    return any(HELPER_SOCK in line and f"pid={helper}," in line for line in out.splitlines())



# -- scripts/install -------------------------------------------------------------------

def install(*args: str, check: bool = True, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(PIP_ENV, PATH=path) if path else PIP_ENV
    return sh([INSTALL, *args], env=env, check=check, timeout=900)


def installed_files() -> list[str]:
    """What scripts/install creates, as far as it exists now."""
    units = Path("/etc/systemd/system")
    candidates = [*(units / u for u in UNIT_FILES), *(units / f"{u}.d" for u in UNIT_FILES),
                  Path("/opt/gcroots"), *(Path("/usr/local/bin") / c for c in
                                          ("gcroots-helper", "gcrootsd", "gcroots-query")),
                  Path("/etc/default/gcroots"), Path("/var/lib/gcroots"),
                  Path("/var/lib/gcroots-install"), Path("/run/gcroots")]
    return [str(p) for p in candidates if os.path.lexists(p)]


def accounts() -> list[str]:
    out = [f"user {u}" for u in ("gcroots", "gcroots-helper")
           if subprocess.run(["id", u], capture_output=True).returncode == 0]
    if subprocess.run(["getent", "group", "gcroots-admin"], capture_output=True).returncode == 0:
        out.append("group gcroots-admin")
    return out


def fingerprint() -> dict[str, str]:
    """Units, drop-ins, the install record, the venv's identity."""
    out = {}
    for top in ("/etc/systemd/system", "/var/lib/gcroots-install"):
        for p in sorted(Path(top).rglob("*")):
            if p.is_file() and ("gcroots" in str(p.relative_to(top)) or top.endswith("install")):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    st = os.stat("/opt/gcroots/pyvenv.cfg")
    out["venv"] = f"{st.st_ino}:{st.st_mtime_ns}"
    return out


def runs_as(user: str, command: str) -> subprocess.CompletedProcess:
    return sh([f"/usr/local/bin/{command}", "--help"], user=user, check=False)


def set_gc_args(args: str) -> None:
    p = Path("/etc/default/gcroots")
    p.write_text(re.sub(r"(?m)^GC_ARGS=.*$", f"GC_ARGS={args}", p.read_text()))


def enable_units() -> None:
    sh(["systemctl", "enable", "--now", "gcroots-helper.socket", "gcrootsd.socket",
        "gcroots-gc.timer"])


def expect_uninstalled(notes: list[str]) -> None:
    left = installed_files()
    notes.append(f"left: {left}; accounts: {accounts()}")
    expect(not left, f"uninstall left {left}")
    expect(not accounts(), f"uninstall left {accounts()}")
    units = [line for line in sh(["systemctl", "list-unit-files", "--no-legend", "gcroots*"])
             .stdout.splitlines() if not line.startswith("gcroots-scenario.service")]
    expect(not units, f"systemd still knows {units}")
    orphans = sh(["find", "/nix", "/var/lib", "/run", "/etc", "-xdev", "(", "-nouser", "-o",
                  "-nogroup", ")", "-print"]).stdout.split()
    expect(not orphans, f"files of a removed user or group: {orphans[:20]}")


def nix_daemon_uids() -> list[int]:
    out = sh(["pgrep", "-x", "nix-daemon"], check=False).stdout.split()
    return [os.stat(f"/proc/{pid}").st_uid for pid in out if os.path.exists(f"/proc/{pid}")]


# -- building while a collection runs ---------------------------------------------------

SLOW = "let s = import {nix}; in s.slow \"{name}\" [ {deps} ]"


def collect_while_building(world: World, phase: str, keep_attr: str, notes: list[str]) -> dict:
    """Fire gcroots-gc.timer while alice and bob build through the nix-daemon
    (five one-second builds each, into result links).  bob's third build
    starts once the collection runs (gcrootsd holds gc.lock: the daemon must
    announce its inputs on the GC socket) and uses `keep_attr`, garbage
    until then.  Returns what happened."""
    set_gc_args(f"--throttle {GC_THROTTLE}")
    builds: list[dict] = []
    collecting = threading.Event()

    def builder(user: str) -> None:
        for i in range(5):
            name = f"conc-{phase}-{user}-{i}"
            deps = "s.libc"
            if user == "bob" and i == 2:
                collecting.wait(120)
                deps += f" s.{keep_attr}"
            link = f"/home/{user}/conc/{name}"
            env = dict(DAEMON_ENV, HOME=f"/home/{user}")
            t0 = time.monotonic()
            out = sh(["env", *(f"{k}={v}" for k, v in env.items()), "nix-build", "-E",
                      SLOW.format(nix=NIX_FILE, name=name, deps=deps), "-o", link],
                     user=user, check=False)
            builds.append({"user": user, "name": name, "link": link, "start": t0,
                           "end": time.monotonic(), "rc": out.returncode,
                           "out": out.stdout.strip(), "err": out.stderr[-2000:]})

    before_exit = prop("gcroots-gc.service", "ExecMainExitTimestampMonotonic")[
        "ExecMainExitTimestampMonotonic"]
    threads = [threading.Thread(target=builder, args=(u,)) for u in ("alice", "bob")]
    for t in threads:
        t.start()
    time.sleep(1.5)   # both are building
    # The installed timer itself fires the service: a runtime drop-in makes
    # it elapse a second from now instead of at midnight + up to 1h.
    dropin = Path("/run/systemd/system/gcroots-gc.timer.d/now.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Timer]\nOnCalendar=\nOnActiveSec=1s\nRandomizedDelaySec=0\n"
                      "AccuracySec=1us\n")
    try:
        sh(["systemctl", "daemon-reload"])
        sh(["systemctl", "restart", "gcroots-gc.timer"])
        wait_until(lambda: prop("gcroots-gc.service", "ActiveState")["ActiveState"] != "inactive"
                   or prop("gcroots-gc.service", "ExecMainExitTimestampMonotonic")
                   ["ExecMainExitTimestampMonotonic"] not in ("0", before_exit), 60,
                   "the timer to start gcroots-gc.service")
        time.sleep(0.5)   # gcroots-query asked, gcrootsd took gc.lock
        collecting.set()
        wait_until(lambda: prop("gcroots-gc.service", "ExecMainExitTimestampMonotonic")
                   ["ExecMainExitTimestampMonotonic"] not in ("0", before_exit), 180,
                   "the timer to run gcroots-gc.service")
    finally:
        collecting.set()
        dropin.unlink()
        sh(["systemctl", "daemon-reload"])
        sh(["systemctl", "restart", "gcroots-gc.timer"])
        for t in threads:
            t.join(300)
        set_gc_args("")
    p = prop("gcroots-gc.service", "Result", "ExecMainStatus", "ExecMainStartTimestampMonotonic",
             "ExecMainExitTimestampMonotonic")
    gc = (int(p["ExecMainStartTimestampMonotonic"]) / 1e6,
          int(p["ExecMainExitTimestampMonotonic"]) / 1e6)
    notes.append(f"gcroots-gc.service: {p}; ran {gc[1] - gc[0]:.1f}s")
    for b in builds:
        during = b["start"] < gc[1] and b["end"] > gc[0]
        notes.append(f"{b['name']}: exit {b['rc']} in {b['end'] - b['start']:.1f}s"
                     f"{', during the collection' if during else ''}"
                     + (f": {b['err']}" if b["rc"] else ""))
        b["during"] = during
    expect(p["Result"] == "success" and p["ExecMainStatus"] == "0", f"gcroots-gc.service: {p}")
    failed = [b for b in builds if b["rc"] != 0]
    expect(len(builds) == 10 and not failed, f"builds failed: {[b['name'] for b in failed]}")
    for user in ("alice", "bob"):
        expect(any(b["during"] and b["user"] == user for b in builds),
               f"none of {user}'s builds ran while the collection did")
    late = next(b for b in builds if b["name"] == f"conc-{phase}-bob-2")
    expect(gc[0] < late["start"] < gc[1], "bob's build of the garbage input did not start "
           "during the collection")
    finished = [e for e in events("gcrootsd.service") if e.get("event") == "gc_finished"]
    notes.append(f"paths protected by temporary roots announced during the collection: "
                 f"{finished[-1].get('protected_during_gc') if finished else None}")
    denied = [b["name"] for b in builds if PERMISSION.search(b["err"])]
    expect(not denied, f"permission errors in builds {denied}")
    # Nothing a finished build made or used is gone: each result's closure
    # is valid (bob's build that used the garbage `keep_attr` included).
    for b in builds:
        closure = nix("nix-store", "-qR", b["link"]).split()
        invalid = nix("nix-store", "--check-validity", "--print-invalid", *closure)
        expect(invalid == "" and all(os.path.exists(c) for c in closure),
               f"{b['link']}: closure lost {invalid or [c for c in closure if not os.path.exists(c)]}")
    return {"builds": builds, "gc": gc}


def no_permission_errors(since: str, notes: list[str]) -> None:
    out = sh(["journalctl", "--no-pager", "-o", "cat", "--since", since, "-u", "nix-daemon.service",
              "-u", "gcrootsd.service", "-u", "gcroots-gc.service", "-u",
              "gcroots-helper.service"]).stdout
    hits = [line for line in out.splitlines() if PERMISSION.search(line)]
    notes.append(f"{len(out.splitlines())} journal lines since {since}")
    expect(not hits, f"permission errors: {hits[:10]}")


def build_after_gc(world: World, phase: str, notes: list[str]) -> None:
    name = f"after-gc-{phase}"
    user_dir("alice", f"/home/alice/{name}")
    out = nix("nix-build", "-E", SLOW.format(nix=NIX_FILE, name=name, deps="s.libc s.zlib"),
              "-o", f"/home/alice/{name}/result", user="alice")
    notes.append(out)
    expect(os.path.exists(out + "/deps"), f"{out} is not there")
    world.out[name] = out


# -- checks shared by both models -----------------------------------------------------

def daemon_confined(user: str, store_before: dict, notes: list[str]) -> None:
    """gcrootsd runs as the model's user, without any capability, confined;
    the stock model changed no owner in the store or the state dir."""
    pid = main_pid("gcrootsd.service")
    st = proc_status(pid)
    want_uid = pwd.getpwnam(user).pw_uid
    notes.append(f"pid {pid}: Uid={st['Uid']} CapEff={st['CapEff']} CapBnd={st['CapBnd']} "
                 f"NoNewPrivs={st['NoNewPrivs']} Seccomp={st['Seccomp']}")
    expect(st["Uid"].split() == [str(want_uid)] * 4, f"gcrootsd uid {st['Uid']}, want {user}")
    expect(int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
           and int(st["CapBnd"], 16) == 0 and int(st["CapAmb"], 16) == 0, "gcrootsd has caps")
    expect(st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", "gcrootsd not confined")
    s = os.stat("/nix/store")
    notes.append(f"/nix/store: uid {s.st_uid} gid {s.st_gid} mode {stat.S_IMODE(s.st_mode):o}")
    if user == "root":
        now = owners("/nix/store", "/nix/var/nix")
        changed = [p for p in store_before if p in now and now[p] != store_before[p]]
        expect(not changed, f"owners changed in the stock model: {changed[:10]}")
        expect(s.st_uid == 0 and stat.S_IMODE(s.st_mode) == 0o1775, "the store is not root's")
    else:
        expect(s.st_uid == want_uid, f"{user} does not own the store")


def verify_clean(notes: list[str]) -> None:
    out = subprocess.run(["nix-store", "--verify", "--check-contents"], env=DAEMON_ENV,
                         capture_output=True, text=True, timeout=300)
    problems = [line for line in out.stderr.splitlines()
                if not line.startswith(("checking", "reading the Nix store"))]
    notes.append(f"exit {out.returncode}; " + "; ".join(problems))
    expect(out.returncode == 0 and not problems, "nix-store --verify found problems")


def expect_collected_by(user: str, notes: list[str]) -> None:
    finished = [e for e in events("gcrootsd.service") if e.get("event") == "gc_finished"]
    by = finished[-1].get("by") if finished else None
    notes.append(f"gcrootsd's last gc_finished: {finished[-1] if finished else None}")
    expect(by == f"uid {pwd.getpwnam(user).pw_uid}",
           f"the last collection was not the service's (user {user}): by={by}")


def services_active(notes: list[str]) -> None:
    for unit in UNITS:
        state = sh(["systemctl", "is-active", unit], check=False).stdout.strip()
        notes.append(f"{unit}: {state}")
        expect(state == "active", f"{unit} is {state}")
    p = prop("gcrootsd.service", "Type", "NRestarts", "Result", "StatusText", "WatchdogUSec")
    notes.append(f"gcrootsd.service: {p}")
    expect(p["Type"] == "notify" and p["Result"] == "success", f"gcrootsd: {p}")
    expect(p.get("StatusText", "") != "", "gcrootsd sent no STATUS= to systemd")


def helper_confined(user: str, notes: list[str]) -> None:
    pid = main_pid("gcroots-helper.service")
    st = proc_status(pid)
    want_uid = pwd.getpwnam("gcroots-helper").pw_uid
    keys = ("Uid", "NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    notes.append(f"pid {pid}: " + ", ".join(f"{k}={st.get(k)}" for k in keys))
    expect(st["Uid"].split() == [str(want_uid)] * 4, f"helper uid {st['Uid']}")
    expect(st["NoNewPrivs"] == "1", "no_new_privs is not set")
    expect(st["Seccomp"] == "2", "no seccomp filter")
    for k in ("CapPrm", "CapEff", "CapBnd"):
        expect(st[k] == CAPS, f"{k} is {st[k]}, want {CAPS}")
    for k in ("CapInh", "CapAmb"):
        expect(int(st[k], 16) == 0, f"{k} is {st[k]}")
    expect(os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/1/ns/net"),
           "the helper shares the host's network namespace")
    # It serves gcrootsd's user of this model, and no one else but root.
    listening = [e for e in events("gcroots-helper.service") if e.get("event") == "helper_listening"]
    allowed = listening[-1].get("allowed_uids") if listening else None
    notes.append(f"allowed_uids {allowed}")
    expect(allowed == [pwd.getpwnam(user).pw_uid], f"the helper allows {allowed}, want {user}")
    st = os.stat(HELPER_SOCK)
    expect(st.st_uid == pwd.getpwnam(user).pw_uid and stat.S_IMODE(st.st_mode) == 0o600,
           f"{HELPER_SOCK}: uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):o}")


def services_healthy_at_end(notes: list[str]) -> None:
    query("stats")
    for unit in UNITS:
        state = sh(["systemctl", "is-active", unit], check=False).stdout.strip()
        notes.append(f"{unit}: {state}")
        expect(state == "active", f"{unit} is {state}")
    p = prop("gcrootsd.service", "NRestarts", "Result", "MainPID")
    notes.append(f"gcrootsd: {p}")
    expect(p["NRestarts"] == "0", "gcrootsd was restarted (crash or watchdog)")
    p = prop("gcroots-gc.timer", "ActiveState", "SubState", "TimersCalendar", "TimersMonotonic")
    notes.append(f"gcroots-gc.timer: {p}")
    expect(p["SubState"] == "waiting" and "OnCalendar=*-*-* 00:00:00" in p["TimersCalendar"]
           and not p.get("TimersMonotonic"), f"the timer is not back to daily: {p}")
    failed = sh(["systemctl", "list-units", "--failed", "--plain", "--no-legend",
                 "gcroots*"]).stdout.strip()
    expect(failed == "", f"failed units: {failed}")


# -- the stock model ----------------------------------------------------------------------

def stock_install(report: Report, store_before: dict) -> None:
    """scripts/install on a stock host, its reruns and repairs (before the
    units are enabled)."""
    # A python3 first on PATH that the units' users cannot run (root's home
    # is 0700): the venv must still be Debian's.
    os.makedirs("/root/bin", exist_ok=True)
    shutil.copy2(os.path.realpath("/usr/bin/python3"), "/root/bin/python3")
    root_path = "/root/bin:" + DAEMON_ENV["PATH"]
    debian = os.path.realpath("/usr/bin/python3")

    with report.check("install") as notes:
        out = install(path=root_path)
        notes.append(out.stderr.strip()[-1500:])
        expect("the stock model: gcrootsd runs as root" in out.stderr, "not the stock model")
        expect(os.path.realpath("/opt/gcroots/bin/python") == debian,
               f"the venv's python is {os.path.realpath('/opt/gcroots/bin/python')}")
        for unit in ("gcrootsd.service", "gcroots-gc.service"):
            p = prop(unit, "User", "Group", "DropInPaths")
            notes.append(f"{unit}: {p}")
            expect(p["User"] == "root" and p["Group"] == "root", f"{unit}: {p}")
        expect(prop("gcroots-helper.socket", "SocketUser")["SocketUser"] == "root",
               "the helper's socket is not root's")
        env = prop("gcroots-helper.service", "Environment")["Environment"]
        expect("GCROOTSD_USER=root" in env, f"the helper's environment: {env}")
        now = owners("/nix/store", "/nix/var/nix")
        expect(all(now.get(p, v) == v for p, v in store_before.items()), "install chowned something")
    if not report.ok("install"):
        raise Failed("scripts/install failed: the stock model cannot be checked")

    with report.check("install_rerun_changes_nothing") as notes:
        before = fingerprint()
        t0 = time.monotonic()
        install()
        notes.append(f"rerun in {time.monotonic() - t0:.1f}s")
        after = fingerprint()
        changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
        expect(not changed, f"a rerun changed {changed}")

    with report.check("install_repairs_foreign_venv") as notes:
        sh(["rm", "-rf", "/opt/gcroots"])
        sh(["/root/bin/python3", "-m", "venv", "/opt/gcroots"])
        broken = runs_as("gcroots", "gcroots-query")
        notes.append(f"with a venv of /root/bin/python3: gcroots' --help exits {broken.returncode}: "
                     f"{broken.stderr.strip()[-300:]}")
        expect(broken.returncode != 0, "the foreign venv was not broken for gcroots")
        out = install()
        notes.append(out.stderr.strip()[-500:])
        expect(os.path.realpath("/opt/gcroots/bin/python") == debian, "the venv was not made again")
        expect(runs_as("gcroots", "gcroots-query").returncode == 0, "gcroots still cannot run it")

    with report.check("install_repairs_failed_ensurepip") as notes:
        sh(["rm", "-rf", "/opt/gcroots"])
        sh(["/usr/bin/python3", "-m", "venv", "--without-pip", "/opt/gcroots"])   # as if it failed
        out = install()
        notes.append(out.stderr.strip()[-500:])
        expect(sh(["/opt/gcroots/bin/python", "-m", "pip", "--version"], check=False).returncode == 0,
               "pip is still missing")

    with report.check("install_verifies_users") as notes:
        os.chmod("/opt/gcroots", 0o700)
        try:
            out = install(check=False)
        finally:
            os.chmod("/opt/gcroots", 0o755)
        notes.append(f"exit {out.returncode}: {out.stderr.strip()[-500:]}")
        expect(out.returncode == 1, f"install exited {out.returncode} with an unrunnable venv")
        expect(re.search(r"user \S+ cannot run /usr/local/bin/gcroots", out.stderr),
               "the error does not say which user cannot run what")
        install()
        for user, cmd in (("root", "gcrootsd"), ("gcroots-helper", "gcroots-helper"),
                          ("nobody", "gcroots-query")):
            expect(runs_as(user, cmd).returncode == 0, f"{user} cannot run {cmd}")


def stock_phase(world: World, report: Report) -> None:
    report.phase = "stock"
    store_before = owners("/nix/store", "/nix/var/nix")
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    stock_install(report, store_before)
    enable_units()
    o = world.out
    holder = world.holder.pid
    runtime_label = f"/proc/{holder}/fd/3"

    with report.check("roots_as_root") as notes:
        for user in ("alice", "bob"):
            st = os.stat(f"/home/{user}")
            expect(st.st_mode & 0o777 == 0o700 and st.st_uid == pwd.getpwnam(user).pw_uid,
                   f"/home/{user} is not {user}'s private home")
        roots = roots_json()
        pairs = {(r["link"], r["path"]) for r in roots}
        notes.append(f"{len(roots)} roots: " + "; ".join(f"{r['link']} -> {r['path']}"
                                                         for r in roots)[:3000])
        for want in (("/home/alice/webapp/result", o["aliceApp"]),
                     ("/home/bob/tool/result", o["bobTool"]),
                     ("/tmp/bob-ci/result", o["ciJob"]),
                     (runtime_label, o["held"])):
            expect(want in pairs, f"missing root {want[0]} -> {want[1]}")
        expect(not any(r["link"].startswith("/home/alice/old-webapp") for r in roots),
               "the removed result link is still reported as a root")

    with report.check("roots_as_bob_censored") as notes:
        roots = roots_json(user="bob")
        notes.append("; ".join(f"{r['link']} -> {r['path']}" for r in roots)[:3000])
        expect(("{censored}", o["held"]) in {(r["link"], r["path"]) for r in roots},
               f"bob does not see the runtime root of {o['held']} as {{censored}}")
        leaked = [r["link"] for r in roots if r["link"].startswith(("/proc/", "{temp:"))]
        expect(not leaked, f"runtime labels leaked to bob: {leaked}")
        expect(("/home/alice/webapp/result", o["aliceApp"]) in {(r["link"], r["path"])
                                                               for r in roots},
               "indirect roots are not labels to censor, but bob does not see alice's")

    with report.check("services_active") as notes:
        services_active(notes)

    with report.check("timer_waiting") as notes:
        p = prop("gcroots-gc.timer", "ActiveState", "SubState", "Unit", "UnitFileState",
                 "NextElapseUSecRealtime")
        notes.append(str(p))
        expect(p["ActiveState"] == "active" and p["SubState"] == "waiting", f"timer: {p}")
        expect(p["Unit"] == "gcroots-gc.service" and p["UnitFileState"] == "enabled",
               f"timer: {p}")

    with report.check("helper_confined") as notes:
        helper_confined("root", notes)

    with report.check("daemon_confined") as notes:
        daemon_confined("root", store_before, notes)

    with report.check("sandbox_check") as notes:
        # The helper's own sandbox layers, applied by `gcroots-helper
        # sandbox-check` as the unit's user with the unit's two ambient caps.
        # (Not the unit's own seccomp/address-family filters: the check needs
        # AF_INET and exec for its probes.)
        caps = "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE"
        out = sh(["systemd-run", "--wait", "--pipe", "--collect", "--quiet",
                  "-p", "User=gcroots-helper", "-p", "Group=gcroots-helper",
                  "-p", f"AmbientCapabilities={caps}", "-p", f"CapabilityBoundingSet={caps}",
                  "-p", "NoNewPrivileges=yes", "-p", "PrivateNetwork=yes", "-p", "PrivateTmp=yes",
                  "-p", "ProtectSystem=strict", "-p", "ProtectHome=read-only",
                  "/usr/local/bin/gcroots-helper", "sandbox-check",
                  "--readlink", "/home/alice/webapp/result"], check=False, timeout=120)
        notes.append(out.stdout[-4000:] + out.stderr[-2000:])
        expect(out.returncode == 0, f"sandbox-check exited {out.returncode}")
        expect("sandbox-check: PASS" in out.stdout, "no PASS line")

    garbage1 = world.entries(*World.GARBAGE1)
    live1 = world.entries(*World.LIVE1)
    with report.check("dead_set") as notes:
        before = store_entries()
        extra = before - garbage1 - live1
        expect(not extra, f"unexpected store entries: {sorted(extra)}")
        dead = set(query("dead").stdout.split())
        notes.append(f"gcroots-query dead: {sorted(dead)}")
        expect(dead == garbage1, f"dead set differs from the garbage built: extra "
               f"{sorted(dead - garbage1)}, missing {sorted(garbage1 - dead)}")
        theirs = set(nix("nix-store", "--gc", "--print-dead").split())
        expect(theirs == dead, f"nix-store --gc --print-dead differs: {sorted(theirs ^ dead)}")

    with report.check("bob_refused_by_helper") as notes:
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "s.settimeout(10)\n"
                 "try:\n"
                 f"    s.connect({HELPER_SOCK!r})\n"
                 "except OSError as e:\n"
                 "    print('connect-refused', e.errno); sys.exit(0)\n"
                 "try:\n"
                 "    s.sendall(b'GCRS' + bytes(60))\n"
                 "except OSError:\n"
                 "    pass\n"
                 "try:\n"
                 "    data = s.recv(65536)\n"
                 "except OSError as e:\n"
                 "    print('recv-error', e.errno); sys.exit(0)\n"
                 "print('received', len(data))\n")
        bob_uid = pwd.getpwnam("bob").pw_uid
        st = os.stat(HELPER_SOCK)
        notes.append(f"{HELPER_SOCK}: mode {st.st_mode & 0o777:o}, uid {st.st_uid}")
        out = sh(["python3", "-c", probe], user="bob").stdout.strip()
        notes.append(f"bob, socket as installed: {out}")
        expect(out == "connect-refused 13", f"bob's connect was not refused with EACCES: {out}")
        # Variant: the socket opened to everybody; the helper's own SO_PEERCRED
        # check must close bob's connection without sending a byte.
        os.chmod(HELPER_SOCK, 0o666)
        try:
            out = sh(["python3", "-c", probe], user="bob").stdout.strip()
        finally:
            os.chmod(HELPER_SOCK, st.st_mode & 0o777)
        notes.append(f"bob, socket made 0666: {out}")
        expect(out in ("received 0", "recv-error 104"), f"the helper answered bob: {out}")
        refused = [e for e in events("gcroots-helper.service")
                   if e.get("event") == "peer_refused" and e.get("peer_uid") == bob_uid]
        expect(refused, "the helper did not log peer_refused for bob")

    with report.check("bob_cannot_collect") as notes:
        before = store_entries()
        out = query("gc", "--yes", user="bob", check=False)
        notes.append(f"exit {out.returncode}: {out.stderr.strip()}")
        expect(out.returncode == 3, f"bob's gc exited {out.returncode}, want 3 (refused)")
        expect(store_entries() == before, "bob's refused gc changed the store")

    with report.check("helper_killed_gc_refuses") as notes:
        BULK.mkdir()
        for i in range(BULK_LINKS):
            os.symlink(o["aliceApp"], BULK / f"r{i}")
        t0 = time.monotonic()
        query("stats")
        notes.append(f"{BULK_LINKS} extra roots; an analysis now takes "
                     f"{time.monotonic() - t0:.2f}s")
        before = store_entries()
        daemon = main_pid("gcrootsd.service")
        failed_before = sum(1 for e in events("gcrootsd.service")
                            if e.get("event") == "helper_attempt_failed")
        gc = subprocess.Popen(["/usr/local/bin/gcroots-query", "gc", "--yes"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        kills = []
        deadline = time.monotonic() + 240
        # gcrootsd retries a failed scan a few times: the helper (restarted
        # by systemd each time) is killed in the middle of every one.
        while gc.poll() is None and time.monotonic() < deadline:
            helper = main_pid("gcroots-helper.service")
            if helper and helper_busy(helper, daemon):
                time.sleep(0.3)   # well into the scan
                if helper_busy(helper, daemon):
                    subprocess.run(["systemctl", "kill", "--signal=SIGKILL",
                                    "gcroots-helper.service"], check=True)
                    kills.append(helper)
                    wait_until(lambda: main_pid("gcroots-helper.service") != helper, 10,
                               "the killed helper to go", step=0.02)
                    continue
            time.sleep(0.02)
        if gc.poll() is None:
            gc.kill()
        out, err = gc.communicate()
        notes.append(f"killed helper pids {kills}; gc exit {gc.returncode}; stderr: {err.strip()}")
        attempts = [e for e in events("gcrootsd.service")
                    if e.get("event") == "helper_attempt_failed"][failed_before:]
        notes.append("gcrootsd: " + "; ".join(e.get("error", "") for e in attempts))
        after = store_entries()
        expect(kills, "the helper was never caught scanning")
        expect(gc.returncode == 1, f"gc exited {gc.returncode}, want 1")
        expect(out == "", f"gc printed an answer: {out[:500]}")
        expect("no complete root set" in err, "gc's error does not say why")
        expect(after == before, f"the refused collection deleted {sorted(before - after)}")
        expect(sh(["systemctl", "is-active", "gcrootsd.service"], check=False).stdout.strip()
               == "active", "gcrootsd did not survive")
        expect(any("incomplete" in e.get("error", "") or "broke the protocol" in e.get("error", "")
                   or "Connection reset" in e.get("error", "") for e in attempts),
               "no attempt failed with a cut stream (was the helper killed mid-scan?)")

    # Back to normal: the bulk roots go; the helper may have hit systemd's
    # start limit after so many kills.
    subprocess.run(["rm", "-rf", str(BULK)], check=True)
    p = prop("gcroots-helper.socket", "ActiveState", "Result")
    report.info["helper_socket_after_kills"] = p
    if p["ActiveState"] != "active":
        sh(["systemctl", "reset-failed", "gcroots-helper.service", "gcroots-helper.socket"])
        sh(["systemctl", "start", "gcroots-helper.socket"])
    report.info["helper_restarts"] = prop("gcroots-helper.service", "NRestarts")["NRestarts"]

    with report.check("gc_exact") as notes:
        before = store_entries()
        out = query("--json", "gc", "--yes")
        notes.append(out.stdout[:2000] + out.stderr[-1000:])
        after = store_entries()
        deleted = before - after
        expect(after <= before, f"new store entries appeared: {sorted(after - before)}")
        expect(deleted == garbage1, f"deleted {sorted(deleted)}, expected {sorted(garbage1)}")
        expect(live1 <= after, f"live paths were deleted: {sorted(live1 - after)}")
        for attr, link in (("aliceApp", "/home/alice/webapp/result"),
                           ("bobTool", "/home/bob/tool/result"),
                           ("ciJob", "/tmp/bob-ci/result")):
            expect(os.path.exists(o[attr] + "/README") and os.readlink(link) == o[attr],
                   f"{link} no longer reaches {o[attr]}")
        expect(os.readlink(f"/proc/{holder}/fd/3") == o["held"] + "/README",
               "bob's process lost its file")
        valid = nix("nix-store", "--check-validity", "--print-invalid", *sorted(live1))
        expect(valid == "", f"invalid after gc: {valid}")

    with report.check("verify_clean") as notes:
        verify_clean(notes)

    deleted2: set[str] = set()
    with report.check("timer_gc_while_building") as notes:
        sh(["rm", "/home/bob/tool/result"], user="bob")   # bob's tool becomes garbage
        world.build("laterDep")
        world.build("later")
        garbage2 = world.entries(*World.GARBAGE2)
        live2 = world.entries(*World.LIVE2)
        before = store_entries()
        expect(garbage2 <= before, "round-2 garbage missing before the collection")
        collect_while_building(world, "stock", "laterDep", notes)
        after = store_entries()
        deleted2 = before - after
        # Exactly the garbage -- but for what bob's build took up meanwhile.
        expect(deleted2 <= garbage2 and garbage2 - deleted2 <= world.entries("laterDep"),
               f"deleted {sorted(deleted2)}, expected {sorted(garbage2)}")
        expect(live2 <= after, f"live paths were deleted: {sorted(live2 - after)}")
        auto = {os.readlink(p) for p in Path("/nix/var/nix/gcroots/auto").iterdir()}
        notes.append(f"gcroots/auto now: {sorted(auto)}")
        expect("/home/bob/tool/result" not in auto, "bob's stale auto link was not removed")
        expect("/home/alice/webapp/result" in auto, "alice's auto link is gone")
        expect_collected_by("root", notes)

    with report.check("journal_structured") as notes:
        got = {}
        for unit in ("gcrootsd.service", "gcroots-helper.service"):
            evs = events(unit)
            unparsed = [e["unparsed"] for e in evs if e.get("event") is None]
            names = {e.get("event") for e in evs}
            got[unit] = names
            notes.append(f"{unit}: {len(evs)} entries, events {sorted(n for n in names if n)}")
            expect(evs, f"no journal entries from {unit}")
            expect(not unparsed, f"{unit} wrote unstructured lines: {unparsed[:5]}")
        need = {"daemon_ready", "request", "analysis", "gc_planned", "gc_finished", "gc_failed",
                "helper_attempt_failed"}
        expect(need <= got["gcrootsd.service"], f"gcrootsd lacks {need - got['gcrootsd.service']}")
        need = {"helper_listening", "scan_served", "peer_refused"}
        expect(need <= got["gcroots-helper.service"],
               f"the helper lacks {need - got['gcroots-helper.service']}")
        finished = [e for e in events("gcrootsd.service") if e.get("event") == "gc_finished"]
        notes.append(f"gc_finished: {finished}")
        expect(len(finished) == 2, f"{len(finished)} gc_finished events, want 2")

    with report.check("metrics") as notes:
        out = sh(["cat", METRICS], user="nobody", check=False)
        expect(out.returncode == 0, f"nobody cannot read {METRICS}: {out.stderr.strip()}")
        values = {}
        for line in out.stdout.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        notes.append("; ".join(f"{k} {v:g}" for k, v in sorted(values.items())))
        # What the two collections deleted, as gcrootsd logged it: bob's build
        # during the second may have made a deleted path again.
        runs = [e.get("paths") for e in events("gcrootsd.service") if e.get("event") == "gc_finished"]
        notes.append(f"gc_finished paths: {runs}; gone from the store: {len(garbage1)}, "
                     f"{len(deleted2)}")
        expect(len(runs) == 2 and runs[0] == len(garbage1) and runs[1] >= len(deleted2),
               f"gc_finished paths {runs}")
        n_deleted = sum(runs)
        for name in ("gcroots_live_paths", "gcroots_gc_freed_bytes_total",
                     "gcroots_gc_deleted_paths_total", 'gcroots_roots{kind="runtime"}',
                     'gcroots_failures_total{what="gc"}'):
            expect(name in values, f"{name} missing")
        expect(values["gcroots_gc_freed_bytes_total"] > 0, "nothing freed according to metrics")
        expect(values["gcroots_gc_deleted_paths_total"] == n_deleted,
               f"deleted paths {values['gcroots_gc_deleted_paths_total']}, want {n_deleted}")
        expect(values['gcroots_roots{kind="runtime"}'] >= 1, "no runtime root counted")
        expect(values['gcroots_failures_total{what="gc"}'] >= 1, "the refused gc is not counted")

    with report.check("services_healthy_at_end") as notes:
        services_healthy_at_end(notes)

    with report.check("build_after_gc") as notes:
        build_after_gc(world, "stock", notes)
        verify_clean(notes)

    with report.check("no_permission_errors") as notes:
        no_permission_errors(since, notes)

    with report.check("uninstall") as notes:
        out = install("--uninstall")
        notes.append(out.stderr.strip()[-500:] + out.stdout.strip()[-500:])
        expect_uninstalled(notes)
        now = owners("/nix/store", "/nix/var/nix")
        changed = [p for p in store_before if p in now and now[p] != store_before[p]]
        expect(not changed, f"owners changed: {changed[:10]}")


# -- the rootless model -------------------------------------------------------------------

def rootless_phase(world: World, report: Report) -> None:
    report.phase = "rootless"
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    daemon_dropin = Path("/etc/systemd/system/nix-daemon.service.d/rootless.conf")

    with report.check("take_store_refused") as notes:
        before = owners("/nix/store", "/nix/var/nix")
        # nix-daemon.service without User=: configured to run as root.
        out = install("--take-store", check=False)
        notes.append(f"configured as root: exit {out.returncode}: {out.stderr.strip()}")
        expect(out.returncode == 1 and "nix-daemon runs as root" in out.stderr,
               "--take-store was not refused while nix-daemon is configured as root")
        # Now configured as nix, but the root one from before still runs.
        sh(["useradd", "--system", "--no-create-home", "--home-dir", "/var/empty", "--shell",
            "/usr/sbin/nologin", "--user-group", "nix"])
        daemon_dropin.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOTLESS_DROPIN, daemon_dropin)
        sh(["systemctl", "daemon-reload"])
        expect(0 in nix_daemon_uids(), "no root nix-daemon runs (the stock phase's)")
        out = install("--take-store", check=False)
        notes.append(f"still running as root: exit {out.returncode}: {out.stderr.strip()}")
        expect(out.returncode == 1 and "nix-daemon runs as root" in out.stderr,
               "--take-store was not refused while a root nix-daemon runs")
        expect(not installed_files() and not accounts(), f"refused, yet made {installed_files()}")
        expect(owners("/nix/store", "/nix/var/nix") == before, "refused, yet changed owners")
    if not report.ok("take_store_refused"):
        raise Failed("--take-store was not refused: the rootless phase cannot go on")

    sh(["systemctl", "stop", "nix-daemon.service"])
    taken_from = owners("/nix/store", "/nix/var/nix", "/nix/var/log/nix")
    with report.check("install") as notes:
        out = install("--take-store")
        notes.append(out.stderr.strip()[-1500:])
        expect("the rootless model: gcrootsd runs as nix" in out.stderr, "not the rootless model")
        nix_user = pwd.getpwnam("nix")
        for unit in ("gcrootsd.service", "gcroots-gc.service"):
            p = prop(unit, "User", "Group")
            expect(p["User"] == "nix" and p["Group"] == "nix", f"{unit}: {p}")
        for p in ("/nix/store", "/nix/var/nix", "/nix/var/nix/db/db.sqlite",
                  "/nix/var/nix/gcroots/auto", world.out["libc"]):
            expect(os.lstat(p).st_uid == nix_user.pw_uid, f"{p} is not nix's")
        for p in ("/home/alice", "/nix/var/nix/profiles/per-user/alice",
                  "/nix/var/nix/gcroots/per-user/alice"):
            if os.path.exists(p):
                expect(os.lstat(p).st_uid == pwd.getpwnam("alice").pw_uid, f"{p} was taken")
    if not report.ok("install"):
        raise Failed("scripts/install --take-store failed: the rootless model cannot be checked")
    now = owners("/nix/store", "/nix/var/nix", "/nix/var/log/nix")
    taken = {p: v for p, v in taken_from.items() if now.get(p, v) != v}   # what install changed
    report.info["taken_by_install"] = len(taken)
    enable_units()

    with report.check("builds_through_the_unprivileged_daemon") as notes:
        user_dir("alice", "/home/alice/rl")
        world.build("rlApp", "/home/alice/rl/result", user="alice")
        for attr in ("rlLib", "rlOld", "rlScratch"):
            world.build(attr)
        uids = nix_daemon_uids()
        notes.append(f"nix-daemon uids {uids}")
        expect(uids and set(uids) == {pwd.getpwnam("nix").pw_uid}, f"nix-daemon runs as {uids}")
        notes.append(f"built {[world.out[a] for a in ('rlApp', 'rlOld')]}")

    garbage = world.entries(*World.GARBAGE_R)
    with report.check("dead_set") as notes:   # (the first query starts the socket units)
        dead = set(query("dead").stdout.split())
        notes.append(f"gcroots-query dead: {sorted(dead)}")
        expect(dead == garbage, f"dead set differs from the garbage built: extra "
               f"{sorted(dead - garbage)}, missing {sorted(garbage - dead)}")

    with report.check("services_active") as notes:
        services_active(notes)

    with report.check("daemon_confined") as notes:
        daemon_confined("nix", {}, notes)

    with report.check("helper_confined") as notes:
        helper_confined("nix", notes)

    with report.check("timer_gc_while_building") as notes:
        live = store_entries() - garbage
        before = store_entries()
        collect_while_building(world, "rootless", "rlOld", notes)
        after = store_entries()
        deleted = before - after
        expect(deleted <= garbage and garbage - deleted <= world.entries("rlOld"),
               f"deleted {sorted(deleted)}, expected {sorted(garbage)}")
        expect(live <= after, f"live paths were deleted: {sorted(live - after)}")
        expect_collected_by("nix", notes)

    with report.check("verify_clean") as notes:
        verify_clean(notes)

    with report.check("build_after_gc") as notes:
        build_after_gc(world, "rootless", notes)

    with report.check("no_permission_errors") as notes:
        no_permission_errors(since, notes)

    with report.check("services_healthy_at_end") as notes:
        services_healthy_at_end(notes)

    with report.check("uninstall_refused_while_nix_daemon_owns_the_store") as notes:
        out = install("--uninstall", check=False)
        notes.append(f"exit {out.returncode}: {out.stderr.strip()}")
        expect(out.returncode == 1 and "nix-daemon runs as nix" in out.stderr,
               "uninstall was not refused")
        expect(os.path.exists("/opt/gcroots") and os.stat("/nix/store").st_uid
               == pwd.getpwnam("nix").pw_uid, "the refused uninstall changed something")

    with report.check("uninstall_gives_the_store_back") as notes:
        # nix-daemon back to root first, as the refusal says.
        daemon_dropin.unlink()
        sh(["systemctl", "daemon-reload"])
        sh(["systemctl", "stop", "nix-daemon.service"])
        out = install("--uninstall")
        notes.append(out.stderr.strip()[-500:] + out.stdout.strip()[-300:])
        expect_uninstalled(notes)
        now = owners("/nix/store", "/nix/var/nix", "/nix/var/log/nix")
        wrong = [p for p, v in taken.items() if p in now and now[p] != v]
        notes.append(f"{len(taken)} entries were taken, {sum(p in now for p in taken)} are left")
        expect(taken and not wrong,
               f"not given back: {[(p, now[p], taken[p]) for p in wrong[:10]]}")
        nix_uid = pwd.getpwnam("nix").pw_uid
        made = sorted(p for p in now if p not in taken_from and now[p][0] == nix_uid)
        notes.append(f"{len(made)} entries made by the rootless nix-daemon stay nix's")
        st = os.stat("/nix/store")
        expect((st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o1775), "the store dir is not root's")

    with report.check("root_daemon_builds_after_uninstall") as notes:
        build_after_gc(world, "back-to-root", notes)
        expect(set(nix_daemon_uids()) == {0}, f"nix-daemon runs as {nix_daemon_uids()}")
        verify_clean(notes)


def main() -> int:
    report = Report()
    world = World()
    report.write()
    try:
        setup(world, report)
    except Exception as e:
        report.setup_error = f"{e}\n{traceback.format_exc(limit=5)}"
        say(f"setup failed: {report.setup_error}")
        report.write()
        return 1
    try:
        t0 = time.monotonic()
        stock_phase(world, report)
        report.info["stock_seconds"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        rootless_phase(world, report)
        report.info["rootless_seconds"] = round(time.monotonic() - t0, 1)
    except Exception as e:
        report.setup_error = f"{report.phase} phase aborted: {e}\n{traceback.format_exc(limit=5)}"
        say(report.setup_error)
    finally:
        if world.holder is not None:
            world.holder.send_signal(signal.SIGKILL)
        report.info["seconds_total"] = round(time.monotonic() - report.t0, 1)
        report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
