"""The root scan, exactly as Nix 2.8 finds roots (src/libstore/gc.cc:
findRoots, findRuntimeRoots), read-only.

`scan_roots()` is a generator of records (Root, StaleLink, ScanWarning) that
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
import stat
from typing import Iterator

from gcroots.layout import StoreLayout
from gcroots.protocol.rootstream import Record, Root, RootKind, ScanWarning, StaleLink
from gcroots.storepath import (MAPS_LINE, abs_path, dir_of, environ_regex, is_in_dir,
                               is_store_basename, to_store_path)

# Nix skips these while reading potential roots; anything else fails the scan.
SKIPPABLE = frozenset({errno.EACCES, errno.ENOENT, errno.ENOTDIR})
# /proc entries vanish under us; these mean "this process is gone or private".
PROC_SKIPPABLE = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES})
MAX_DEPTH = 128           # a gcroots tree is a few levels deep; deeper is hostile
MAX_PROC_FILE = 64 << 20  # environ/maps larger than this are refused, not truncated
KERNEL_ROOT_FILES = (b"/proc/sys/kernel/modprobe", b"/proc/sys/kernel/fbsplash",
                     b"/proc/sys/kernel/poweroff_cmd")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class ScanError(Exception):
    """The scan cannot vouch for a complete root set."""


HOME_DIRS = (b"/home", b"/root", b"/run/user")


def _backing(mountinfo: bytes, path: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(device, directory on that device, fs type) that `path` shows."""
    best = None
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(b" - ")
        f = head.split()
        if len(f) < 5 or not tail:
            continue
        point = f[4]
        if path == point or path.startswith(point.rstrip(b"/") + b"/"):
            if best is None or len(point) > len(best[0]):
                rest = path[len(point.rstrip(b"/")):]
                best = (point, (f[2], (f[3].rstrip(b"/") + rest) or b"/", tail.split()[0]))
    return None if best is None else best[1]


def hidden_home_dirs(proc: bytes = b"/proc") -> list[bytes]:
    """Home directories that this process sees differently from init (PID
    1): hidden by an empty mount (systemd ProtectHome=yes or tmpfs).  Links
    in them would all look stale -- their paths garbage -- so a helper that
    cannot see them must not scan.  A read-only view of the same directory
    is fine.  Empty when it cannot tell (no access to PID 1's mounts).
    Checked once at start: under Landlock /proc/1 is closed to us."""
    try:
        with open(proc + b"/self/mountinfo", "rb") as f:
            ours = f.read()
        with open(proc + b"/1/mountinfo", "rb") as f:
            init = f.read()
    except OSError:
        return []
    return [h for h in HOME_DIRS if _backing(ours, h) != _backing(init, h)]


def _warn(path: bytes, e: OSError, what: str) -> ScanWarning:
    return ScanWarning(path, e.errno or 0, f"cannot read potential root ({what}): {e.strerror}")


def _fatal(path: bytes, e: OSError, what: str) -> ScanError:
    return ScanError(f"{what} {os.fsdecode(path)!r}: {e.strerror} (errno {e.errno}); "
                     "refusing to report an incomplete root set")


def read_limited(path: bytes) -> bytes:
    """A /proc file's contents; past MAX_PROC_FILE refused (EFBIG), not truncated."""
    fd = os.open(path, _FILE_FLAGS)
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_PROC_FILE:
                raise OSError(errno.EFBIG, f"larger than {MAX_PROC_FILE} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _attempt(fn, path: bytes) -> bytes | OSError:
    try:
        return fn(path)
    except OSError as e:
        return e


def read_process(pid_dir: bytes, cmdline: bool = False) -> list[tuple[bytes, bytes | OSError]]:
    """Everything the runtime scan reads of one process, raw, errors
    returned: the link targets of exe, cwd and each fd/N, then the contents
    of maps, environ (and cmdline).  A failed fd listing ends the list with
    (b"fd", error): like Nix, we skip the rest of that process.  Runs here,
    or in the sandbox's /proc reader (Landlock denies these to a scanner)."""
    out = [(n, _attempt(os.readlink, pid_dir + b"/" + n)) for n in (b"exe", b"cwd")]
    try:
        fds = [e.name for e in os.scandir(pid_dir + b"/fd") if not e.name.startswith(b".")]
    except OSError as e:
        return out + [(b"fd", e)]
    out += [(b"fd/" + fd, _attempt(os.readlink, pid_dir + b"/fd/" + fd)) for fd in fds]
    names = (b"maps", b"environ") + ((b"cmdline",) if cmdline else ())
    return out + [(n, _attempt(read_limited, pid_dir + b"/" + n)) for n in names]


class Scanner:
    """`proc_reader` replaces read_process() (the sandbox passes its reader)."""

    def __init__(self, layout: StoreLayout, *, runtime: bool = True, cmdline: bool = False,
                 proc: bytes = b"/proc", proc_reader=None,
                 hidden_homes: list[bytes] | tuple = ()) -> None:
        self.layout = layout
        self.runtime = runtime
        self.cmdline = cmdline
        self.proc = proc
        self._read_process = proc_reader or read_process
        self.hidden_homes = list(hidden_homes)
        self._env_re = environ_regex(layout.store_dir)

    def scan(self) -> Iterator[Record]:
        if self.hidden_homes:
            raise ScanError(f"home directories are hidden from the helper "
                            f"({', '.join(os.fsdecode(h) for h in self.hidden_homes)}: an empty "
                            "mount over them, e.g. systemd ProtectHome=yes); links in them would "
                            "look stale and their paths garbage. Use ProtectHome=read-only")
        yield from self._find_roots(self.layout.gcroots_dir, RootKind.STATIC)
        yield from self._find_roots(self.layout.profiles_dir, RootKind.PROFILE)
        if self.runtime:
            yield from self._runtime_roots()

    # -- gcroots/ and profiles/ -------------------------------------------

    def _find_roots(self, top: bytes, kind: RootKind) -> Iterator[Record]:
        """Nix's findRoots(top, DT_UNKNOWN): the top itself may be a dir, a
        link or a file.  Directories below are entered via dir fds."""
        try:
            st = os.lstat(top)
        except OSError as e:
            if e.errno in SKIPPABLE:
                yield _warn(top, e, "lstat")
                return
            raise _fatal(top, e, "cannot lstat") from None
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(top, _DIR_FLAGS)
            except OSError as e:
                if e.errno in SKIPPABLE or e.errno == errno.ELOOP:
                    yield _warn(top, e, "open directory")
                    return
                raise _fatal(top, e, "cannot open directory") from None
            yield from self._walk_dir(fd, top, kind)
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(top)
            except OSError as e:
                if e.errno in SKIPPABLE:
                    yield _warn(top, e, "readlink")
                    return
                raise _fatal(top, e, "cannot readlink") from None
            yield from self._link(top, target, kind)
        elif stat.S_ISREG(st.st_mode):
            yield from self._regular_file(top, kind)

    def _walk_dir(self, top_fd: int, top: bytes, kind: RootKind) -> Iterator[Record]:
        """Depth-first over directories, one (fd, iterator) per level."""
        stack: list[tuple[int, Iterator[os.DirEntry[bytes]], bytes]] = []

        def push(fd: int, path: bytes) -> None:
            if len(stack) >= MAX_DEPTH:
                os.close(fd)
                raise ScanError(
                    f"directory nesting deeper than {MAX_DEPTH} levels at "
                    f"{os.fsdecode(path)[:200]!r}...; refusing to report an incomplete root set")
            try:
                it = os.scandir(fd)
            except OSError as e:
                os.close(fd)
                raise _fatal(path, e, "cannot list directory") from None
            stack.append((fd, it, path))

        push(top_fd, top)
        try:
            while stack:
                fd, it, path = stack[-1]
                try:
                    entry = next(it, None)
                except OSError as e:
                    # getdents failed part-way: we may have missed entries.
                    if e.errno in SKIPPABLE:
                        yield _warn(path, e, "list directory")
                        entry = None
                    else:
                        raise _fatal(path, e, "cannot list directory") from None
                if entry is None:
                    stack.pop()
                    it.close()
                    os.close(fd)
                    continue
                # scandir(fd) yields str names; back to the exact bytes.
                name = os.fsencode(entry.name)
                child = path + b"/" + name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        child_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        push(child_fd, child)
                    elif entry.is_symlink():
                        target = os.readlink(name, dir_fd=fd)
                        yield from self._link(child, target, kind)
                    elif entry.is_file(follow_symlinks=False):
                        yield from self._regular_file(child, kind)
                    # FIFOs, sockets, devices: never opened, never roots.
                except OSError as e:
                    # ELOOP/ENOTDIR: the entry was swapped for a link or file
                    # between readdir and open; like Nix, skip it with a warning.
                    if e.errno in SKIPPABLE or e.errno == errno.ELOOP:
                        yield _warn(child, e, "read entry")
                    else:
                        raise _fatal(child, e, "cannot read") from None
        finally:
            for fd, it, _ in stack:
                it.close()
                os.close(fd)

    def _regular_file(self, path: bytes, kind: RootKind) -> Iterator[Record]:
        # A regular file named like a store path roots that path (Nix does
        # not read it).
        name = path[path.rfind(b"/") + 1:]
        if is_store_basename(name):
            yield Root(kind, path, self.layout.store_dir + b"/" + name)

    def _link(self, link: bytes, target: bytes, kind: RootKind) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        if is_in_dir(target, store_dir):
            store_path = to_store_path(target, store_dir)
            if store_path is not None:
                yield Root(kind, link, store_path)
            return
        # Not into the store: follow exactly one level (an indirect root).
        # lstat/readlink never follow the final component, so a link planted
        # in a sticky dir cannot redirect us (fs.protected_symlinks).
        resolved = abs_path(target, dir_of(link))
        try:
            st = os.lstat(resolved)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                if is_in_dir(link, self.layout.auto_dir):
                    yield StaleLink(link, resolved)
                return
            if e.errno in SKIPPABLE:
                yield _warn(link, e, f"lstat of its target {os.fsdecode(resolved)!r}")
                return
            raise _fatal(resolved, e, "cannot lstat indirect root") from None
        if not stat.S_ISLNK(st.st_mode):
            return
        try:
            target2 = os.readlink(resolved)
        except OSError as e:
            if e.errno in SKIPPABLE or e.errno == errno.EINVAL:  # EINVAL: swapped to a non-link
                yield _warn(resolved, e, "readlink")
                return
            raise _fatal(resolved, e, "cannot readlink indirect root") from None
        if is_in_dir(target2, store_dir):
            store_path = to_store_path(target2, store_dir)
            if store_path is not None:
                out_kind = RootKind.PROFILE if kind == RootKind.PROFILE else RootKind.INDIRECT
                yield Root(out_kind, resolved, store_path)

    # -- /proc ---------------------------------------------------------------

    def _runtime_roots(self) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        try:
            pids = [e.name for e in os.scandir(self.proc) if e.name.isdigit()]
        except OSError as e:
            raise _fatal(self.proc, e, "cannot list") from None
        for pid in pids:
            yield from self._process_roots(self.proc + b"/" + pid)
        for path in KERNEL_ROOT_FILES:
            data = self._read_proc_file(path)
            if data is None:
                continue
            # Nix uses the raw contents, trailing newline included, which
            # makes "/nix/store/x-y\n" unparsable; we drop the newline and
            # so keep such a path alive (strictly safer).
            value = data[:-1] if data.endswith(b"\n") else data
            sp = to_store_path(value, store_dir)
            if sp is not None:
                yield Root(RootKind.RUNTIME, path, sp)

    def _read_proc_file(self, path: bytes) -> bytes | None:
        try:
            return read_limited(path)
        except OSError as e:
            if e.errno in PROC_SKIPPABLE:
                return None
            raise _fatal(path, e, "cannot read") from None

    def _process_roots(self, pid_dir: bytes) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        try:
            items = self._read_process(pid_dir, self.cmdline)
        except OSError as e:  # the sandbox's /proc reader failed: never a smaller root set
            raise _fatal(pid_dir, e, "cannot read process") from None
        found: list[tuple[bytes, bytes]] = []  # (label, target)
        for name, value in items:
            path = pid_dir + b"/" + name
            if isinstance(value, OSError):
                if value.errno not in PROC_SKIPPABLE:
                    raise _fatal(path, value, "cannot read") from None
                if name == b"fd" and value.errno == errno.EACCES:
                    yield ScanWarning(path, value.errno, "cannot read runtime roots: permission "
                                      "denied (does the helper have CAP_SYS_PTRACE?)")
            elif name == b"maps":
                if store_dir in value:
                    for line in value.split(b"\n"):
                        if store_dir in line and (m := MAPS_LINE.match(line)):
                            found.append((path, m.group(1)))
            elif name in (b"environ", b"cmdline"):
                if store_dir in value:
                    found += [(path, m.group(0)) for m in self._env_re.finditer(value)]
            else:  # exe, cwd, fd/N: link targets
                found.append((path, value))
        yield from self._emit_runtime(found)

    def _emit_runtime(self, found: list[tuple[bytes, bytes]]) -> Iterator[Record]:
        store_dir = self.layout.store_dir
        for label, target in found:
            if target.startswith(b"/"):
                sp = to_store_path(target, store_dir)
                if sp is not None:
                    yield Root(RootKind.RUNTIME, label, sp)


def scan_roots(layout: StoreLayout, *, runtime: bool = True, cmdline: bool = False) -> Iterator[Record]:
    return Scanner(layout, runtime=runtime, cmdline=cmdline).scan()
