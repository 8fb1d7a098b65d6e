"""Binding a Unix socket safely, and removing it only while it is ours;
shared by gcrootsd, its collector and gcroots-helper's launcher
(helper/launch.py; the serving helper never loads this module: sockets
handed over and peer credentials are gcroots/activation.py's).
Standard library only."""

import contextlib
import ctypes
import errno
import os
import socket
import stat
from dataclasses import dataclass

from . import nofollow, opendir

# bind() then chmod()/chown() by path follows whatever the path holds by
# then: whoever can write the directory swaps the socket for a link to any
# file, and we hand that file over.  fchmod/fchown on a socket's fd return 0
# but change nothing (measured on Linux 6.18: they act on the sockfs inode).
# So a socket is bound in a fresh private directory (ours, 0700), given its
# mode and owner there by name relative to that directory's fd, and renamed
# into place.  The directory it goes to is reached from "/" without
# following a symlink, through directories that only we, root (or
# `dir_owners`) can change -- or sticky ones (/tmp) whose entry on the way
# is such a user's -- and must itself be writable by nobody else: nobody
# else can move our socket, or put theirs where clients look for ours.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class SocketFile:
    """A socket file we created: removed only while it is still the one we bound."""
    path: bytes
    st: os.stat_result        # its lstat, when we bound it
    dir_id: tuple[int, int]   # its directory's (st_dev, st_ino)

    def remove(self) -> None:
        """Unlink it, if it is still ours, in the directory it was made in.
        It is first taken aside (rename is atomic): a socket that another
        instance put there meanwhile is put back, not removed."""
        parent, name = os.path.split(self.path)
        aside = b".%s.gone.%s" % (name, os.urandom(6).hex().encode())
        with contextlib.suppress(OSError, ValueError):
            dfd = opendir.open_dir(parent)
            try:
                if opendir.identity(dfd) == self.dir_id:
                    os.rename(name, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
                    # Not ours: back, unless a newer one is there by now (never
                    # replaced); then the one taken aside serves nobody.
                    if not os.path.samestat(os.lstat(aside, dir_fd=dfd), self.st) \
                            and _put_back(dfd, aside, name):
                        return
                    os.unlink(aside, dir_fd=dfd)
            finally:
                os.close(dfd)


# renameat2(2), resolved now: the helper's socket remover calls it after
# its sandbox is in place (no library loaded then).
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):   # not glibc >= 2.28
    _renameat2 = None
_RENAME_NOREPLACE = 1


def _put_back(dfd: int, aside: bytes, name: bytes) -> bool:
    """`aside` back to `name` in `dfd`, unless something is at `name` by
    now; True if it went back.  A rename that never replaces: link() of a
    socket someone else owns (the helper's, given to the user it allows)
    needs CAP_FOWNER under fs.protected_hardlinks, which the helper's
    socket remover does not hold.  link() where renameat2 is missing or
    refused."""
    if _renameat2 is not None:
        if _renameat2(dfd, aside, dfd, name, _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        # EINVAL: a file system without the flag; EPERM: a seccomp filter
        # that denies the call (link() may still do).
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise OSError(err, os.strerror(err), os.fsdecode(name))
    with contextlib.suppress(FileExistsError):
        os.link(aside, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    return False


def _check_dir(st: os.stat_result, name: str, trusted: tuple[int, ...], sticky_ok: bool) -> None:
    if st.st_uid not in trusted or st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise OSError(f"{name} is writable by others (owner uid {st.st_uid}, mode "
                      f"{stat.S_IMODE(st.st_mode):04o}); use one that only this user (or root) can write")


def listen_unix(path: bytes, mode: int, owner_uid: int | None = None,
                dir_owners: tuple[int, ...] = ()) -> tuple[socket.socket, SocketFile]:
    """Bind a listening Unix socket at `path` with `mode` (and owner) from
    the first instant it is there, without a window for path tricks (see
    above).  Replaces only a socket nobody serves; refuses a live one (a
    second instance must not steal the first one's clients), anything that
    is not a socket, and a directory others can write or redirect.  Raises
    OSError with a one-line message naming the path."""
    path = os.path.join(os.getcwdb(), path)
    where, (parent, name) = os.fsdecode(path), os.path.split(path)
    trusted, at = (0, os.geteuid(), *dir_owners), b"/"   # at: where we are, or what failed
    fd = os.open(b"/", _DIR_FLAGS)
    try:
        if len(path) > 107 or not name:   # sun_path: clients could not connect (no name: a dir)
            raise OSError("its path is longer than 107 bytes" if name else "its path ends in '/'")
        for part in [p for p in parent.split(b"/") if p not in (b"", b".")]:
            if part == b"..":   # resolved physically by the kernel, lexically by clients
                raise OSError("'..' in its path")
            up = os.fstat(fd)   # checked before we make anything in it
            _check_dir(up, os.fsdecode(at), trusted, sticky_ok=True)
            at = os.path.join(at, part)
            with contextlib.suppress(FileExistsError):   # (EEXIST comes before EACCES or EROFS)
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = nofollow.open_at(fd, part, _DIR_FLAGS, at)
            os.close(fd)
            fd = nxt   # in a sticky directory, only its owner can move it:
            _check_dir(up, os.fsdecode(os.path.dirname(at)), trusted, sticky_ok=os.fstat(fd).st_uid in trusted)
        _check_dir(os.fstat(fd), "its directory", trusted, sticky_ok=False)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(name, dir_fd=fd).st_mode):
                raise OSError(f"{where} exists and is not a socket; refusing to replace it")
            if _is_live(fd, name):
                raise OSError(f"{where} is served by a running process; refusing to take it over "
                              "(stop that one first)")
        sock = _bind_privately(fd, name, mode, owner_uid)
        return sock, SocketFile(path, os.lstat(name, dir_fd=fd), opendir.identity(fd))
    except nofollow.SymlinkInPath as e:
        raise OSError(f"refusing to create socket {where}: {e.strerror} ({e.filename}); give its real path") from None
    except OSError as e:
        if e.errno is None:   # ours: what is wrong with the path (what is in its place names it already)
            raise OSError(e if str(e).startswith(where) else f"refusing to create socket {where}: {e}") from None
        raise OSError(f"cannot create socket {where}: {e.strerror} ({os.fsdecode(at)})") from None
    finally:
        os.close(fd)


def _is_live(dfd: int, name: bytes) -> bool:
    """Does a process accept on the socket `name` in `dfd`?  (Connecting is
    the only way to tell a live socket from one its process left behind.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
        err = s.connect_ex(b"/proc/self/fd/%d/%s" % (dfd, name))
    if err not in (0, errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT):   # EAGAIN: its backlog is full
        raise OSError(err, os.strerror(err))
    return err in (0, errno.EAGAIN)


def _bind_privately(dfd: int, name: bytes, mode: int, owner_uid: int | None) -> socket.socket:
    """Bind `name` in a fresh 0700 directory of ours in `dfd`, set its owner
    and mode there (nobody else can enter it, so the name cannot be
    swapped), listen, and rename it into `dfd`."""
    private = b".%s.%s" % (name, os.urandom(6).hex().encode())
    os.mkdir(private, 0o700, dir_fd=dfd)
    try:
        pfd = os.open(private, _DIR_FLAGS, dir_fd=dfd)
        try:
            if (st := os.fstat(pfd)).st_uid != os.geteuid() or st.st_mode & 0o077:   # not ours: swapped
                raise OSError(errno.EPERM, "its directory changed under us")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(b"/proc/self/fd/%d/%s" % (pfd, name))
                if owner_uid is not None:   # no chown call otherwise: units deny @chown
                    os.chown(name, owner_uid, -1, dir_fd=pfd, follow_symlinks=False)
                os.chmod(name, mode, dir_fd=pfd)
                sock.listen(64)
                os.rename(name, name, src_dir_fd=pfd, dst_dir_fd=dfd)
                return sock
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=pfd)
                raise
        finally:
            os.close(pfd)
    finally:
        with contextlib.suppress(OSError):   # renamed away by the directory's owner: theirs to clean up
            os.rmdir(private, dir_fd=dfd)

