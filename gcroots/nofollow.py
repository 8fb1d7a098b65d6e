"""Walking a tree, and opening a directory one level down, without
following a symbolic link anywhere on the way.

The client deletes links named by paths that other users control (an
indirect root's `~/x/result`, a profile under `per-user/<user>/`): a
directory component they swap for a symlink must not move the deletion
somewhere else.  Walking from "/" one component at a time with O_NOFOLLOW
and doing every later step relative to the resulting fd closes that.
walk() is the one tree walk of that kind (the helper's scan of gcroots/ and
profiles/, the client's search for profiles).  Opening a directory by its
full path that way is gcroots/opendir.py's (built on open_at here): the
privileged helper never does it, so it never loads it.

Standard library only; every path is bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

# For a directory that is to be listed as well (fdopendir needs a real fd).
READ_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SymlinkInPath(OSError):
    """A directory component of the path is a symbolic link."""

    def __init__(self, component: bytes):
        super().__init__(errno.ELOOP, "its directory path goes through a symbolic link",
                         os.fsdecode(component))
        self.path = self.component = component   # (the same: the link on the way)


def open_at(dir_fd: int, name: bytes, flags: int, where: bytes) -> int:
    """openat(dir_fd, name, flags) of a directory that must not be a
    symlink: a symlink raises SymlinkInPath (`where` is its full path),
    anything else the OSError it gave."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        # O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP or (with O_PATH)
        # ENOTDIR, as a plain file does: look at the entry to tell which.
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except OSError:
                raise e from None
            if stat.S_ISLNK(st.st_mode):
                raise SymlinkInPath(where) from None
        raise


def walk(fd: int, path: bytes, list_dir: Callable[[int, bytes, list[bytes]], Iterator[T]],
         cannot_enter: Callable[[bytes, OSError], Iterator[T]]) -> Iterator[T]:
    """Depth first through the directory `fd` (at `path`; closed here) and
    every directory below it, yielding what list_dir() yields.

    list_dir(fd, path, subdirs) lists one directory by its fd and appends
    the names of its subdirectories (not links) to `subdirs`; each is then
    opened relative to its parent with O_NOFOLLOW, so one swapped for a link
    since the listing is not entered: cannot_enter(its path, error) says
    what that (SymlinkInPath) or any other failure to open one means.  No
    recursion, and a directory's listing is over before the walk descends:
    it holds one fd per level."""
    stack: list[tuple[int, bytes, list[bytes]]] = []   # (fd, path, subdirs to enter, last first)
    try:
        while True:
            if fd >= 0:
                stack.append((fd, path, []))
                fd = -1
                yield from list_dir(*stack[-1])
                stack[-1][2].reverse()
            if not stack:
                return
            parent, parent_path, names = stack[-1]
            if not names:
                os.close(stack.pop()[0])
                continue
            name = names.pop()
            path = os.path.join(parent_path, name)
            try:
                fd = open_at(parent, name, READ_FLAGS, path)
            except OSError as e:
                yield from cannot_enter(path, e)
    finally:
        for parent, _, _ in stack:
            os.close(parent)
