"""Deleting store paths from disk, in a worker process of its own.

Deletion is kernel-bound and done with many small syscalls from Python; in
the collector's process it would fight the DB work for the GIL.  So the
collector starts `python -m gcroots.daemon.deleter` (fork+exec, safe from a
threaded daemon) and hands it batches over a pipe:

    request:  u32 count, then count x (u32 length, path bytes); count 0 = exit
    reply:    u64 bytes freed, u64 bytes freed as Nix counts them,
              u32 error length, error text (UTF-8)

or, to check before anything is deleted (why_undeletable, split across
the workers):

    request:  u32 0xFFFFFFFF, u32 count, count x (u32 length, bytes): the
              store dir, then names in it
    reply:    u32 length, the reason (UTF-8; empty: all can go)

"Freed" counts blocks (du-style): a file's when its last link went, and
directories'.  Nix's deletePath counts the apparent size of every file
that had one or two links -- two: most likely an optimised file, whose
`.links` twin goes when the collector cleans `.links` at the end -- and
stops --max-freed on that count; so do we.

The worker only ever removes the paths it is given (already invalidated in
the DB by the collector), and only what is inside them: it walks by
directory fds and never follows a link (the store's owner may be someone
else than the collector's user -- root collecting another user's store).
Paths are raw bytes: junk names may hold any byte but NUL and '/'.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import threading
from typing import Callable, Iterator

from gcroots import nofollow, opendir

_U32 = struct.Struct(">I")
_CHECK = 0xFFFFFFFF
_REPLY = struct.Struct(">QQI")
_DIR = nofollow.READ_FLAGS
_DIR_PATH = opendir.PATH_FLAGS
_RETRIES = 8   # for an entry that keeps changing type under us
_MOUNT_POINT = "a mount point: another file system's files are not deleted"


def _count(st: os.stat_result) -> int:
    return st.st_blocks * 512


class Freed:
    """Bytes freed for sure (du-style), and as Nix counts them."""

    def __init__(self) -> None:
        self.sure = 0
        self.nix = 0

    def file(self, st: os.stat_result, nlink: int | None = None) -> None:
        nlink = st.st_nlink if nlink is None else nlink
        if nlink == 1:
            self.sure += _count(st)
        if nlink <= 2:
            self.nix += st.st_size


def open_dir(path: bytes) -> int:
    """An fd of a directory the collector was configured with (the store
    dir, its `.links`), reached from / without following any symlink on
    the way: a directory above the store that its owner swaps for a link
    fails the deletion, never moves it elsewhere (Nix refuses a symlink in
    the store dir's path too)."""
    return opendir.open_dir(path, _DIR)


def delete_trees(paths: list[bytes], freed: Freed) -> None:
    """rm -rf of these store entries in turn, adding what they free.  By
    directory fds only: every step is relative to a directory already open
    (fstatat, unlinkat, openat with O_NOFOLLOW|O_DIRECTORY), so an entry
    that the store's owner swaps for a symlink meanwhile is removed as the
    link it has become, never followed -- not even by root collecting
    another user's store.  Directories are made writable with fchmod on
    their own fd, only when they are not already and only without
    CAP_DAC_OVERRIDE (root's, which lets us into any directory anyway).
    Consecutive entries of one directory (the store dir) share one fd of
    it.  An error names the exact path (OSError.filename)."""
    fd, parent, dev = -1, None, 0
    chmod = not effective_caps() >> CAP_DAC_OVERRIDE & 1
    try:
        for path in paths:
            where, name = path.rsplit(b"/", 1)
            if where != parent:
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                fd, parent = open_dir(where), where
                dev = os.fstat(fd).st_dev
            _remove(fd, where, name, dev, chmod, freed)
    finally:
        if fd >= 0:
            os.close(fd)


def _remove(top: int, top_path: bytes, name: bytes, dev: int, chmod: bool, freed: Freed) -> None:
    """Depth-first with an explicit stack of open directories (no recursion
    limit; one fd per level), each frame [fd, path, stat, entries left:
    (name, is a directory: True, False or None for unknown)]."""
    frames: list[list] = [[top, top_path, None, [(name, None)]]]
    retries: dict[bytes, int] = {}
    try:
        while True:
            fd, where, st, names = frames[-1]
            if names:
                name, is_dir = names.pop()
                path = where + b"/" + name
                try:
                    sub = _unlink_or_open(fd, name, dev, chmod, freed, is_dir)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None
                if sub is not None:
                    frames.append([sub[0], path, sub[1], _entries_typed(sub[0])])
                continue
            if len(frames) == 1:
                return
            frames.pop()
            os.close(fd)
            name = where[len(frames[-1][1]) + 1:]
            try:
                os.rmdir(name, dir_fd=frames[-1][0])
                freed.sure += _count(st)
            except FileNotFoundError:
                pass
            except OSError as e:
                # Swapped for a link or refilled since we emptied it (only
                # the store's owner can): remove whatever the name is now.
                if e.errno not in (errno.ENOTDIR, errno.ENOTEMPTY) or retries.get(where, 0) >= _RETRIES:
                    raise OSError(e.errno, e.strerror, os.fsdecode(where)) from None
                retries[where] = retries.get(where, 0) + 1
                frames[-1][3].append((name, None))
    finally:
        for frame in frames[1:]:
            os.close(frame[0])


def _unlink_or_open(dir_fd: int, name: bytes, dev: int, chmod: bool, freed: Freed,
                    is_dir: bool | None):
    """Unlink `name` if it is not a directory; else (fd, stat) of it, open
    and writable by us.  None if it is gone.  `is_dir`: what the listing's
    d_type said -- a directory is opened without a stat first (a wrong
    guess costs a retry, never a followed link: O_NOFOLLOW|O_DIRECTORY)."""
    for _ in range(_RETRIES):
        if not is_dir:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(st.st_mode):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    return None
                except IsADirectoryError:
                    continue  # became a directory since the stat
                freed.file(st)
                return None
        is_dir = None
        try:
            return _open_writable(dir_fd, name, dev, chmod)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            # a link or a file (now, or all along): never followed, look again
    raise OSError(errno.EAGAIN, "it keeps changing type while we delete it")


def _open_writable(dir_fd: int, name: bytes, dev: int, chmod: bool):
    try:
        fd = os.open(name, _DIR, dir_fd=dir_fd)
    except PermissionError:
        # Not readable even by its owner: open it without reading (O_PATH),
        # change the mode of exactly that inode -- O_PATH fds take no
        # fchmod, /proc/self/fd/N names the open file, not a path -- and
        # open it for reading through that fd.
        pfd = os.open(name, _DIR_PATH, dir_fd=dir_fd)
        try:
            pst = os.fstat(pfd)
            if pst.st_dev != dev:
                raise OSError(errno.EXDEV, _MOUNT_POINT) from None
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(pst.st_mode) | 0o700)
            fd = os.open(".", _DIR, dir_fd=pfd)
        finally:
            os.close(pfd)
    try:
        st = os.fstat(fd)
        if st.st_dev != dev:
            raise OSError(errno.EXDEV, _MOUNT_POINT)
        if chmod and st.st_mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _entries_typed(fd: int) -> list[tuple[bytes, bool]]:
    """(name, is a directory by d_type) of each entry: no stat."""
    with os.scandir(fd) as it:
        return [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]


def walk_trees(parent: bytes, names: list[bytes], *,
               files: bool = True) -> Iterator[tuple[bytes, os.stat_result, int | None, int]]:
    """(path, lstat, fd, depth) of the entries `names` of the directory
    `parent` (depth 0) and of everything below them, walked by directory
    fds without following any link.  `fd` is the open directory, valid until
    the next item is asked for; None for anything else, and for a directory
    we may not read (whose contents are then not walked).  files=False:
    below depth 0, directories only (d_type: files are not even stat'ed),
    and those without subdirectories (st_nlink 2 on ext4, tmpfs, xfs...),
    at depth 0 too, are not opened."""
    top = open_dir(parent)
    stack: list[tuple[int, bytes, Iterator[bytes]]] = [(top, parent, iter(names))]
    try:
        while stack:
            fd, where, entries = stack[-1]
            name = next(entries, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            child = where + b"/" + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) or not files and st.st_nlink == 2:
                    yield child, st, None, len(stack) - 1
                    continue
                sub = os.open(name, _DIR, dir_fd=fd)
            except PermissionError:
                yield child, st, None, len(stack) - 1
                continue
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue  # gone, or no longer a directory: not entered
                raise
            stack.append((sub, child, _entries(sub, files)))
            yield child, st, sub, len(stack) - 2
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _entries(fd: int, files: bool) -> Iterator[bytes]:
    with os.scandir(fd) as it:  # d_type: no stat of what is skipped
        return iter([os.fsencode(e.name) for e in it if files or e.is_dir(follow_symlinks=False)])


def estimate_tree(path: bytes, freed: Freed, unlinked: dict[tuple[int, int], int]) -> None:
    """What delete_trees() would add to `freed` for `path`, without
    deleting, after the links counted in `unlinked` (inode -> links) went
    (and counting ours).  Walked like delete_trees(): by directory fds,
    following no link."""
    parent, name = path.rsplit(b"/", 1)
    for _, st, _, _ in walk_trees(parent, [name]):
        if stat.S_ISDIR(st.st_mode):
            freed.sure += _count(st)
            continue
        key = (st.st_dev, st.st_ino)
        gone = unlinked.get(key, 0)
        freed.file(st, st.st_nlink - gone)
        unlinked[key] = gone + 1


# -- whether the worker can delete it: checked before anything is deleted --------

CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_SYS_ADMIN = 1, 3, 21
_FS_IOC_GETFLAGS = 0x80086601          # _IOR('f', 1, long); the kernel writes an int
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def effective_caps() -> int:
    """This process's effective capabilities (a bit mask; uid 0 alone is not
    enough: NixOS runs gcrootsd as root with none)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return int(line.split()[1], 16)
    return 0


def why_undeletable(store: bytes, names: list[bytes],
                    progress: "Callable[[int], None] | None" = None) -> str | None:
    """The first reason the worker would fail to delete one of these entries
    of the store dir -- "PATH: why" -- or None.  Checked without changing
    anything, in one walk of the directories (files are not stat'ed): each
    entry's owner against the sticky bit of the store dir (1775 on stock
    Nix: only the entry's owner, the dir's owner or CAP_FOWNER may unlink
    it), its immutable/append-only flags, mount points at or below it (from
    mountinfo: a read-only bind mount has the store's st_dev), and of every
    directory inside it what the worker will do there (list it, make it
    writable: owner or CAP_FOWNER; sticky bit; the flags of those it
    lists).  Not looked at: a flag on a file or on a directory without
    subdirectories below the top, a disk that fails, a change made
    meanwhile -- they still stop the deletion, with an error naming the
    path.  `progress(n)`: n of the entries checked."""
    from gcroots.users import user_name
    caps, euid = effective_caps(), os.geteuid()
    mine = lambda st: st.st_uid == euid or caps >> CAP_FOWNER & 1  # noqa: E731  may chmod it
    mounts = _mount_points(os.path.realpath(store))
    sst = os.stat(store)
    sticky = sst.st_mode & stat.S_ISVTX and not mine(sst)
    top = 0
    for path, st, fd, depth in walk_trees(store, names, files=False):
        if depth == 0:
            top += 1
            if progress is not None and top % 256 == 0:
                progress(top)
            if sticky and st.st_uid != euid:
                return (f"{os.fsdecode(path)}: it belongs to {user_name(st.st_uid)}, and the store dir "
                        f"{os.fsdecode(store)} (mode {stat.S_IMODE(sst.st_mode):o}, owner "
                        f"{user_name(sst.st_uid)}) is sticky: only the entry's owner, the dir's "
                        f"owner or CAP_FOWNER may remove it, not {user_name(euid)}")
            name = path[len(store) + 1:]
            for m, options in mounts.items():
                if m == name or m.startswith(name + b"/"):
                    return (f"{os.fsdecode(store + b'/' + m)}: a mount point ({options}); "
                            "unmount it first")
            # Its flags: a file's, or a directory's that walk_trees did not
            # open (no subdirectories: nothing in it is walked).
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) and fd is None) \
                    and (why := _flags_problem(_flags_of_file(path))):
                return f"{os.fsdecode(path)}: {why}"
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_dev != sst.st_dev:
            return f"{os.fsdecode(path)}: on another file system: {_MOUNT_POINT}"
        if fd is not None and (why := _flags_problem(_flags(fd))):
            return f"{os.fsdecode(path)}: {why}"
        if mine(st):
            continue
        # Someone else's directory (rare): we need to list it and remove
        # what it holds as it is.  os.access by path: only a check.
        owner = f"(mode {stat.S_IMODE(st.st_mode):o}, owner {user_name(st.st_uid)})"
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
            return (f"{os.fsdecode(path)}: {user_name(euid)} may not remove what it holds {owner}, and only "
                    "its owner may make it writable")
        if st.st_mode & stat.S_ISVTX:
            with os.scandir(path) as it:
                for e in it:
                    if e.stat(follow_symlinks=False).st_uid != euid:
                        return (f"{os.fsdecode(path)}: it is sticky {owner}, and {e.name!r} in it belongs "
                                f"to someone else, whom {user_name(euid)} may not remove")
    return None


def _flags(fd: int) -> int:
    try:
        return struct.unpack_from("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8)))[0]
    except OSError:  # ENOTTY, EOPNOTSUPP...: a file system without such flags
        return 0


def _flags_of_file(path: bytes) -> int:
    """Its immutable/append-only flags: from statx's attributes (one call,
    no open) where the file system says it reports both, else
    FS_IOC_GETFLAGS on an fd of it."""
    flags = _statx_flags(path)
    if flags is not None:
        return flags
    try:
        fd = os.open(path, _FILE)
    except OSError:  # unreadable: its flags stay unknown (the deletion then says)
        return 0
    try:
        return _flags(fd)
    finally:
        os.close(fd)


# STATX_ATTR_IMMUTABLE and STATX_ATTR_APPEND are the FS_*_FL bits.
_STATX_ATTRS = _FS_IMMUTABLE_FL | _FS_APPEND_FL
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW = -100, 0x100
# Its struct statx buffer, one per thread: a dry run checks in gcrootsd's
# process, and dry runs may run side by side (ctypes lets go of the GIL in
# the call: a shared buffer gave one thread another's answer).
_statx_buffer = threading.local()


@functools.cache
def _libc_statx() -> Callable | None:
    """libc's statx(2), or None where it has none."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    return fn


def _statx_flags(path: bytes) -> int | None:
    """The two flags from statx(2) (no link followed); None if statx is
    missing or fails, or the file system does not report both."""
    if (fn := _libc_statx()) is None:
        return None
    if (buf := getattr(_statx_buffer, "buf", None)) is None:
        import ctypes
        buf = _statx_buffer.buf = ctypes.create_string_buffer(256)
    if fn(_AT_FDCWD, path, _AT_SYMLINK_NOFOLLOW, 0, buf) != 0:
        return None
    attributes, = struct.unpack_from("Q", buf, 8)
    supported, = struct.unpack_from("Q", buf, 56)   # stx_attributes_mask
    if supported & _STATX_ATTRS != _STATX_ATTRS:
        return None
    return attributes & _STATX_ATTRS


def _flags_problem(flags: int) -> str | None:
    if flags & _FS_IMMUTABLE_FL:
        return "it is immutable (chattr +i): not even root may remove it; chattr -i it first"
    if flags & _FS_APPEND_FL:
        return "it is append-only (chattr +a): nothing may be removed from it; chattr -a it first"
    return None


def _mount_points(store: bytes) -> dict[bytes, str]:
    """Mount points below the store dir (names relative to it) -> their
    options, from this process's mountinfo (what the worker sees)."""
    out = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if point.startswith(store + b"/"):
                out[point[len(store) + 1:]] = "read-only" if b"ro" in fields[5].split(b",") else "read-write"
    return out


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    parts = field.split(b"\\")
    return parts[0] + b"".join(bytes([int(p[:3], 8)]) + p[3:] for p in parts[1:])


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError("the collector went away")
    return data


class DeleterProcess:
    """The collector's side."""

    def __init__(self) -> None:
        # This file by its absolute path, in isolated mode (-I: no PYTHON*
        # variables, no user site, and -- unlike `-m` -- neither the current
        # directory nor the script's own directory on sys.path), from /:
        # whatever directory root runs `gcroots-query gc` in, nothing there
        # gets imported.  The worker needs only the standard library.
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")

    def delete(self, paths: list[bytes]) -> tuple[int, int]:
        """(bytes freed, bytes freed as Nix counts them)."""
        self._send(_U32.pack(len(paths)), paths)
        try:
            freed, nix, errlen = _REPLY.unpack(_read_exact(self.proc.stdout, _REPLY.size))
            error = _read_exact(self.proc.stdout, errlen).decode("utf-8", "replace")
        except EOFError:
            raise OSError(f"the deletion worker died (exit status {self.proc.poll()})") from None
        if error:
            raise OSError(f"deleting from the store failed: {error}")
        return freed, nix

    def start_check(self, store: bytes, names: list[bytes]) -> None:
        """why_undeletable(store, names) in the worker; then check_result()."""
        self._send(_U32.pack(_CHECK) + _U32.pack(len(names) + 1), [store, *names])

    def check_result(self) -> str | None:
        try:
            (n,) = _U32.unpack(_read_exact(self.proc.stdout, 4))
            return _read_exact(self.proc.stdout, n).decode("utf-8", "replace") or None
        except EOFError:
            raise OSError(f"the deletion worker died (exit status {self.proc.poll()})") from None

    def _send(self, head: bytes, paths: list[bytes]) -> None:
        msg = [head]
        for p in paths:
            msg += (_U32.pack(len(p)), p)
        self.proc.stdin.write(b"".join(msg))
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.proc.stdin.write(_U32.pack(0))
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    # ^C on a terminal reaches the whole process group: the collector
    # decides (it stops, and we at the EOF that follows), not a traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:  # one fd per directory level of a tree being deleted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            pass
    while True:
        try:
            (count,) = _U32.unpack(_read_exact(stdin, 4))
        except EOFError:
            return 0
        if count == 0:
            return 0
        check = count == _CHECK
        if check:
            (count,) = _U32.unpack(_read_exact(stdin, 4))
        paths = []
        for _ in range(count):
            (n,) = _U32.unpack(_read_exact(stdin, 4))
            paths.append(_read_exact(stdin, n))
        if check:
            why = (why_undeletable(paths[0], paths[1:]) or "").encode()
            stdout.write(_U32.pack(len(why)) + why)
            stdout.flush()
            continue
        freed, error = Freed(), ""
        try:
            delete_trees(paths, freed)
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "")
            where = os.fsdecode(e.filename) if e.filename else "deleting"
            error = f"{where}: {e.strerror or e}" + (f" ({code})" if code else "")
        stdout.write(_REPLY.pack(freed.sure, freed.nix, len(error.encode())) + error.encode())
        stdout.flush()
        if error:
            return 1


if __name__ == "__main__":
    sys.exit(main())
