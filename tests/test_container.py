"""A real multi-user host under real systemd: a Debian 12 rootfs (debootstrap,
cached in /var/cache/gcroots-tests/container) booted with `systemd-nspawn -b` on a throw-away
overlay, with Debian's own nix-daemon (nix-setup-systemd).  Inside,
gcroots-scenario.service (tests/container/scenario.py) has alice and bob
build through that nix-daemon into `result` links in their 0700 homes, gives
bob a process holding a store path open, and checks both deployment models on
that store, one after the other: stock (root's nix-daemon; scripts/install
with its reruns and repairs, every check, a scheduled collection while alice
and bob build, --uninstall) and rootless (--take-store refused while
nix-daemon is root's; nix-daemon as `nix` by a drop-in; install --take-store;
a collection while they build through it; --uninstall refused, then giving
the store back).  Each check is one test here.

The first run prepares the rootfs (a minute or two, needs the Debian
mirror) and downloads the wheels (PyPI); the container itself has no network.
On a failure the container's journal is shown; the run's results are also
in /var/cache/gcroots-tests/container/last-results (report.json, journal.txt, console.log).
"""

from __future__ import annotations

import re
import shutil

import pytest

from .container import host

pytestmark = pytest.mark.container

STOCK = [
    "install",                   # auto: the stock model, Debian's python though /root's is on PATH
    "install_rerun_changes_nothing",     # units, drop-ins, record, venv untouched
    "install_repairs_foreign_venv",      # a venv of /root/bin/python3 is made again
    "install_repairs_failed_ensurepip",  # a venv without pip is made again
    "install_verifies_users",    # an unrunnable venv: exit 1 naming the user and command
    "roots_as_root",             # alice's and bob's result links (0700 homes), bob's /proc root
    "roots_as_bob_censored",     # bob sees {censored} instead of /proc/PID/... labels
    "services_active",           # both sockets and both services active, gcrootsd notified
    "timer_waiting",             # gcroots-gc.timer enabled, active/waiting, fires the gc service
    "helper_confined",           # the running helper: its user, NoNewPrivs, seccomp, exactly 2 caps
    "daemon_confined",           # gcrootsd: uid 0, no caps at all, confined; no owner changed
    "sandbox_check",             # gcroots-helper sandbox-check as the unit's user with its caps
    "dead_set",                  # dead == the garbage built == nix-store --gc --print-dead
    "bob_refused_by_helper",     # EACCES at connect; with the socket 0666, closed without a byte
    "bob_cannot_collect",        # gcroots-query gc as bob: refused (exit 3), nothing deleted
    "helper_killed_gc_refuses",  # SIGKILL mid-scan (every retry): exit 1, nothing deleted
    "gc_exact",                  # gcroots-query gc deletes exactly the garbage, keeps every root
    "verify_clean",              # nix-store --verify --check-contents afterwards
    "timer_gc_while_building",   # the timer's collection while alice and bob build: garbage goes
    "journal_structured",        # every line both services log is a JSON event in journald
    "metrics",                   # the textfile metrics readable by nobody, counting the runs
    "services_healthy_at_end",   # all active, gcrootsd never restarted, timer back on schedule
    "build_after_gc",            # alice builds again; nix-store --verify clean
    "no_permission_errors",      # none in nix-daemon's, gcrootsd's, the helper's, gc's journal
    "uninstall",                 # units, users, group, venv, links, defaults, state: all gone
]
ROOTLESS = [
    "take_store_refused",        # while nix-daemon is configured as root, and while one runs
    "install",                   # --take-store: gcrootsd as nix, the store nix's, homes untouched
    "builds_through_the_unprivileged_daemon",  # nix-daemon runs as nix and builds
    "dead_set",                  # dead == the garbage built through the unprivileged daemon
    "services_active",
    "daemon_confined",           # gcrootsd: user nix, no caps, confined
    "helper_confined",           # serves only nix (and root)
    "timer_gc_while_building",   # as in the stock model, through the unprivileged daemon
    "verify_clean",
    "build_after_gc",
    "no_permission_errors",
    "services_healthy_at_end",
    "uninstall_refused_while_nix_daemon_owns_the_store",
    "uninstall_gives_the_store_back",    # every recorded owner back; what nix made stays nix's
    "root_daemon_builds_after_uninstall",
]
CHECKS = [f"stock.{c}" for c in STOCK] + [f"rootless.{c}" for c in ROOTLESS]


@pytest.fixture(scope="module")
def container():
    missing = [t for t in ("debootstrap", "systemd-nspawn") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./scripts/bootstrap")
    host.clean_old_runs()
    boot = host.Boot(host.prepare_rootfs(), host.prepare_wheels(), timeout=1200)
    try:
        boot.run()
    finally:
        boot.cleanup()
    return boot


OURS = re.compile(r" (gcrootsd|gcroots-helper|gcroots-query|nix-daemon|python3|systemd-run|systemd)\[\d+\]: ")


def _journal(boot) -> str:
    """The container's journal, gcroots' part: its services, the scenario
    (python3) and systemd's messages about gcroots units."""
    lines = [line for line in boot.text("journal.txt", tail=100000).splitlines()
             if (m := OURS.search(line)) and (m.group(1) != "systemd" or "gcroots" in line)]
    return (f"\n--- container journal, gcroots' part (tail; everything in "
            f"{boot.results}/journal.txt) ---\n" + "\n".join(lines[-120:]))


def test_scenario_ran(container):
    report = container.report()
    assert not container.timed_out, "the container did not power off in time" + _journal(container)
    assert report is not None, ("no report from the container\n--- console ---\n"
                                + container.text("console.log", tail=120))
    assert report["setup_error"] is None, report["setup_error"] + _journal(container)
    assert set(report["checks"]) == set(CHECKS), sorted(set(report["checks"]) ^ set(CHECKS))


@pytest.mark.parametrize("check", CHECKS)
def test_check(container, check):
    report = container.report()
    if report is None or check not in report["checks"]:
        pytest.fail(f"{check} did not run (see test_scenario_ran)"
                    + (f": {report['setup_error']}" if report and report["setup_error"] else ""))
    result = report["checks"][check]
    assert result["ok"], result["detail"] + _journal(container)
