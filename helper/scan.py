"""The root scan, exactly as Nix 2.8 finds roots (src/libstore/gc.cc:
findRoots, findRuntimeRoots), read-only.

`Scanner(layout).scan()` is a generator of records (Root, StaleLink, ScanWarning) that
yields each root as it is found.  A failure that could hide roots raises
ScanError; the caller turns that into an error trailer (fail closed).

What we never do, whatever the tree holds: write, unlink, open a link's
target, open a FIFO/socket/device, follow the *last* component of a link
(lstat + readlink only, so fs.protected_symlinks never bites), or enter a
symlinked directory.  Directories are walked with dir fds opened O_NOFOLLOW |
O_DIRECTORY relative to their parent.  Validity is not checked here: that
needs the Nix DB, which the daemon has.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Callable, Iterator

from gcroots import nofollow
from gcroots.layout import StoreLayout
from gcroots.protocol.rootstream import Record, Root, RootKind, ScanWarning, StaleLink, link_identity
from gcroots.storepath import abs_path, dir_of, is_in_dir, is_store_basename, to_store_path

# Nix skips these while reading potential roots; anything else fails the
# scan.  Nix skips EACCES too; we do not (fail closed: what a link we cannot
# read names is unknown), except under an --accept-unreadable prefix.
SKIPPABLE = frozenset({errno.ENOENT, errno.ENOTDIR})
UNREADABLE = ("; the helper lacks CAP_DAC_READ_SEARCH, or it is on NFS with root_squash or a "
              "FUSE mount (--accept-unreadable PREFIX accepts the risk)")
# /proc entries vanish under us; these mean "this process is gone or private".
PROC_SKIPPABLE = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES})
# Linux's, NUL included.  Nix walks with full paths and fails (ENAMETOOLONG)
# past it; so do we, and nowhere sooner: any user can nest dirs in per-user/.
PATH_MAX = 4096
# Of one /proc item (fd targets, maps, environ, cmdline) we keep only what can
# name a store path; more than this of that fails the scan (EFBIG), never
# truncates it.  Bounds the memory of a scan, and the reader's answers.
MAX_KEPT = 32 << 20
CHUNK = 1 << 20
KERNEL_ROOT_FILES = (b"/proc/sys/kernel/modprobe", b"/proc/sys/kernel/fbsplash",
                     b"/proc/sys/kernel/poweroff_cmd")

# A /proc/<pid>/maps line: five fields, then a path with no whitespace and
# nothing after it but whitespace.  "(deleted)" mappings do not match, as in
# Nix.
MAPS_LINE = re.compile(rb"^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)\s*$")

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def environ_regex(store_dir: bytes) -> re.Pattern[bytes]:
    """The pattern Nix 2.8 runs over /proc/<pid>/environ (and we over
    cmdline): the store dir, then a slash, then [0-9a-z]+ and the name chars."""
    return re.compile(re.escape(store_dir) + rb"/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")


class ScanError(Exception):
    """The scan cannot vouch for a complete root set."""


def _shown(path: bytes, limit: int = 300) -> str:
    """A path for a message: quoted, escaped, at most `limit` characters
    (head...tail).  It may be any user's, of any length and bytes, and the
    message must keep its end (the blame) within the trailer's 4096."""
    text = repr(os.fsdecode(path))
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def _bounded(path: bytes) -> None:
    if len(path) >= PATH_MAX:  # Nix fails here too (ENAMETOOLONG)
        raise _fatal(path, OSError(errno.ENAMETOOLONG, "longer than PATH_MAX "
                     f"({PATH_MAX} bytes with its NUL)"), "path")


def _fatal(path: bytes, e: OSError, what: str) -> ScanError:
    return ScanError(f"{what} {_shown(path)}: {e.strerror} (errno {e.errno})"
                     f"{UNREADABLE if e.errno == errno.EACCES else ''}; "
                     "refusing to report an incomplete root set")


def _blame(e: ScanError, entry: bytes, stat_entry: Callable[[], os.stat_result],
           what: str = "root entry", remedy: str = "fix or remove it") -> ScanError:
    """Name the entry (or process) that fails the scan and its owner's uid
    (gcrootsd adds the name): one user's broken link fails everyone's scans."""
    try:
        owner = f"uid {stat_entry().st_uid}"
    except OSError:
        owner = "an unknown user"
    # gcrootsd reads the owner from this ending (engine.scan_error): keep it last.
    return ScanError(f"{e}; {what} {_shown(entry)} belongs to {owner}, who (or "
                     f"root) must {remedy}")


def read_filtered(path: bytes, sep: bytes, needle: bytes, from_needle: bool) -> bytes:
    """Of a /proc file, read CHUNK by CHUNK, the `sep`-separated entries
    that contain `needle` (the store dir), joined by `sep`; with
    `from_needle` each from its first `needle` on (a store path pattern
    starts there; environ entries have no length limit, maps lines do).
    More than MAX_KEPT of that: EFBIG."""
    fd = os.open(path, _FILE_FLAGS)
    try:
        kept, size, part = [], 0, b""
        while True:
            chunk = os.read(fd, CHUNK)
            entries = (part + chunk).split(sep)
            part = entries.pop() if chunk else b""
            for e in entries:
                if (at := e.find(needle)) >= 0:
                    kept.append(e[at:] if from_needle else e)
                    size += len(kept[-1]) + 1
            if from_needle:  # of an unfinished entry, what a store path may start in
                at = part.find(needle)
                part = part[at:] if at >= 0 else part[-len(needle):]
            if size + len(part) > MAX_KEPT:
                raise OSError(errno.EFBIG, f"more than {MAX_KEPT} bytes naming the store")
            if not chunk:
                return sep.join(kept)
    finally:
        os.close(fd)


def _attempt(fn: Callable[..., bytes], *args: object) -> bytes | OSError:
    try:
        return fn(*args)
    except OSError as e:
        return e


# What is read of one process: (b"fd/3", its target) or the error reading it.
Items = list[tuple[bytes, bytes | OSError]]
# read_process, or the sandbox's /proc reader: (b"/proc/PID", cmdline?) -> Items
ProcReader = Callable[[bytes, bool], Items]


def _fd_targets(pid_dir: bytes, prefix: bytes) -> Items:
    """(b"fd/N", target) of every fd into the store (a process may hold a
    million fds; a target is stored once), or the error that ends the
    listing; skippable errors of single fds dropped."""
    out: Items = []
    seen: dict[bytes, bytes] = {}
    size = 0
    try:
        with os.scandir(pid_dir + b"/fd") as it:
            for e in it:
                target = _attempt(os.readlink, e.path)
                if isinstance(target, OSError):
                    if target.errno not in PROC_SKIPPABLE:  # fails the scan: stop here
                        return out + [(b"fd/" + e.name, target)]
                elif target.startswith(prefix):
                    size += 0 if target in seen else len(target)
                    out.append((b"fd/" + e.name, seen.setdefault(target, target)))
                    if (size := size + len(e.name) + 8) > MAX_KEPT:
                        raise OSError(errno.EFBIG, f"more than {MAX_KEPT} bytes of store fds")
    except OSError as e:
        return out + [(b"fd", e)]
    return out


def read_process(pid_dir: bytes, cmdline: bool, store_dir: bytes) -> Items:
    """What the runtime scan needs of one process, errors returned: the link
    targets of exe, cwd and each fd/N into the store, then of maps, environ
    (and cmdline) what names the store.  A failed fd listing ends that part
    with (b"fd", error): like Nix, we skip the rest of that process.  Runs
    here, or in the sandbox's /proc reader (Landlock denies these to a
    scanner).  Memory: at most MAX_KEPT per item, however big the process."""
    links = [(n, _attempt(os.readlink, pid_dir + b"/" + n)) for n in (b"exe", b"cwd")]
    # Only what the scan needs leaves the reader: no cwd outside the store, no maps addresses.
    out = [(n, t) for n, t in links if isinstance(t, OSError) or t.startswith(store_dir + b"/")]
    out += _fd_targets(pid_dir, store_dir + b"/")
    if out and out[-1][0] == b"fd":
        return out
    maps = _attempt(read_filtered, pid_dir + b"/maps", b"\n", store_dir, False)
    if not isinstance(maps, OSError):
        maps = b"\n".join(m.group(1) for m in map(MAPS_LINE.match, maps.split(b"\n")) if m)
    return out + [(b"maps", maps)] + [(n, _attempt(read_filtered, pid_dir + b"/" + n, b"\0", store_dir, True))
                                      for n in (b"environ", b"cmdline")[:1 + cmdline]]


class Scanner:
    """`proc_reader(pid_dir, cmdline)` replaces read_process() (the sandbox
    passes its reader); a `preflight()` that returns a reason fails the scan
    before it starts (sandbox.preflight); EACCES under an `accept_unreadable`
    prefix is skipped with a warning, as Nix skips it everywhere."""

    def __init__(self, layout: StoreLayout, *, runtime: bool = True, cmdline: bool = False,
                 proc_reader: ProcReader | None = None, preflight: Callable[[], str] | None = None,
                 accept_unreadable: tuple[bytes, ...] = ()) -> None:
        self.layout, self.runtime, self.cmdline = layout, runtime, cmdline
        self._read_process = proc_reader or (lambda d, c: read_process(d, c, layout.store_dir))
        self.preflight, self.accept_unreadable = preflight, accept_unreadable
        self._env_re = environ_regex(layout.store_dir)

    def _skip(self, path: bytes, e: OSError, what: str, also: tuple[int, ...] = (),
              at: bytes | None = None) -> ScanWarning:
        """Like Nix, skip SKIPPABLE errors (and `also`) with a warning, and
        EACCES at (`at` or `path`) under an accepted prefix; fail on any other."""
        at = at or path
        if e.errno in SKIPPABLE or e.errno in also or e.errno == errno.EACCES and any(
                p in (b"/", at) or is_in_dir(at, p) for p in self.accept_unreadable):
            return ScanWarning(path, e.errno or 0, f"cannot read potential root ({what}): {e.strerror}")
        raise _fatal(path, e, f"cannot {what}") from None

    def scan(self) -> Iterator[Record]:
        if self.preflight and (why := self.preflight()):
            raise ScanError(why)
        yield from self._find_roots(self.layout.gcroots_dir, RootKind.STATIC)
        yield from self._find_roots(self.layout.profiles_dir, RootKind.PROFILE)
        if self.runtime:
            yield from self._runtime_roots()

    # -- gcroots/ and profiles/ -------------------------------------------

    def _find_roots(self, top: bytes, kind: RootKind) -> Iterator[Record]:
        """Nix's findRoots(top, DT_UNKNOWN): the top itself may be a dir, a
        link or a file.  Every directory below is listed once, entered by
        its fd relative to its parent (nofollow.walk: one fd per level);
        depth is bounded only as in Nix, by PATH_MAX (~2000 levels at most)."""
        try:
            st = os.lstat(top)
            fd = os.open(top, nofollow.READ_FLAGS) if stat.S_ISDIR(st.st_mode) else -1
            target = os.readlink(top) if stat.S_ISLNK(st.st_mode) else b""
        except OSError as e:
            yield self._skip(top, e, "read", (errno.ELOOP,))
            return
        if fd >= 0:
            yield from nofollow.walk(fd, top, lambda fd, path, subdirs: self._list_dir(
                fd, path, subdirs, kind), self._cannot_enter)
        elif stat.S_ISLNK(st.st_mode):
            yield from self._link(top, target, kind)
        elif stat.S_ISREG(st.st_mode):
            yield from self._regular_file(top, kind)

    def _cannot_enter(self, path: bytes, e: OSError) -> Iterator[Record]:
        # ELOOP/ENOTDIR: swapped for a link or file since the listing;
        # like Nix, skip it with a warning.
        yield self._skip(path, e, "open directory", (errno.ELOOP,))

    def _list_dir(self, fd: int, path: bytes, subdirs: list[bytes],
                  kind: RootKind) -> Iterator[Record]:
        try:
            it = os.scandir(fd)
        except OSError as e:
            raise _blame(_fatal(path, e, "cannot list directory"), path,
                         lambda: os.fstat(fd)) from None
        with it:
            while True:
                try:
                    entry = next(it, None)
                except OSError as e:  # getdents failed part-way: we may have missed entries
                    yield self._skip(path, e, "list directory")
                    return
                if entry is None:
                    return
                # scandir(fd) yields str names; back to the exact bytes.
                name = os.fsencode(entry.name)
                child = path + b"/" + name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        _bounded(child)
                        subdirs.append(name)
                    elif entry.is_symlink():
                        _bounded(child)
                        yield from self._link(child, os.readlink(name, dir_fd=fd), kind)
                    elif entry.is_file(follow_symlinks=False):
                        yield from self._regular_file(child, kind)
                    # FIFOs, sockets, devices: never opened, never roots.
                except OSError as e:
                    yield self._skip(child, e, "read")
                except ScanError as e:
                    raise _blame(e, child,
                                 lambda: entry.stat(follow_symlinks=False)) from None

    def _regular_file(self, path: bytes, kind: RootKind) -> Iterator[Record]:
        # A regular file named like a store path roots that path (Nix does
        # not read it).
        name = path[path.rfind(b"/") + 1:]
        if is_store_basename(name):
            yield Root(kind, path, self.layout.store_dir + b"/" + name)

    def _link(self, link: bytes, target: bytes, kind: RootKind) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        if is_in_dir(target, store_dir):
            if (store_path := to_store_path(target, store_dir)) is not None:
                yield Root(kind, link, store_path)
            return
        # Not into the store: follow exactly one level (an indirect root).
        # lstat/readlink never follow the final component, so a link planted
        # in a sticky dir cannot redirect us (fs.protected_symlinks).
        resolved = abs_path(target, dir_of(link))
        auto, identity = is_in_dir(link, self.layout.auto_dir), None
        try:
            if auto:  # its identity, taken first: gcrootsd removes it only if unchanged
                identity = link_identity(os.lstat(link))
            st = os.lstat(resolved)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                if auto:
                    yield StaleLink(link, resolved, identity)
                return
            yield self._skip(link, e, f"lstat its target {_shown(resolved)}", at=resolved)
            return
        if not stat.S_ISLNK(st.st_mode):
            return
        try:
            target2 = os.readlink(resolved)
        except OSError as e:  # EINVAL: swapped for a non-link
            yield self._skip(resolved, e, "readlink indirect root", (errno.EINVAL,))
            return
        if (store_path := to_store_path(target2, store_dir)) is not None:
            yield Root(RootKind.PROFILE if kind == RootKind.PROFILE else RootKind.INDIRECT,
                       resolved, store_path)

    # -- /proc ---------------------------------------------------------------

    def _runtime_roots(self) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        try:
            pids = [e.name for e in os.scandir(b"/proc") if e.name.isdigit()]
        except OSError as e:
            raise _fatal(b"/proc", e, "cannot list") from None
        for pid in pids:
            yield from self._process_roots(b"/proc/" + pid)
        for path in KERNEL_ROOT_FILES:
            data = self._read_proc_file(path)
            # Nix uses the raw contents, trailing newline included, which
            # makes "/nix/store/x-y\n" unparsable; we drop the newline and
            # so keep such a path alive (strictly safer).
            if data and (sp := to_store_path(data.removesuffix(b"\n"), store_dir)) is not None:
                yield Root(RootKind.RUNTIME, path, sp)

    def _read_proc_file(self, path: bytes) -> bytes | None:
        try:  # a sysctl string: a path, at most a page
            with open(path, "rb", buffering=0, opener=lambda p, _: os.open(p, _FILE_FLAGS)) as f:
                return f.read(1 << 16)
        except OSError as e:
            if e.errno in PROC_SKIPPABLE:
                return None
            raise _fatal(path, e, "cannot read") from None

    def _process_roots(self, pid_dir: bytes) -> Iterator[Record]:
        try:
            items = self._read_process(pid_dir, self.cmdline)
        except OSError as e:  # the sandbox's /proc reader failed: never a smaller root set
            raise _fatal(pid_dir, e, "cannot read process") from None
        for name, value in items:  # the reader kept only what names the store
            path = pid_dir + b"/" + name
            if isinstance(value, OSError):
                if value.errno not in PROC_SKIPPABLE:  # e.g. a cwd or fd deeper than PATH_MAX
                    raise _blame(_fatal(path, value, "cannot read"), pid_dir,
                                 lambda: os.stat(pid_dir), "process",
                                 "end it (or move it out of that directory)") from None
                if name == b"fd" and value.errno == errno.EACCES:
                    yield ScanWarning(path, value.errno, "cannot read runtime roots: permission "
                                      "denied (does the helper have CAP_SYS_PTRACE?)")
                continue
            targets = ([m.group(0) for m in self._env_re.finditer(value)]
                       if name in (b"environ", b"cmdline") else value.split(b"\n")
                       if name == b"maps" else [value])   # maps: paths; exe, cwd, fd/N: link targets
            for target in targets:
                if target.startswith(b"/") and \
                        (sp := to_store_path(target, self.layout.store_dir)) is not None:
                    yield Root(RootKind.RUNTIME, path, sp)
