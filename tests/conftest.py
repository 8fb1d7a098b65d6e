from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess

import pytest

from . import support

GC_LOCK = "/nix/var/nix/gc.lock"  # made by the first GC-ish Nix command on the real store
_session: dict = {}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads --basetemp
def pytest_configure(config):
    # `kill` or `timeout` as ^C: pytest then still tears down and cleans up.
    signal.signal(signal.SIGTERM, _interrupt)
    if config.option.basetemp is None:  # tmp_path: ours, removed at the end (not pytest-of-root/)
        _session["basetemp"] = config.option.basetemp = support.scratch_dir()
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite must run as root (./scripts/test uses sudo)")
    if shutil.which("nix-store") is None:
        raise pytest.UsageError("nix-store is missing: run ./scripts/bootstrap")


def pytest_sessionstart(session):
    _session["gc_lock_existed"] = os.path.lexists(GC_LOCK)
    _remove_leftovers_of_killed_sessions()


def pytest_sessionfinish(session, exitstatus):
    """Also after failures and ^C: what this session put on the machine goes."""
    problems = []
    for path in support.real_store_added:  # one at a time: Nix stops at the first live one
        out = support.oracle("/", "nix-store", "--delete", path, check=False)
        if out.returncode != 0 and os.path.exists(path):
            problems.append(f"{path}: {out.stderr.decode(errors='replace').strip()[-300:]}")
    if not _session.get("gc_lock_existed", True):
        _remove_unheld(GC_LOCK)
    problems += support.remove_users_and_groups(support.created_users, support.created_groups)
    if "basetemp" in _session:
        subprocess.run(["rm", "-rf", "--one-file-system", str(_session["basetemp"])], check=False)
    if problems:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            (tr.write_line if tr else print)(f"gcroots tests: left behind: {p}")


def _remove_unheld(path: str) -> None:
    """Unlink a lock file nobody holds (Nix never removes gc.lock; we made it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass  # in use by someone else's Nix: theirs now
    finally:
        os.close(fd)


def _remove_leftovers_of_killed_sessions() -> None:
    """Users, groups (gcrt-<pid>-...) and scratch dirs (/tmp/gcroots-test-pid<pid>-...)
    whose session process is gone (a SIGKILLed run); running sessions' stay."""
    def dead(name: str, prefix: str) -> bool:
        pid, dash, _ = name[len(prefix):].partition("-")
        return (name.startswith(prefix) and pid.isdigit() and dash == "-"
                and not os.path.exists(f"/proc/{pid}"))
    support.remove_users_and_groups(
        [p.pw_name for p in pwd.getpwall() if dead(p.pw_name, support.SESSION_PREFIX)],
        [g.gr_name for g in grp.getgrall() if dead(g.gr_name, support.SESSION_PREFIX)])
    for name in os.listdir("/tmp"):
        if dead(name, support.SCRATCH_PREFIX):
            subprocess.run(["rm", "-rf", "--one-file-system", "/tmp/" + name], check=False)


@pytest.fixture(scope="session", autouse=True)
def users():
    """Real unprivileged users: two with 0700 homes, the daemon's user, one
    more in the admin group.  Names unique to this session (support.SESSION)."""
    made = {name: support.ensure_user(name) for name in
            (support.ALICE, support.BOB, support.DAEMON_USER, support.CAROL)}
    support.ensure_group(support.ADMIN_GROUP, [support.CAROL])
    return made


@pytest.fixture
def scratch():
    """A world-traversable temp dir (pytest's tmp_path is 0700 under /tmp and
    unprivileged test users must reach stores and sockets inside it)."""
    d = support.scratch_dir()
    yield d
    # rm, not shutil.rmtree: some tests build 10,000-level trees.
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)


@pytest.fixture
def pipelines():
    """Pipelines (helper + daemon) a test starts; stopped afterwards."""
    made = []
    yield made
    for p in made:
        if p.daemon is not None and p.daemon.poll() is not None:
            print(f"--- gcrootsd had exited with {p.daemon.returncode} before the test's end")
        p.stop()
        # Shown by pytest only when the test failed: what gcrootsd said last.
        for log in (getattr(p, "daemon_log_path", None), p.run.parent / "helper.log"):
            if log is not None and log.exists():
                tail = log.read_text(errors="replace").splitlines()[-40:]
                print(f"--- last lines of {log}:", *tail, sep="\n")
