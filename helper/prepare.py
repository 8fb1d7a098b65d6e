"""The sandbox layers that survive execve, applied before the serving
helper starts: the network namespace, the capability drop (bounding set;
inheritable and ambient cleared -- after exec, root's permitted and
effective sets are the bounding set), no_new_privs; and the checks of the
view it was started in (hidden directories, a user namespace), which need
/proc/1 before Landlock closes it.  (The seccomp filters, compiled before
the exec too, are helper/seccomp_filters.py's.)

`gcroots-helper serve` runs prepare_and_exec() (helper/launch.py) first,
however it was started -- with --socket or with sockets from systemd -- so
every serving process is prepared the same way, and the long-lived process
that serves never loads this module.  It checks each of these layers again
itself (sandbox.apply_for_serving(prepared=...)): nothing in its
environment can claim one.  In-process (`scan --sandbox`, sandbox-check,
--standalone's checks) apply_for_serving() applies them from here.  Each
layer is described in helper/sandbox.py's docstring.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from typing import Callable, Iterable, Sequence

from gcroots.log import Logger
from gcroots.storepath import is_in_dir

from .sandbox import (CAP_DAC_READ_SEARCH, CAP_SETPCAP, CAP_SYS_PTRACE, KEEP_CAPS,
                      PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_CAP_AMBIENT_RAISE, PR_CAPBSET_DROP,
                      PR_GET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, Sandbox, _apply,
                      _errname, _Missing, _ns_inode, _read, cap_sets, capset, lacking_caps,
                      network_links, prctl, refuse_unless_complete, syscall)


# -- layer: network namespace (the serving process verifies it: sandbox._verified) --

CLONE_NEWNET = 0x40000000


def _layer_netns() -> dict[str, object]:
    try:
        syscall("unshare", CLONE_NEWNET)
        how = "unshared"
    except OSError as e:
        # Without CAP_SYS_ADMIN, or RestrictNamespaces=: the namespace must
        # already be empty (PrivateNetwork=yes).
        how = f"inherited (unshare: {_errname(e)})"
    links = network_links()
    if links == [("lo", False)]:
        return {"how": how, "links": "lo(down)"}
    # systemd's PrivateNetwork=: a namespace of the unit's own, lo up.  Is
    # ours another than the host's, i.e. init's?  Where /proc/1 is out of
    # reach, our parent's stands for the host's; unknown counts as no.
    host = _ns_inode(1) or _ns_inode(os.getppid())
    if links == [("lo", True)] and host and _ns_inode("self") not in (None, host):
        return {"how": how, "links": "lo(up), not the host's namespace"}
    shown = ", ".join(f"{n}({'up' if up else 'down'})" for n, up in links) or "none"
    raise _Missing(f"network namespace {how} has links other than lo (down, or up in a namespace "
                   f"not the host's): {shown}; run as root or with PrivateNetwork=yes")

# -- the view of the file system ------------------------------------------------------

# Where users' links (`nix-build -o /tmp/x`, `result` in a home) live: any
# view of these other than init's hides them (PrivateTmp=, ProtectHome=yes).
WATCHED_DIRS = (b"/home", b"/root", b"/run/user", b"/tmp", b"/var/tmp")


# A mountinfo line: IDs, device, root within it, mount point, options ... " - " fs type.
_MOUNT = re.compile(rb"^\S+ \S+ (\S+) (\S+) (\S+) .*? - (\S+)", re.M)


def _mounts(mountinfo: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(mount point, device, root within the device, fs type), in mount order;
    mountinfo escapes space, tab, newline and backslash as \\ooo."""
    def unescape(field: bytes) -> bytes:
        return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)
    return [(unescape(point), dev, unescape(root), fs) for dev, root, point, fs in _MOUNT.findall(mountinfo)]


def _backing(mounts: list[tuple[bytes, bytes, bytes, bytes]], path: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(device, directory on that device, fs type) that `path` shows: the
    longest mount point above it, the topmost (last) mount there."""
    for point, dev, root, fstype in reversed(sorted(mounts, key=lambda m: len(m[0]))):   # (stable)
        if path == point or path.startswith(point.rstrip(b"/") + b"/"):
            return dev, (root.rstrip(b"/") + path[len(point.rstrip(b"/")):]) or b"/", fstype
    return None


def hidden_dirs(proc: bytes = b"/proc", scanned: Iterable[bytes] = ()) -> list[bytes]:
    """Directories that this process sees differently from init (PID 1):
    the WATCHED_DIRS in any way (a private /tmp is as bad as an empty one),
    and wherever we have a fresh tmpfs/ramfs that init does not -- except
    systemd's PrivateDevices= /dev and its credentials, which hold no user's
    links.  Links in them would all look stale and their paths garbage, so a
    helper that cannot see them must not scan.  A read-only view of the same
    directory is fine.  When it cannot tell (PID 1's mounts unreadable),
    it assumes the worst: all WATCHED_DIRS.  Checked once at start: under Landlock /proc/1 is closed to us.
    `scanned`: the directories the scan lists (the state dir's gcroots/ and
    profiles/), watched the same way: an empty directory bound over them
    (or over /nix; systemd BindReadOnlyPaths=, InaccessiblePaths=) is no
    fresh tmpfs, and every root in them would vanish from complete scans.
    Lives here, not in scan.py, because like the netns check it judges the
    confinement we were started in."""
    watched = {*WATCHED_DIRS, *map(os.path.realpath, scanned)}
    try:
        ours, init = _mounts(_read(proc + b"/self/mountinfo")), _mounts(_read(proc + b"/1/mountinfo"))
    except OSError:
        return sorted(watched)  # fail closed: scans refuse, saying which dirs
    fresh = {p for p, _, root, fs in ours if root == b"/" and fs in (b"tmpfs", b"ramfs")
             and p != b"/dev" and not (p + b"/").startswith(b"/run/credentials/")}
    # ... and the mounts below them, init's (a home on its own file system,
    # a user's /run/user/UID: a private view may lack them) and ours (another
    # directory bound over a home: a view init lacks).
    below = {p for p, *_ in init + ours if any(is_in_dir(p, w) for w in watched)}
    return sorted(p for p in {*watched, *fresh, *below}
                  if _backing(ours, p) != _backing(init, p))

# -- layer: capabilities --------------------------------------------------------------

def drop_bounding_set(keep: int) -> None:
    """Drop every capability but `keep` from this thread's bounding set,
    if we hold CAP_SETPCAP (PR_CAPBSET_DROP needs it: made effective for
    it), so before capset takes it away."""
    have = cap_sets()
    if (extra := have["Bnd"] & ~keep) and have["Prm"] >> CAP_SETPCAP & 1:
        capset(have["Eff"] | 1 << CAP_SETPCAP, have["Prm"], 0)
        for cap in (c for c in range(64) if extra >> c & 1):
            prctl(PR_CAPBSET_DROP, cap)


def _layer_caps() -> dict[str, object]:
    keep = cap_sets()["Prm"] & KEEP_CAPS
    drop_bounding_set(KEEP_CAPS)
    # Whatever happened above, drop everything else we hold (fail closed).
    # capset only if needed: a unit whose SystemCallFilter= forbids it
    # (~@privileged) still works when systemd already set the caps exactly.
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    want = {"Eff": keep, "Prm": keep, "Inh": 0, "Amb": 0}
    if {k: v for k, v in cap_sets().items() if k in want} != want:
        capset(keep, keep, 0)
    # Core dumps would hold other users' environments; and a non-dumpable
    # process cannot be ptraced by same-uid processes without CAP_SYS_PTRACE.
    prctl(PR_SET_DUMPABLE, 0)
    have = cap_sets()
    if have["Bnd"] & ~KEEP_CAPS:
        raise _Missing(f"bounding set {have['Bnd']:#x} holds more than {KEEP_CAPS:#x} and without "
                       "CAP_SETPCAP we cannot drop it; start with a reduced bounding set "
                       "(systemd CapabilityBoundingSet=, setpriv --bounding-set)")
    if {k: have[k] for k in want} != want:
        raise _Missing("capabilities not as set: " + " ".join(f"{k}={have[k]:#x}" for k in want))
    if keep != KEEP_CAPS:   # we hold less, not more: but every scan would fail
        raise _Missing(lacking_caps())
    return {"effective": f"{have['Eff']:#x}", "bounding": f"{have['Bnd']:#x}"}


def preflight(hidden: Sequence[bytes], *, caps: bool = True,
              runtime: bool = True) -> Callable[[], str]:
    """Scanner(preflight=...): why every scan must fail before it starts,
    or "": view_problems(), and the capabilities checked at each scan."""
    view = view_problems(hidden, runtime=caps and runtime)
    return lambda: "; ".join(w for w in ([lacking_caps()] if caps else []) + [view] if w)


def view_problems(hidden: Sequence[bytes], *, runtime: bool = True) -> str:
    """Why every scan must fail in the view this process was started in,
    or "".  `hidden` from hidden_dirs() (taken before the sandbox closes
    /proc/1).  In a user namespace (systemd PrivateUsers=yes, unshare
    --user; not the initial one, whose inode number is the kernel's
    PROC_USER_INIT_INO; unknown counts as one) the capabilities reach only
    that namespace's files and processes, so the runtime scan cannot work:
    other users' processes are EACCES, which (as Nix does) skips them, or
    invisible (hidepid); a file is EACCES, which fails the scan, so a scan
    without runtime roots is still sound."""
    why = []
    if runtime and _ns_inode("self", "user") != 0xEFFFFFFD:   # (None: unknown, so yes)
        why.append("the helper runs in a user namespace (e.g. systemd PrivateUsers=yes, "
                   "unshare --user): its CAP_SYS_PTRACE does not reach other users' "
                   "processes, whose runtime roots it would miss; run it in the initial "
                   "user namespace (or without runtime roots: --no-runtime)")
    if hidden:
        why.append("directories are hidden from the helper ("
                   f"{', '.join(map(os.fsdecode, hidden))}: a mount over them that init "
                   "does not have, e.g. systemd PrivateTmp=yes, ProtectHome=yes or a tmpfs); "
                   "links in them would look stale and their paths garbage. Use "
                   "ProtectHome=read-only, no PrivateTmp=")
    return "; ".join(why)


def _layer_nnp() -> dict[str, object]:
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise _Missing("PR_GET_NO_NEW_PRIVS does not report 1")
    return {}

LAYERS: dict[str, Callable[[], dict[str, object]]] = {
    "netns": _layer_netns, "caps": _layer_caps, "no_new_privs": _layer_nnp}   # netns first: needs CAP_SYS_ADMIN


def raise_fd_limit() -> None:
    """A walk holds one fd per directory level, and may go ~2000 deep
    (PATH_MAX).  (Survives exec; seccomp'd, systemd's ~@resources sets
    LimitNOFILE= instead.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def before_exec(*, require: bool, skip: Iterable[str], runtime: bool, log: Logger,
                scanned: Iterable[bytes] = ()) -> str:
    """The launcher's part: the fd limit, the view's problems (returned:
    the serving process fails every scan with them), and the layers that
    survive execve; SandboxError if `require` and one is missing."""
    raise_fd_limit()
    if view := view_problems(hidden_dirs(scanned=scanned), runtime=runtime):   # before the sandbox closes /proc/1
        log.error("scans_will_fail", reason=view)
    box = Sandbox({}, {})
    for name, apply in LAYERS.items():
        _apply(box, name, apply, skip, log)
    if os.geteuid() != 0 and "caps" not in skip:
        # Without uid 0, capabilities survive execve only as ambient ones:
        # raised last (the serving process clears them, and inheritable).
        try:
            capset(KEEP_CAPS, KEEP_CAPS, KEEP_CAPS)
            for cap in (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE):
                prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
        except OSError as e:   # (without them every scan fails: sandbox.lacking_caps)
            box.missing["caps"] = f"cannot keep its capabilities over the exec: {e}"
            log.warning("sandbox_layer", layer="caps", active=False, reason=box.missing["caps"])
    if require:
        refuse_unless_complete(box, log)
    return view
