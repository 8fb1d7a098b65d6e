"""Opening a directory by its full path without following a symbolic link
on the way: from "/" (or a trusted directory) one component at a time
with nofollow.open_at.  For the unprivileged side -- the client (indirect
roots, profiles), gcrootsd's deleter, the launcher's socket files -- which
acts on paths other users control (gcroots/nofollow.py says why).  The
privileged helper's scan only walks (nofollow.walk), so it does not load
this module.

Standard library only; every path is bytes.
"""

from __future__ import annotations

import os

from .nofollow import open_at

# O_PATH: search permission on each directory is all the walk needs, so an
# execute-only home (0711) still works; such an fd is good as dir_fd for
# fstatat, readlinkat and unlinkat.
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: bytes, flags: int = PATH_FLAGS, trusted: bytes = b"/") -> int:
    """An fd of the directory `path` (lexically canonical below `trusted`:
    no `.` or `..`), reached from `trusted` (opened as its path says; "/" by
    default, when `path` must be absolute) without following any symlink
    below it.  Raises SymlinkInPath if one of those components is a symlink,
    else the OSError of the component that failed (nofollow.open_at)."""
    if path != trusted and not path.startswith(trusted.rstrip(b"/") + b"/"):
        raise ValueError(f"not an absolute path: {path!r}" if trusted == b"/" else
                         f"{path!r} is not below {trusted!r}")
    parts = [p for p in path[len(trusted):].split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        # `..` after a symlink would be resolved physically by the kernel
        # but lexically by our callers: never mix the two.
        raise ValueError(f"not a canonical path: {path!r}")
    fd = os.open(trusted, (flags if not parts else PATH_FLAGS) & ~os.O_NOFOLLOW)
    walked = trusted.rstrip(b"/")
    try:
        for i, part in enumerate(parts, 1):
            walked += b"/" + part
            nxt = open_at(fd, part, flags if i == len(parts) else PATH_FLAGS, walked)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
