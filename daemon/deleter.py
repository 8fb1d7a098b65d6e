"""Deleting store paths from disk, in a worker process of its own.

Deletion is kernel-bound and done with many small syscalls from Python; in
the collector's process it would fight the DB work for the GIL.  So the
collector starts `python -m gcroots.daemon.deleter` (fork+exec, safe from a
threaded daemon) and hands it batches over a pipe:

    request:  u32 count, then count x (u32 length, path bytes); count 0 = exit
    reply:    u64 bytes freed, u64 bytes freed as Nix counts them,
              u32 error length, error text (UTF-8)

"Freed" counts blocks (du-style): a file's when its last link went, and
directories'.  Nix's deletePath counts the apparent size of every file
that had one or two links -- two: most likely an optimised file, whose
`.links` twin goes when the collector cleans `.links` at the end -- and
stops --max-freed on that count; so do we.

The worker only ever removes the paths it is given (already invalidated in
the DB by the collector).  Paths are raw bytes: junk names may hold any
byte but NUL and '/'.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys

_U32 = struct.Struct(">I")
_REPLY = struct.Struct(">QQI")


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


def delete_tree(path: bytes, freed: Freed) -> None:
    """rm -rf, making directories writable first (store directories are
    read-only), via fds so that nothing is followed; adds what it frees."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        freed.file(st)
        return
    _delete_dir_contents(path, st, freed)
    os.rmdir(path)
    freed.sure += _count(st)


def estimate_tree(path: bytes, freed: Freed, unlinked: dict[tuple[int, int], int]) -> None:
    """What delete_tree() would add to `freed`, without deleting, after the
    links counted in `unlinked` (inode -> links) went (and counting ours)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        gone = unlinked.get(key, 0)
        freed.file(st, st.st_nlink - gone)
        unlinked[key] = gone + 1
        return
    freed.sure += _count(st)
    with os.scandir(path) as it:
        for e in it:
            estimate_tree(e.path, freed, unlinked)  # bytes in, bytes out


def _delete_dir_contents(path: bytes, st: os.stat_result, freed: Freed) -> None:
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700, follow_symlinks=False)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
        for name in names:
            est = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(est.st_mode):
                _delete_dir_contents(path + b"/" + os.fsencode(name), est, freed)
                os.rmdir(name, dir_fd=fd)
                freed.sure += _count(est)
            else:
                os.unlink(name, dir_fd=fd)
                freed.file(est)
    finally:
        os.close(fd)


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
        msg = [_U32.pack(len(paths))]
        for p in paths:
            msg += (_U32.pack(len(p)), p)
        self.proc.stdin.write(b"".join(msg))
        self.proc.stdin.flush()
        try:
            freed, nix, errlen = _REPLY.unpack(_read_exact(self.proc.stdout, _REPLY.size))
            error = _read_exact(self.proc.stdout, errlen).decode("utf-8", "replace")
        except EOFError:
            raise OSError(f"the deletion worker died (exit status {self.proc.poll()})") from None
        if error:
            raise OSError(f"deleting from the store failed: {error}")
        return freed, nix

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
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            (count,) = _U32.unpack(_read_exact(stdin, 4))
        except EOFError:
            return 0
        if count == 0:
            return 0
        paths = []
        for _ in range(count):
            (n,) = _U32.unpack(_read_exact(stdin, 4))
            paths.append(_read_exact(stdin, n))
        freed, error = Freed(), ""
        for p in paths:
            try:
                delete_tree(p, freed)
            except OSError as e:
                error = f"{os.fsdecode(p)}: {e.strerror or e}"
                break
        stdout.write(_REPLY.pack(freed.sure, freed.nix, len(error.encode())) + error.encode())
        stdout.flush()
        if error:
            return 1


if __name__ == "__main__":
    sys.exit(main())
