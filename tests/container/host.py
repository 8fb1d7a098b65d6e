"""Host side of the container test: a cached Debian rootfs (debootstrap), the
Python wheels gcroots needs (so that the container needs no network), and one
boot of a throw-away overlay of that rootfs under `systemd-nspawn -b` that
runs tests/container/scenario.py and powers off.

Also usable by hand (as root), e.g. to keep the container for a look:

    .venv/bin/python -m tests.container.host --keep
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A cache, not part of the checkout: shared by every checkout on the machine
# (one preparation at a time: cache_lock), kept between runs, safe to delete.
CACHE = Path(os.environ.get("GCROOTS_CONTAINER_CACHE", "/var/cache/gcroots-tests/container"))
SUITE = "bookworm"
MIRROR = os.environ.get("GCROOTS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# debootstrap resolves Depends, not virtual packages: libdbi-perl provides
# perl-dbdabi-94, which nix-bin's libdbd-sqlite3-perl needs.
# nix-setup-systemd is Debian's nix-daemon (nix-daemon.socket/.service, the
# nixbld build users, /etc/nix/nix.conf): what `apt install nix-bin` gives
# with its recommends.  debootstrap installs no recommends, so it is named.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "nix-bin",
            "nix-setup-systemd", "libdbi-perl", "procps", "iproute2", "util-linux", "passwd")
# Units a test container has no use for (and a console getty would only
# clutter the console log).
MASKED = ("console-getty.service", "container-getty@.service", "getty@.service",
          "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
          "fstrim.timer", "e2scrub_all.timer", "systemd-networkd-wait-online.service")
RECIPE = 2  # bump when the preparation below changes
WHEELS_IN_CONTAINER = "/var/cache/gcroots-wheels"
SRC_IN_CONTAINER = "/usr/local/src/gcroots"
SCENARIO_UNIT = "gcroots-scenario.service"


def log(msg: str) -> None:
    print(f"[container] {msg}", file=sys.stderr, flush=True)


@contextmanager
def cache_lock():
    """One preparation at a time (other runs wait, then find it done)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def rm_rf(path: Path) -> None:
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the rootfs -----------------------------------------------------------------

def rootfs_key() -> str:
    return hashlib.sha256(json.dumps([RECIPE, SUITE, PACKAGES, MASKED]).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _build_dir() -> tuple[Path, bool]:
    """Where debootstrap works: a tmpfs when it has room (dpkg's fsyncs make
    it take twice as long on disk), else the cache itself."""
    shm = Path("/dev/shm")
    try:
        for old in shm.glob("gcroots-rootfs-*"):   # left by a killed preparation
            pid = old.name.split("-")[2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                rm_rf(old)
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= 3 * 2**30:
            return Path(tempfile.mkdtemp(prefix=f"gcroots-rootfs-{os.getpid()}-", dir=shm)), True
    except OSError:
        pass
    build = CACHE / "rootfs.build"
    build.mkdir()
    return build, False


def _debootstrap(target: Path) -> None:
    # dpkg inside debootstrap fsyncs every file; unsafe-io is fine for a cache
    # that is rebuilt from scratch whenever it is not known to be complete.
    (target / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (target / "etc/dpkg/dpkg.cfg.d/gcroots-unsafe-io").write_text("force-unsafe-io\n")
    cmd = ["debootstrap", "--variant=minbase", "--components=main",
           f"--include={','.join(PACKAGES)}", SUITE, str(target), MIRROR]
    logfile = CACHE / "debootstrap.log"
    with open(logfile, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        detail = logfile.read_text(errors="replace")[-3000:]
        inner = target / "debootstrap/debootstrap.log"
        if inner.exists():
            detail += "\n--- debootstrap/debootstrap.log ---\n" + inner.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"debootstrap failed ({proc.returncode}); see {logfile}:\n{detail}")


def _configure(root: Path) -> None:
    (root / "etc/hostname").write_text("gcroots-test\n")
    units = root / "etc/systemd/system"
    for unit in MASKED:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    # A persistent journal: the host reads it after the container is gone.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    (root / "etc/machine-id").write_text("")


def prepare_rootfs() -> Path:
    """The cached rootfs, built first if it is missing or incomplete."""
    rootfs, marker = CACHE / "rootfs", CACHE / "rootfs.ok"
    key = rootfs_key()
    with cache_lock():
        if marker.exists() and marker.read_text().strip() == key and \
                (rootfs / "usr/bin/nix-store").exists():
            return rootfs
        log(f"preparing the Debian {SUITE} rootfs in {rootfs} (debootstrap: a minute or two)")
        t0 = time.monotonic()
        marker.unlink(missing_ok=True)
        for stale in (rootfs, CACHE / "rootfs.tmp", CACHE / "rootfs.build"):
            rm_rf(stale)
        build, on_tmpfs = _build_dir()
        try:
            for attempt in (1, 2):
                try:
                    _debootstrap(build)
                    break
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    if attempt == 2:
                        raise
                    log(f"debootstrap failed, once more from scratch: {str(e)[:300]}")
                    rm_rf(build)
                    build.mkdir()
            _configure(build)
            if on_tmpfs:
                subprocess.run(["cp", "-a", str(build), str(CACHE / "rootfs.tmp")], check=True)
                os.rename(CACHE / "rootfs.tmp", rootfs)
            else:
                os.rename(build, rootfs)
        finally:
            if on_tmpfs:
                rm_rf(build)
        _write_atomic(marker, key + "\n")
        log(f"rootfs ready in {time.monotonic() - t0:.0f}s")
        return rootfs


# -- wheels ---------------------------------------------------------------------------

def requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"],
            *extras["metrics"], *extras["docs"]]   # the extras scripts/install asks for


def prepare_wheels(python: str = sys.executable) -> Path:
    """Wheels for everything scripts/install pulls (and the build backend),
    downloaded on the host, where the network is: the container has none."""
    reqs = requirements()
    key = hashlib.sha256(json.dumps([reqs, sys.version_info[:2]]).encode()).hexdigest()[:16]
    wheels = CACHE / f"wheels-{key}"
    with cache_lock():
        if (wheels / ".complete").exists():
            return wheels
        rm_rf(wheels)
        tmp = CACHE / f"wheels-{key}.tmp"
        rm_rf(tmp)
        log(f"downloading wheels for {', '.join(reqs)}")
        # `pip wheel`, not `pip download --only-binary`: some (argparse-manpage)
        # publish only an sdist, which the offline container could not build.
        out = subprocess.run([python, "-m", "pip", "wheel", "--disable-pip-version-check",
                              "--wheel-dir", str(tmp), *reqs],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"pip wheel failed:\n{out.stderr[-3000:]}")
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        os.rename(tmp, wheels)
        for old in CACHE.glob("wheels-*"):
            if old != wheels:
                rm_rf(old)
        return wheels


# -- one boot -------------------------------------------------------------------------

def source_files() -> list[str]:
    """The checkout as it is (tracked and new files, not ignored ones), its
    links included: gcroots/protocol -> ../protocol and its siblings are how
    the package finds its sub-packages (pyproject's package-dir)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return [f for f in out.decode().split("\0") if f and ((REPO / f).is_file() or (REPO / f).is_symlink())]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                if (p.is_file() or p.is_symlink()) and not (set(p.relative_to(REPO).parts) & skip)]


UNIT_TEXT = f"""\
[Unit]
Description=gcroots container scenario (tests/container/scenario.py)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {SRC_IN_CONTAINER}/tests/container/scenario.py /results
ExecStopPost=/bin/sh -c 'journalctl -b --no-pager -o short-precise > /results/journal.txt 2>&1; systemctl poweroff --no-block'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec={{timeout}}

[Install]
WantedBy=multi-user.target
"""


@dataclass
class Boot:
    """One container run; `results` holds report.json, journal.txt, console.log."""
    rootfs: Path
    wheels: Path
    timeout: float = 1200.0
    keep: bool = False
    workdir: Path = field(init=False)
    results: Path = field(init=False)
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0

    def __post_init__(self) -> None:
        runs = CACHE / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=runs))
        self.results = self.workdir / "results"
        self.merged = self.workdir / "merged"
        self.name = f"gcroots-test-{os.getpid()}"

    def run(self) -> None:
        for d in ("upper", "work", "merged", "results"):
            (self.workdir / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.workdir / 'upper'},"
                        f"workdir={self.workdir / 'work'}", str(self.merged)], check=True)
        try:
            self._populate()
            self._boot()
        finally:
            self._collect_journal()
            subprocess.run(["umount", str(self.merged)], check=False)
            if subprocess.run(["mountpoint", "-q", str(self.merged)]).returncode == 0:
                subprocess.run(["umount", "-l", str(self.merged)], check=False)
            # nspawn cannot remove this on a /run that is not a tmpfs
            shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)

    def _populate(self) -> None:
        src = self.merged / SRC_IN_CONTAINER.lstrip("/")
        for rel in source_files():
            dst = src / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst, follow_symlinks=False)
        (self.merged / WHEELS_IN_CONTAINER.lstrip("/")).mkdir(parents=True, exist_ok=True)
        units = self.merged / "etc/systemd/system"
        (units / SCENARIO_UNIT).write_text(UNIT_TEXT.format(timeout=int(self.timeout - 60)))
        wants = units / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / SCENARIO_UNIT).symlink_to(f"/etc/systemd/system/{SCENARIO_UNIT}")

    def _boot(self) -> None:
        Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.merged), "-b", "-M", self.name,
               "--register=no", "--keep-unit", "--private-network", "--console=read-only",
               # nspawn's own seccomp allow-list lacks Landlock (systemd 252):
               # without this the helper's Landlock layer gets EPERM.
               "--system-call-filter=landlock_create_ruleset landlock_add_rule "
               "landlock_restrict_self",
               f"--bind={self.results}:/results",
               f"--bind-ro={self.wheels}:{WHEELS_IN_CONTAINER}"]
        t0 = time.monotonic()
        with open(self.results / "console.log", "wb") as console:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT)
            try:
                self.returncode = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.timed_out = True
                proc.send_signal(signal.SIGTERM)  # nspawn: an orderly poweroff of the container
                try:
                    self.returncode = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    self.returncode = proc.wait()
        self.seconds = time.monotonic() - t0

    def _collect_journal(self) -> None:
        """The container's persistent journal, also when the scenario never
        got to dump it."""
        jdir = self.merged / "var/log/journal"
        if (self.results / "journal.txt").exists() or not jdir.exists():
            return
        out = subprocess.run(["journalctl", "-D", str(jdir), "--no-pager", "-o", "short-precise"],
                             capture_output=True)
        (self.results / "journal.txt").write_bytes(out.stdout + out.stderr)

    def report(self) -> dict | None:
        try:
            return json.loads((self.results / "report.json").read_text())
        except (OSError, ValueError):
            return None

    def text(self, name: str, tail: int = 200) -> str:
        try:
            lines = (self.results / name).read_text(errors="replace").splitlines()
        except OSError:
            return f"({name} missing)"
        return "\n".join(lines[-tail:])

    def cleanup(self) -> None:
        """The container's file system goes; its results stay (until the next
        run) and are copied to CACHE/last-results for people."""
        last = CACHE / "last-results"
        rm_rf(last)
        shutil.copytree(self.results, last, symlinks=True)
        if not self.keep:
            for d in ("upper", "work", "merged"):
                rm_rf(self.workdir / d)


def clean_old_runs() -> None:
    """Run directories left by a killed test go at the next run (not those
    of a run still going on)."""
    runs = CACHE / "runs"
    if not runs.exists():
        return
    for d in runs.iterdir():
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue  # its test is still running
        merged = d / "merged"
        if subprocess.run(["mountpoint", "-q", str(merged)]).returncode == 0:
            subprocess.run(["umount", "-l", str(merged)], check=False)
        rm_rf(d)


def main() -> int:
    import argparse
    p = argparse.ArgumentParser(description="boot the gcroots test container once")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args()
    clean_old_runs()
    boot = Boot(prepare_rootfs(), prepare_wheels(), timeout=args.timeout, keep=args.keep)
    boot.run()
    print(json.dumps(boot.report(), indent=1))
    print(f"exit {boot.returncode} after {boot.seconds:.0f}s; results in {boot.results}")
    boot.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
