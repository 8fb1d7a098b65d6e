#!/usr/bin/python3
"""The multi-user host scenario, run *inside* the booted Debian container by
gcroots-scenario.service (Debian's python3, standard library only).

It installs gcroots with scripts/install --take-store, enables the units
under the container's real systemd, builds a small store with the real Nix,
gives alice and bob `result` roots in their 0700 homes and bob a running
process holding a store path open, then runs the checks.  Every check is
recorded on its own (ok + detail) in a JSON report that the host-side test
(tests/test_container.py) asserts; a failing check never stops the others.
Finally the container powers off (the unit's ExecStopPost).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
NIX_FILE = SRC / "tests/container/scenario.nix"
WHEELS = Path("/var/cache/gcroots-wheels")
RESULTS = Path(sys.argv[1] if len(sys.argv) > 1 else "/results")
STORE = Path("/nix/store")
HELPER_SOCK = "/run/gcroots/helper.sock"
METRICS = Path("/var/lib/gcroots/metrics/gcroots.prom")
BULK = Path("/nix/var/nix/gcroots/bulk")
BULK_LINKS = 100_000          # makes one helper scan last a few seconds
UNITS = ("gcroots-helper.socket", "gcrootsd.socket", "gcroots-helper.service",
         "gcrootsd.service")
CAPS = "0000000000080004"     # CAP_DAC_READ_SEARCH (2) | CAP_SYS_PTRACE (19)
STORE_NAME = re.compile(r"^[0-9a-df-np-sv-z]{32}-[^/]+$")

NIX_ENV = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
NIX_ENV.update(HOME="/root", NIX_CONFIG="substituters =\nsandbox = false\nbuild-users-group =")


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

    @contextmanager
    def check(self, name: str):
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

def nix(*args: str, timeout: float = 300) -> str:
    """The real Nix 2.8, single-user, as root; the store is handed back to
    gcrootsd's user afterwards (Nix may create root-owned DB files)."""
    try:
        return sh(args, env=NIX_ENV, timeout=timeout).stdout.strip()
    finally:
        take_store()


def take_store() -> None:
    if os.path.isdir("/nix/var/nix"):
        try:
            pwd.getpwnam("gcroots")
        except KeyError:
            return  # not installed yet: scripts/install --take-store does it
        subprocess.run(["chown", "-R", "gcroots:gcroots", "/nix/store", "/nix/var/nix"],
                       check=True)


def store_entries() -> set[str]:
    return {f"/nix/store/{n}" for n in os.listdir(STORE) if STORE_NAME.match(n)
            and not n.endswith(".lock")}


class World:
    def __init__(self) -> None:
        self.out: dict[str, str] = {}
        self.drv: dict[str, str] = {}
        self.holder: subprocess.Popen | None = None

    def build(self, attr: str, link: str | None = None) -> str:
        self.drv[attr] = nix("nix-instantiate", str(NIX_FILE), "-A", attr)
        args = ["-o", link] if link else ["--no-out-link"]
        self.out[attr] = nix("nix-build", str(NIX_FILE), "-A", attr, *args)
        return self.out[attr]

    def entries(self, *attrs: str) -> set[str]:
        """Outputs and derivations (keep-derivations keeps a live output's .drv)."""
        return {self.out[a] for a in attrs} | {self.drv[a] for a in attrs}

    LIVE1 = ("libc", "zlib", "aliceApp", "bobTool", "ciJob", "heldDep", "held")
    GARBAGE1 = ("oldLib", "oldApp", "scratch")
    LIVE2 = ("libc", "zlib", "aliceApp", "ciJob", "heldDep", "held")
    GARBAGE2 = ("bobTool", "laterDep", "later")


def add_user(name: str) -> pwd.struct_passwd:
    sh(["useradd", "--create-home", "--shell", "/bin/bash", name])
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return pw


def link_for(user: str, link: str) -> None:
    """Hand a result link (and its directory) to its owner."""
    pw = pwd.getpwnam(user)
    d = os.path.dirname(link)
    os.lchown(link, pw.pw_uid, pw.pw_gid)
    os.chown(d, pw.pw_uid, pw.pw_gid)


def setup(world: World, report: Report) -> None:
    t0 = time.monotonic()
    alice, bob = add_user("alice"), add_user("bob")
    os.makedirs("/home/alice/webapp")
    os.makedirs("/home/alice/old-webapp")
    os.makedirs("/home/bob/tool")
    world.build("aliceApp", "/home/alice/webapp/result")
    world.build("bobTool", "/home/bob/tool/result")
    # A CI job's result under /tmp: a unit with PrivateTmp= would not see it.
    os.makedirs("/tmp/bob-ci")
    world.build("ciJob", "/tmp/bob-ci/result")
    world.build("oldApp", "/home/alice/old-webapp/result")
    os.unlink("/home/alice/old-webapp/result")  # its gcroots/auto link is now stale
    world.build("scratch")
    world.build("held")
    for attr in ("libc", "zlib", "heldDep", "oldLib"):
        world.build(attr)
    link_for("alice", "/home/alice/webapp/result")
    link_for("bob", "/home/bob/tool/result")
    link_for("bob", "/tmp/bob-ci/result")
    os.chown("/home/alice/old-webapp", alice.pw_uid, alice.pw_gid)
    report.info["nix_build_seconds"] = round(time.monotonic() - t0, 1)
    report.info["nix_version"] = sh(["nix-store", "--version"]).stdout.strip()

    t0 = time.monotonic()
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELS),
               PIP_CONFIG_FILE="/dev/null", PIP_DISABLE_PIP_VERSION_CHECK="1")
    sh([SRC / "scripts/install", "--take-store"], env=env, timeout=900)
    report.info["install_seconds"] = round(time.monotonic() - t0, 1)
    sh(["systemctl", "enable", "--now", "gcroots-helper.socket", "gcrootsd.socket",
        "gcroots-gc.timer"])

    # bob's long-running process holds a file of `held` open (fd 3); nothing
    # else keeps `held` alive.  setpriv execs (no fork): the pid is the holder.
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


# -- small tools -------------------------------------------------------------------

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


# -- the checks --------------------------------------------------------------------

def run_checks(world: World, report: Report) -> None:
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
        for unit in UNITS:
            state = sh(["systemctl", "is-active", unit], check=False).stdout.strip()
            notes.append(f"{unit}: {state}")
            expect(state == "active", f"{unit} is {state}")
        p = prop("gcrootsd.service", "Type", "NRestarts", "Result", "StatusText", "WatchdogUSec")
        notes.append(f"gcrootsd.service: {p}")
        expect(p["Type"] == "notify" and p["Result"] == "success", f"gcrootsd: {p}")
        expect(p.get("StatusText", "") != "", "gcrootsd sent no STATUS= to systemd")

    with report.check("timer_waiting") as notes:
        p = prop("gcroots-gc.timer", "ActiveState", "SubState", "Unit", "UnitFileState",
                 "NextElapseUSecRealtime")
        notes.append(str(p))
        expect(p["ActiveState"] == "active" and p["SubState"] == "waiting", f"timer: {p}")
        expect(p["Unit"] == "gcroots-gc.service" and p["UnitFileState"] == "enabled",
               f"timer: {p}")

    with report.check("helper_confined") as notes:
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

    with report.check("daemon_unprivileged") as notes:
        pid = main_pid("gcrootsd.service")
        st = proc_status(pid)
        want_uid = pwd.getpwnam("gcroots").pw_uid
        notes.append(f"pid {pid}: Uid={st['Uid']} CapEff={st['CapEff']} CapBnd={st['CapBnd']} "
                     f"NoNewPrivs={st['NoNewPrivs']} Seccomp={st['Seccomp']}")
        expect(st["Uid"].split() == [str(want_uid)] * 4, f"gcrootsd uid {st['Uid']}")
        expect(int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, "gcrootsd has caps")
        expect(st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", "gcrootsd not confined")
        expect(os.stat("/nix/store").st_uid == want_uid, "gcroots does not own the store")

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
        out = subprocess.run(["nix-store", "--verify", "--check-contents"], env=NIX_ENV,
                             capture_output=True, text=True, timeout=300)
        take_store()
        problems = [line for line in out.stderr.splitlines()
                    if not line.startswith(("checking", "reading the Nix store"))]
        notes.append(f"exit {out.returncode}; " + "; ".join(problems))
        expect(out.returncode == 0 and not problems, "nix-store --verify found problems")

    with report.check("timer_gc") as notes:
        sh(["rm", "/home/bob/tool/result"], user="bob")   # bob's tool becomes garbage
        world.build("laterDep")
        world.build("later")
        garbage2 = world.entries(*World.GARBAGE2)
        live2 = world.entries(*World.LIVE2)
        before = store_entries()
        expect(garbage2 <= before, "round-2 garbage missing before the collection")
        # The installed timer itself fires the service: a runtime drop-in
        # makes it elapse a second from now instead of at midnight + up to 1h.
        expect(prop("gcroots-gc.service", "ExecMainExitTimestampMonotonic")
               ["ExecMainExitTimestampMonotonic"] == "0", "gcroots-gc.service ran before")
        dropin = Path("/run/systemd/system/gcroots-gc.timer.d/now.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Timer]\nOnCalendar=\nOnActiveSec=1s\nRandomizedDelaySec=0\n"
                          "AccuracySec=1us\n")
        try:
            sh(["systemctl", "daemon-reload"])
            sh(["systemctl", "restart", "gcroots-gc.timer"])
            wait_until(lambda: prop("gcroots-gc.service", "ExecMainExitTimestampMonotonic")
                       ["ExecMainExitTimestampMonotonic"] != "0", 120,
                       "the timer to run gcroots-gc.service")
        finally:
            dropin.unlink()
            sh(["systemctl", "daemon-reload"])
            sh(["systemctl", "restart", "gcroots-gc.timer"])
        p = prop("gcroots-gc.service", "Result", "ExecMainStatus", "ActiveState")
        notes.append(f"gcroots-gc.service after the timer fired: {p}")
        expect(p["Result"] == "success" and p["ExecMainStatus"] == "0",
               f"gcroots-gc.service: {p}")
        after = store_entries()
        deleted = before - after
        expect(deleted == garbage2, f"deleted {sorted(deleted)}, expected {sorted(garbage2)}")
        expect(live2 <= after, f"live paths were deleted: {sorted(live2 - after)}")
        auto = {os.readlink(p) for p in Path("/nix/var/nix/gcroots/auto").iterdir()}
        notes.append(f"gcroots/auto now: {sorted(auto)}")
        expect("/home/bob/tool/result" not in auto, "bob's stale auto link was not removed")
        expect("/home/alice/webapp/result" in auto, "alice's auto link is gone")
        finished = [e for e in events("gcrootsd.service") if e.get("event") == "gc_finished"]
        by = finished[-1].get("by") if finished else None
        notes.append(f"gcrootsd's last gc_finished: {finished[-1] if finished else None}")
        expect(by == f"uid {pwd.getpwnam('gcroots').pw_uid}",
               f"the last collection was not the service's (user gcroots): by={by}")

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
        n_deleted = len(garbage1) + len(world.entries(*World.GARBAGE2))
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
        query("stats")
        for unit in UNITS:
            state = sh(["systemctl", "is-active", unit], check=False).stdout.strip()
            notes.append(f"{unit}: {state}")
            expect(state == "active", f"{unit} is {state}")
        p = prop("gcrootsd.service", "NRestarts", "Result", "MainPID")
        notes.append(f"gcrootsd: {p}")
        expect(p["NRestarts"] == "0", "gcrootsd was restarted (crash or watchdog)")
        p = prop("gcroots-gc.timer", "ActiveState", "SubState", "TimersCalendar",
                 "TimersMonotonic")
        notes.append(f"gcroots-gc.timer: {p}")
        expect(p["SubState"] == "waiting" and "OnCalendar=*-*-* 00:00:00" in p["TimersCalendar"]
               and not p.get("TimersMonotonic"), f"the timer is not back to daily: {p}")
        failed = sh(["systemctl", "list-units", "--failed", "--plain", "--no-legend",
                     "gcroots*"]).stdout.strip()
        expect(failed == "", f"failed units: {failed}")


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
        run_checks(world, report)
    except Exception as e:
        report.setup_error = f"scenario aborted: {e}\n{traceback.format_exc(limit=5)}"
        say(report.setup_error)
    finally:
        if world.holder is not None:
            world.holder.send_signal(signal.SIGKILL)
        report.info["seconds_total"] = round(time.monotonic() - report.t0, 1)
        report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
