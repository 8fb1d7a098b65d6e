#!/usr/bin/env python3
"""The main job, end to end: a demo store built by the real Nix, the
privileged helper as root, gcrootsd as an unprivileged user, and
gcroots-query answering about roots and garbage -- then everything is
cleaned up.  Run through ./scripts/demo (as root)."""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DAEMON_USER = "gcroots"
ALICE = "gcroots-demo-alice"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class Demo:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="gcroots-demo-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.store, self.state = self.dir / "store", self.dir / "var"
        self.homes, self.run = self.dir / "home", self.dir / "run"
        self.helper_run = self.dir / "run-helper"   # root's: the helper refuses others' dirs
        self.created_users: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.nix_env = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
        self.nix_env.update(NIX_STORE_DIR=str(self.store), NIX_STATE_DIR=str(self.state),
                            NIX_LOG_DIR=str(self.dir / "log"),
                            NIX_CONFIG="substituters =\nsandbox = false\nbuild-users-group =")
        self.layout_args = ["--store-dir", str(self.store), "--state-dir", str(self.state)]

    # -- helpers ---------------------------------------------------------------

    def say(self, title: str) -> None:
        print(f"\n{BOLD}== {title} =={RESET}", flush=True)

    def note(self, text: str) -> None:
        print(textwrap.indent(textwrap.fill(text, 76), "   "), flush=True)

    def show(self, data: bytes, limit: int = 12) -> None:
        lines = data.decode(errors="replace").splitlines()
        for line in lines[:limit]:
            print(f"   {line.replace(str(self.dir), '$DEMO')}")
        if len(lines) > limit:
            print(f"   {DIM}... ({len(lines) - limit} more){RESET}")
        sys.stdout.flush()

    def nix(self, *args: str) -> str:
        out = subprocess.run(args, env=self.nix_env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"demo: {' '.join(args[:3])} failed:\n{out.stderr}")
        return out.stdout.strip()

    def build(self, attr: str, out_link: Path | None = None) -> str:
        link = ["-o", str(out_link)] if out_link else ["--no-out-link"]
        return self.nix("nix-build", str(REPO / "scripts/demo.nix"), "-A", attr, *link)

    def query(self, *args: str, user: str | None = None, check: bool = True) -> bytes:
        cmd = [str(BIN / "gcroots-query"), "--socket", str(self.run / "gcrootsd.sock"), *args]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        # Arguments (why's) are store paths of this store, as for Nix's commands.
        out = subprocess.run(cmd, capture_output=True,
                             env=dict(os.environ, NIX_STORE_DIR=str(self.store)))
        if check and out.returncode != 0:
            raise SystemExit(f"demo: gcroots-query {' '.join(args)} failed: {out.stderr.decode()}")
        return out.stdout

    def ensure_user(self, name: str, system: bool) -> None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            cmd = ["useradd", "--shell", "/usr/sbin/nologin"]
            cmd += ["--system", "--no-create-home"] if system else ["--create-home"]
            subprocess.run(cmd + [name], check=True)
            self.created_users.append(name)

    def wait_socket(self, path: Path, proc: subprocess.Popen) -> None:
        for _ in range(200):
            if path.exists():
                return
            if proc.poll() is not None:
                raise SystemExit(f"demo: {proc.args[0]} exited early; see {self.dir}/*.log")
            time.sleep(0.05)
        raise SystemExit(f"demo: {path} did not appear")

    # -- the story ---------------------------------------------------------------

    def setup(self) -> dict[str, str]:
        self.say("Building a demo store with the real Nix")
        self.ensure_user(DAEMON_USER, system=True)
        self.ensure_user(ALICE, system=False)
        alice_home = self.homes / "alice"
        paths = {}
        paths["app"] = self.build("app", alice_home / "webapp" / "result")
        self.build("oldApp", alice_home / "old-webapp" / "result")
        (alice_home / "old-webapp" / "result").unlink()  # its auto root is now stale
        self.build("scratch", self.homes / "bob" / "experiment" / "result")
        (self.homes / "bob" / "experiment" / "result").unlink()
        profile = self.state / "profiles" / "per-user" / "root" / "profile"
        paths["editor"] = self.build("editor")
        self.nix("nix-env", "-p", str(profile), "--set", paths["editor"])
        paths["curl"] = self.build("curl")
        self.nix("nix-env", "-p", str(profile), "--set", paths["curl"])
        paths["oldCurl"] = self.build("oldCurl")
        paths["openssl"] = self.build("openssl")
        paths["libc"] = self.build("libc")
        self.note(f"Store at $DEMO/store ({len(os.listdir(self.store))} entries).  Roots: alice's "
                  "`result` link in her 0700 home, a profile with two generations, and (soon) a "
                  "running process.  Garbage: an old webapp and bob's experiment, whose result links "
                  "were removed.")
        # A running program still using the old curl, which nothing else needs.
        self.procs.append(subprocess.Popen(["sleep", "3600"], env={"DEMO_CURL": paths["oldCurl"]}))
        # Alice's home is private; the store belongs to the daemon's user, as
        # in a rootless Nix set-up.
        subprocess.run(["chown", "-R", f"{ALICE}:", str(alice_home)], check=True)
        os.chmod(alice_home, 0o700)
        pw = pwd.getpwnam(DAEMON_USER)
        for top in (self.store, self.state):
            subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(top)], check=True)
        self.run.mkdir()
        self.helper_run.mkdir(mode=0o755)
        os.chown(self.run, pw.pw_uid, pw.pw_gid)
        return paths

    def start(self) -> None:
        self.say("Starting gcroots-helper (root) and gcrootsd (user 'gcroots')")
        helper_log = open(self.dir / "helper.log", "wb")
        helper = subprocess.Popen([str(BIN / "gcroots-helper"), "serve", *self.layout_args,
                                   "--socket", str(self.helper_run / "helper.sock"),
                                   "--allow-user", DAEMON_USER], stderr=helper_log)
        self.procs.append(helper)
        self.wait_socket(self.helper_run / "helper.sock", helper)
        daemon_log = open(self.dir / "gcrootsd.log", "wb")
        daemon = subprocess.Popen(["runuser", "-u", DAEMON_USER, "--", str(BIN / "gcrootsd"),
                                   *self.layout_args,
                                   "--helper-socket", str(self.helper_run / "helper.sock"),
                                   "--socket", str(self.run / "gcrootsd.sock")], stderr=daemon_log)
        self.procs.append(daemon)
        self.wait_socket(self.run / "gcrootsd.sock", daemon)
        self.note("The helper reads roots (and only reads); it answers only uid 0 and 'gcroots'. "
                  "gcrootsd holds no capability at all.")

    def report(self, paths: dict[str, str]) -> None:
        self.say("gcroots-query roots")
        self.show(self.query("roots"))
        self.say("gcroots-query dead")
        dead = self.query("dead")
        self.show(dead)
        self.say(f"gcroots-query why --all {paths['openssl'].split('/')[-1]}")
        self.show(self.query("why", "--all", paths["openssl"]))
        self.say(f"gcroots-query why {paths['oldCurl'].split('/')[-1]}")
        self.show(self.query("why", paths["oldCurl"]))
        self.note("A running process keeps the old curl alive: gcroots found it in /proc, which "
                  "only a privileged reader can see for other users' processes.")
        self.say("gcroots-query cost   (what each root would free on its own)")
        self.show(self.query("cost", "--top", "6"), limit=20)
        self.say("The same question asked by alice (an unprivileged user)")
        self.show(self.query("roots", user=ALICE))
        self.note("Runtime and temporary roots are censored for unprivileged users, as Nix does.")
        self.say("What the daemon's user would conclude on its own (no helper)")
        blind = subprocess.run(["runuser", "-u", DAEMON_USER, "--", str(BIN / "gcroots-query"),
                                "--standalone", *self.layout_args, "--allow-unprivileged-scan",
                                "dead"], capture_output=True).stdout
        wrong = sorted(set(blind.split()) - set(dead.split()))
        self.show(b"\n".join(wrong) or b"(nothing)")
        self.note(f"{len(wrong)} live paths, alice's webapp among them, would be called garbage: "
                  "it cannot read her home or other users' /proc entries.  That is what the "
                  "privileged helper is for.")
        self.say("Cross-check with Nix 2.8: nix-store --gc --print-dead")
        theirs = self.nix("nix-store", "--gc", "--print-dead")
        same = sorted(theirs.split()) == sorted(dead.decode().split())
        self.note(f"nix-store lists {len(theirs.split())} dead paths; gcroots lists "
                  f"{len(dead.split())}: {'identical' if same else 'DIFFERENT'}.")
        if not same:
            raise SystemExit("demo: gcroots and Nix disagree; please report this")
        # Nix ran as root just now; in a rootless set-up it runs as the store
        # owner, so hand back what it created in the state dir.
        subprocess.run(["chown", "-R", f"{DAEMON_USER}:", str(self.state)], check=True)
        self.say("gcroots-query gc --dry-run --print-deleted")
        out = subprocess.run([str(BIN / "gcroots-query"), "--socket", str(self.run / "gcrootsd.sock"),
                              "gc", "--dry-run", "--print-deleted"], capture_output=True)
        self.show(out.stdout, limit=6)
        self.show(out.stderr)
        self.say("gcroots-query gc --yes")
        out = subprocess.run([str(BIN / "gcroots-query"), "--socket", str(self.run / "gcrootsd.sock"),
                              "gc", "--yes"], capture_output=True)
        if out.returncode != 0:
            raise SystemExit(f"demo: gc failed: {out.stderr.decode()}")
        self.show(out.stdout)  # the summary: Nix's sentence (Nix's count), disk and NAR bytes
        self.note("Collected by gcrootsd as user 'gcroots', under Nix's gc.lock, serving gc-socket "
                  "for any Nix process that needs a path meanwhile.")
        verify = subprocess.run(["nix-store", "--verify", "--check-contents"], env=self.nix_env,
                                capture_output=True, text=True)
        problems = [line for line in verify.stderr.splitlines()
                    if not line.startswith(("checking", "reading the Nix store"))]
        self.note("nix-store --verify --check-contents: "
                  + ("clean" if verify.returncode == 0 and not problems else "; ".join(problems)))
        self.note(f"gcroots-query dead now lists {len(self.query('dead').split())} paths; "
                  f"the webapp is still here: {Path(paths['app']).exists()}.")
        self.say("gcroots-query stats")
        self.show(self.query("stats"), limit=30)

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if self.keep:
            print(f"\nKept everything in {self.dir} (users: {', '.join(self.created_users) or 'none new'}).")
            return
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir)], check=False)
        for user in self.created_users:
            subprocess.run(["userdel", "--remove", user], capture_output=True)
        print(f"\n{DIM}Cleaned up {self.dir} and the demo users.{RESET}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keep", action="store_true", help="keep the demo store, logs and users")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (the helper must run as root)")
    demo = Demo(args.keep)
    try:
        paths = demo.setup()
        demo.start()
        demo.report(paths)
    finally:
        demo.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
