"""Nix profiles and their generations, managed with the caller's own rights.

Layout (Nix 2.8, src/libstore/profiles.cc): a profile `<dir>/<name>` is a
symlink to a sibling `<name>-<N>-link`, which points at a store path.  The
generation's time is the lstat mtime of that link; `<dir>/<name>.lock` is
the profile's lock (flock(2), exclusive, deleted on release).

`nix-env --delete-generations` is reproduced exactly, with these deliberate
deviations, all of which keep more or fail before anything is deleted:

- a profile link to its generation by an absolute (or otherwise non-bare)
  path names the current generation for us; Nix does not recognise it and
  `old`, `<N>d` and `<N>` then delete the generation the profile points
  to; we keep it (`+<N>` deletes nothing, as in Nix, which finds no
  current generation to count from);
- where Nix would fail half-way (an assertion on out-of-order mtimes, a
  generation entry that is not the plain `<name>-<N>-link` symlink it then
  tries to unlink), we refuse before deleting anything;
- `<N>d` with N > 24855 is refused: Nix computes N * 86400 in a 32-bit
  int, which wraps there and deletes nearly every generation;
- we never unlink anything but symlinks (Nix's remove() also takes files
  and empty directories).

Not a deviation, since Nix 2.8 has no defined behaviour to match: given
numbers and no current generation it can parse, Nix compares them with an
unset std::optional (its build here refuses 2, or 1, as "current"); we
delete the numbers asked for, never a current generation we know.

Nothing here touches the store: only `-N-link` symlinks are unlinked.
Everything that names a file is bytes.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from gcroots import cliargs, nofollow, opendir
from gcroots.flock import lock_exclusive
from gcroots.storepath import abs_path, dir_of, to_store_path
from gcroots.users import user_name

UINT32_MAX = 2**32 - 1   # parseName: string2Int<unsigned int>
UINT64_MAX = 2**64 - 1   # GenerationNumber in nix-env's argument parsing
INT32_MAX = 2**31 - 1    # string2Int<int> for the days
DAY = 24 * 3600
# The largest day count Nix 2.8 gets right: deleteGenerationsOlderThan
# computes `curTime - *days * 24 * 3600` with days an int, so the product
# overflows (and in practice wraps) from 24856 days on.
MAX_DAYS = INT32_MAX // DAY   # 24855

# boost::lexical_cast, as Nix's string2Int uses it: an optional sign and
# ASCII digits, nothing else (no blanks, no base prefixes).  Nix rejects a
# leading '-' for unsigned types itself.
_UNSIGNED = re.compile(rb"\+?[0-9]+")
_SIGNED = re.compile(rb"[+-]?[0-9]+")


class ProfileError(Exception):
    """The operation failed; nothing was deleted unless `deleted` says so."""
    exit_code = 1

    def __init__(self, message: str, deleted: Iterable[int] = ()):
        super().__init__(message)
        self.deleted = list(deleted)


class SpecError(ProfileError):
    """A generation spec nix-env would reject (a usage error)."""
    exit_code = 2


class PermissionRefused(ProfileError):
    """The caller may not modify this profile (EACCES/EPERM)."""
    exit_code = 3


class LockTimeout(ProfileError):
    """Another process (nix-env, say) held the profile's lock too long."""
    exit_code = 4


def base_name(path: bytes) -> bytes:
    path = path.rstrip(b"/")
    return path[path.rfind(b"/") + 1:]


def _lexical_uint(text: bytes, maximum: int) -> int | None:
    if _UNSIGNED.fullmatch(text) is None:
        return None
    n = int(text)
    return n if n <= maximum else None


def _lexical_int32(text: bytes) -> int | None:
    if _SIGNED.fullmatch(text) is None:
        return None
    n = int(text)
    return n if -INT32_MAX - 1 <= n <= INT32_MAX else None


def parse_generation_name(profile_name: bytes, name: bytes) -> int | None:
    """Nix's parseName: `<profile>-<N>-link`, where anything after the first
    `-link` is ignored (so `p-3-link.bak` is generation 3 to Nix too)."""
    prefix = profile_name + b"-"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    end = rest.find(b"-link")
    if end < 0:
        return None
    return _lexical_uint(rest[:end], UINT32_MAX)


def generation_link_name(profile_name: bytes, number: int) -> bytes:
    """Nix's makeName: the only name Nix ever unlinks for generation N."""
    return b"%s-%d-link" % (profile_name, number)


# -- generation specs (nix-env --delete-generations) -------------------------

@dataclass(frozen=True)
class Spec:
    kind: str                       # "old" | "days" | "keep" | "numbers"
    days: int = 0
    keep: int = 0
    numbers: frozenset[int] = frozenset()


def parse_spec(args: list[str]) -> Spec:
    """nix-env's opDeleteGenerations, decision for decision: `old` and the
    `d` and `+` forms only as the single argument; an argument containing a
    `d` anywhere is a days spec, one containing a `+` anywhere a keep spec
    (so `1+2` keeps 2, as in Nix)."""
    raw = [os.fsencode(a) for a in args]
    if len(raw) == 1 and raw[0] == b"old":
        return Spec("old")
    if len(raw) == 1 and b"d" in raw[0]:
        s = raw[0]
        if not s.endswith(b"d"):
            raise SpecError(f"invalid number of days specifier '{args[0]}', "
                            "expected something like '14d'")
        days = _lexical_int32(s[:-1])
        if days is None or days < 1:
            raise SpecError(f"invalid number of days specifier '{args[0]}'")
        if days > MAX_DAYS:
            raise SpecError(f"refusing the number of days '{args[0]}': it must be at most "
                            f"{MAX_DAYS} (about 68 years); Nix 2.8 overflows beyond that and "
                            "deletes nearly every generation; nothing was changed")
        return Spec("days", days=days)
    if len(raw) == 1 and b"+" in raw[0]:
        s = raw[0]
        if len(s) < 2:
            raise SpecError(f"invalid number of generations '{args[0]}'")
        keep = _lexical_uint(s[1:], UINT64_MAX)
        if not keep:  # None, or +0: that would delete the current generation
            raise SpecError(f"invalid number of generations to keep '{args[0]}'")
        return Spec("keep", keep=keep)
    numbers = set()
    for a, s in zip(args, raw):
        n = _lexical_uint(s, UINT64_MAX)
        if n is None:
            raise SpecError(f"invalid generation number '{a}'")
        numbers.add(n)
    return Spec("numbers", numbers=frozenset(numbers))


# -- reading a profile -------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    number: int
    name: bytes                 # the directory entry
    mtime: int                  # lstat st_mtime, whole seconds, as Nix
    is_link: bool
    target: bytes | None        # readlink, if a symlink
    canonical: bool             # name == `<profile>-<N>-link`
    ino: tuple[int, int] = (0, 0)

    def store_path(self, store_dir: bytes) -> bytes | None:
        if self.target is None:
            return None
        return to_store_path(self.target, store_dir)


@dataclass
class Profile:
    path: bytes                         # absolute, symlinks not resolved (like nix-env -p)
    generations: list[Generation]       # by number, as Nix sorts them
    current: int | None                 # what Nix calls the current generation
    link: bytes | None                  # readlink of the profile (None: absent)
    current_by_path: bool = False       # current found by our deviation (see module doc)

    @property
    def dir(self) -> bytes:
        return dir_of(self.path)

    @property
    def name(self) -> bytes:
        return base_name(self.path)

    def generation_path(self, g: Generation) -> bytes:
        return os.path.join(self.dir, g.name)

    def numbers(self) -> list[int]:
        return sorted({g.number for g in self.generations})


def absolute(path: str | bytes) -> bytes:
    """nix-env's absPath: relative to the cwd, lexically, symlinks kept."""
    return abs_path(os.fsencode(path), os.getcwdb())


class ProfileDir:
    """The profile's directory, opened once: every later step (reading,
    locking, unlinking) happens relative to this fd, so a directory swapped
    for a symlink meanwhile cannot redirect an unlink elsewhere."""

    def __init__(self, profile_path: bytes, expect: tuple[int, int] | None = None):
        """`expect`: the directory's (st_dev, st_ino) as a scan or a plan
        saw it.  The path is opened as given (symlinks followed, as nix-env
        -p does), so a directory swapped since (for a symlink to someone
        else's profile directory, say) is refused here instead."""
        self.profile_path = profile_path
        self.path = dir_of(profile_path)
        self.name = base_name(profile_path)
        if not self.name or self.name in (b".", b".."):
            raise ProfileError(f"not a profile path: {os.fsdecode(profile_path)}")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise _os_error(e, f"cannot open the profile directory {os.fsdecode(self.path)}",
                            self.path, verb="access") from None
        self.st = os.fstat(self.fd)
        if expect is not None and self.identity != expect:
            self.close()
            raise ProfileError(f"{os.fsdecode(self.path)} is no longer the directory that was "
                               "scanned (replaced, or reached through a symbolic link that "
                               "changed); skipping this profile, nothing was deleted")

    @property
    def identity(self) -> tuple[int, int]:
        return self.st.st_dev, self.st.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ProfileDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self) -> Profile:
        """Nix's findGenerations."""
        gens = []
        try:
            # By fd, listdir returns str: back to the exact bytes.
            names = [os.fsencode(n) for n in os.listdir(self.fd)]
        except OSError as e:
            raise _os_error(e, f"cannot read {os.fsdecode(self.path)}", self.path, self.st,
                            "read") from None
        for entry in names:
            n = parse_generation_name(self.name, entry)
            if n is None:
                continue
            try:
                st = os.lstat(entry, dir_fd=self.fd)
                target = os.readlink(entry, dir_fd=self.fd) if stat.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:
                continue  # went away between listing and lstat
            except OSError as e:
                raise _os_error(e, f"statting {os.fsdecode(os.path.join(self.path, entry))}") from None
            gens.append(Generation(
                number=n, name=entry, mtime=st.st_mtime_ns // 1_000_000_000,
                is_link=stat.S_ISLNK(st.st_mode), target=target,
                canonical=entry == generation_link_name(self.name, n),
                ino=(st.st_dev, st.st_ino)))
        gens.sort(key=lambda g: g.number)  # stable, like std::list::sort
        current, link, by_path = self._current()
        return Profile(self.profile_path, gens, current, link, by_path)

    def _current(self) -> tuple[int | None, bytes | None, bool]:
        # Nix: pathExists (an lstat) ? parseName(readLink(profile)) : none.
        try:
            st = os.lstat(self.name, dir_fd=self.fd)
        except FileNotFoundError:
            return None, None, False
        except OSError as e:
            raise _os_error(e, f"statting {os.fsdecode(self.profile_path)}") from None
        if not stat.S_ISLNK(st.st_mode):
            # Nix's readLink fails here too.
            raise ProfileError(f"{os.fsdecode(self.profile_path)} is not a symbolic link, "
                               "so it is not a profile")
        link = os.readlink(self.name, dir_fd=self.fd)
        n = parse_generation_name(self.name, link)
        if n is not None:
            return n, link, False
        # Deviation: a link to a generation of this profile by another
        # spelling (`/nix/var/nix/profiles/default-3-link`) is still the
        # current generation; Nix would let `old` delete it.
        if b"/" in link:
            resolved = abs_path(link, self.path)
            n = parse_generation_name(self.name, base_name(resolved))
            if n is not None and self._same_dir(dir_of(resolved)):
                return n, link, True
        return None, link, False

    def _same_dir(self, other: bytes) -> bool:
        try:
            st = os.stat(other)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.st.st_dev, self.st.st_ino)

    # -- modifying ------------------------------------------------------------

    def lock(self, timeout: float | None, on_wait: Callable[[str], None] | None = None) -> "ProfileLock":
        return ProfileLock.acquire(self, timeout, on_wait)

    def check_may_unlink(self, gens: list[Generation]) -> None:
        """Fail before deleting anything if some unlink would be refused."""
        if not gens or os.geteuid() == 0:
            return
        if not os.access(b".", os.W_OK | os.X_OK, dir_fd=self.fd, effective_ids=True):
            raise refused(self.path, self.st)
        if self.st.st_mode & stat.S_ISVTX and self.st.st_uid != os.geteuid():
            # Sticky directory: only the entry's owner may unlink it.
            for g in gens:
                st = os.lstat(g.name, dir_fd=self.fd)
                if st.st_uid != os.geteuid():
                    raise refused(os.path.join(self.path, g.name), st)

    def unlink_all(self, profile: Profile, doomed: list[Generation],
                   on_delete: Callable[[int, bool], None] | None = None) -> list[int]:
        """Unlink in order; an error says which ones are already gone."""
        deleted: list[int] = []
        for g in doomed:
            if on_delete is not None:
                on_delete(g.number, False)
            try:
                self.unlink_generation(g)
            except ProfileError as e:
                raise ProfileError(str(e), deleted) from None
            except OSError as e:
                err = _os_error(e, f"cannot unlink {os.fsdecode(profile.generation_path(g))}",
                                self.path, self.st)
                err.deleted = deleted
                raise err from None
            deleted.append(g.number)
        return deleted

    def unlink_generation(self, g: Generation) -> None:
        # Re-check right before the unlink that the entry is still the
        # symlink we decided on (under the lock only another non-Nix tool
        # could have changed it).
        st = os.lstat(g.name, dir_fd=self.fd)
        if not stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) != g.ino:
            raise ProfileError(f"{os.fsdecode(os.path.join(self.path, g.name))} changed "
                               "while we held the profile's lock; not deleting it")
        os.unlink(g.name, dir_fd=self.fd)


class ProfileLock:
    """Nix's lockProfile: PathLocks on `<profile>.lock` with deletion.

    Nix (pathlocks.cc) opens/creates the file 0600, takes flock(LOCK_EX),
    and after getting it checks the file is still empty: a holder releases
    by unlinking the file and writing one byte into it, so a waiter that
    finds a non-empty file holds a lock nobody else sees and retries.
    We do the same, with a timeout instead of waiting forever."""

    def __init__(self, d: ProfileDir, fd: int, st: os.stat_result):
        self.dir, self.fd, self.st = d, fd, st

    @property
    def name(self) -> bytes:
        return self.dir.name + b".lock"

    @classmethod
    def acquire(cls, d: ProfileDir, timeout: float | None,
                on_wait: Callable[[str], None] | None) -> "ProfileLock":
        name = d.name + b".lock"
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                # O_NOFOLLOW: in a directory someone else can write, a
                # planted symlink must not make us open (and later write
                # into) an arbitrary file.
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600, dir_fd=d.fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ProfileError(f"{os.fsdecode(os.path.join(d.path, name))} is a symlink; "
                                       "refusing to use it as the profile's lock") from None
                raise _os_error(e, f"cannot open the lock {os.fsdecode(os.path.join(d.path, name))}",
                                d.path, d.st) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ProfileError(f"{os.fsdecode(os.path.join(d.path, name))} is not a regular "
                                       "file; refusing to use it as the profile's lock")
                if not lock_exclusive(fd, time.monotonic()):   # free: no word said
                    if not told and on_wait is not None:
                        on_wait(f"waiting for lock on profile '{os.fsdecode(d.profile_path)}'")
                        told = True
                    if not lock_exclusive(fd, deadline):
                        raise LockTimeout(
                            f"timed out after {timeout:g} s waiting for the lock on profile "
                            f"'{os.fsdecode(d.profile_path)}' ({os.fsdecode(name)} is held by "
                            "another process, e.g. nix-env); nothing was changed")
                held = os.fstat(fd)
                if not _still_named(d, name, held):
                    os.close(fd)  # a stale lock: its holder deleted it; retry
                    continue
                if held.st_size != 0:
                    # Nix only ever writes into a lock file it has unlinked;
                    # one still in place with data is something else (Nix
                    # would spin on it forever).
                    raise ProfileError(f"{os.fsdecode(os.path.join(d.path, name))} is not empty, "
                                       "so it is not a Nix lock file; refusing to go on")
                return cls(d, fd, held)
            except BaseException:
                os.close(fd)
                raise

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            try:
                st = os.lstat(self.name, dir_fd=self.dir.fd)
                if (st.st_dev, st.st_ino) == (self.st.st_dev, self.st.st_ino):
                    os.unlink(self.name, dir_fd=self.dir.fd)
            except OSError:
                pass  # removing the lock file is an optimisation (as in Nix)
            # Mark it stale for processes blocked on it, but only once no
            # name reaches it any more: a lock "file" hard-linked from
            # elsewhere must never be written into.
            if os.fstat(self.fd).st_nlink == 0:
                os.write(self.fd, b"d")
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ProfileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _still_named(d: ProfileDir, name: bytes, held: os.stat_result) -> bool:
    """Whether the lock file we hold is still the one `name` refers to.
    Nix checks that the file is empty instead (its holders write a byte into
    it after unlinking it); a file nobody can open any more excludes nobody,
    marked or not."""
    if held.st_nlink == 0:
        return False
    try:
        cur = os.lstat(name, dir_fd=d.fd)
    except FileNotFoundError:
        return False
    return (cur.st_dev, cur.st_ino) == (held.st_dev, held.st_ino)


def refused(path: bytes, st: os.stat_result | None, detail: str = "",
             verb: str = "modify") -> PermissionRefused:
    who = user_name(os.geteuid())
    owner = f" (owned by {user_name(st.st_uid)})" if st is not None else ""
    return PermissionRefused(
        f"{detail}permission denied: {who} may not {verb} {os.fsdecode(path)}{owner}; profiles "
        "are managed with your own rights, so ask its owner or root; nothing was changed")


def _os_error(e: OSError, what: str, path: bytes | None = None,
              st: os.stat_result | None = None, verb: str = "modify") -> ProfileError:
    if e.errno in (errno.EACCES, errno.EPERM) and path is not None:
        return refused(path, st, f"{what}: {e.strerror}: ", verb)
    return ProfileError(f"{what}: {e.strerror}")


# -- nix-env --delete-generations ---------------------------------------------

def select_for_deletion(profile: Profile, spec: Spec, now: float) -> list[Generation]:
    """The generations Nix 2.8 deletes for `spec`, in the order it deletes
    them.  Raises where Nix raises (before deleting anything, as Nix does)
    and where Nix would fail half-way (then before anything, unlike Nix)."""
    gens, cur = profile.generations, profile.current
    if spec.kind == "old":
        return [g for g in gens if g.number != cur]
    if spec.kind == "numbers":
        # Numbers without a generation are ignored, as in Nix.
        if cur is not None and cur in spec.numbers:
            raise ProfileError(f"cannot delete current version of profile "
                               f"{os.fsdecode(profile.path)}")
        return [g for g in gens if g.number in spec.numbers]
    if spec.kind == "keep":
        # deleteGenerationsGreaterThan: from the current generation
        # downwards keep `keep` (the current one included); newer ones are
        # kept; without a current generation nothing is deleted.  A current
        # generation only we know (by path, see the module doc) is none to
        # Nix: counting down from it would delete what Nix keeps.
        if profile.current_by_path:
            return []
        out, seen_current, keep = [], False, spec.keep
        for g in reversed(gens):
            if g.number == cur:
                seen_current = True
                keep -= 1
                continue
            if seen_current:
                if keep:
                    keep -= 1
                    continue
                out.append(g)
        return out
    if spec.kind == "days":
        return _older_than(profile, int(now) - spec.days * DAY)
    raise AssertionError(spec.kind)


def _older_than(profile: Profile, cutoff: int) -> list[Generation]:
    """deleteGenerationsOlderThan: newest first, keep everything up to and
    including the first generation older than the cutoff (it was the active
    one at that time), delete the older ones but the current one."""
    out, can_delete = [], False
    for g in reversed(profile.generations):
        if can_delete:
            if g.mtime >= cutoff:
                # Nix asserts here (and aborts after a partial deletion).
                raise ProfileError(
                    f"generation {g.number} of {os.fsdecode(profile.path)} is newer than the cutoff "
                    f"but numbered below an older one (its link's mtime was changed?); Nix 2.8 "
                    "aborts on this after deleting some generations; refusing to guess, nothing "
                    "was deleted")
            if g.number != profile.current:
                out.append(g)
        elif g.mtime < cutoff:
            can_delete = True
    return out


def check_deletable(profile: Profile, doomed: list[Generation]) -> list[Generation]:
    """What Nix unlinks for `doomed`: `<profile>-<N>-link` for every
    selected N, whatever entry made it select N (an alias like `p-03-link`
    selects its number too).  When that entry is missing, or selected twice
    (gone by the second unlink), Nix fails half-way; when it is not a
    symlink Nix deletes a file or directory.  Refuse both up front."""
    named = {g.number: g for g in profile.generations if g.canonical}
    out: list[Generation] = []
    for g in doomed:
        target = named.get(g.number)
        if target is None or target in out:
            why = (f"{os.fsdecode(profile.generation_path(g))} parses as generation {g.number}"
                   if target is None else f"generation {g.number} is selected twice")
            raise ProfileError(
                f"{why} and {os.fsdecode(generation_link_name(profile.name, g.number))} "
                f"{'is not there' if target is None else 'can go only once'}; Nix 2.8 would "
                "fail half-way here; nothing was deleted")
        if not target.is_link:
            raise ProfileError(
                f"{os.fsdecode(profile.generation_path(target))} is not a symlink; only "
                "generation links are ever deleted; nothing was deleted")
        out.append(target)
    return out


@dataclass
class DeleteResult:
    profile: Profile
    deleted: list[int]
    dry_run: bool


def delete_generations(path: bytes, spec: Spec, *, dry_run: bool = False,
                       lock_timeout: float | None = 30.0, now: float | None = None,
                       on_wait: Callable[[str], None] | None = None,
                       on_delete: Callable[[int, bool], None] | None = None) -> DeleteResult:
    """`nix-env -p PATH --delete-generations SPEC`, under the profile's lock.
    A dry run takes no lock and writes nothing (not even the lock file)."""
    with ProfileDir(path) as d:
        lock = None if dry_run else d.lock(lock_timeout, on_wait)
        try:
            profile = d.read()
            doomed = select_for_deletion(profile, spec, time.time() if now is None else now)
            doomed = check_deletable(profile, doomed)
            if not dry_run:
                d.check_may_unlink(doomed)
            if dry_run:
                for g in doomed:
                    if on_delete is not None:
                        on_delete(g.number, True)
                return DeleteResult(profile, [g.number for g in doomed], True)
            return DeleteResult(profile, d.unlink_all(profile, doomed, on_delete), False)
        finally:
            if lock is not None:
                lock.release()


# -- finding profiles ----------------------------------------------------------

_GEN_NAME = re.compile(rb"(.+)-([0-9]+)-link", re.S)


@dataclass
class Found:
    profiles: list[bytes] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # profile -> (st_dev, st_ino) of the directory the walk listed it in
    identity: dict[bytes, tuple[int, int]] = field(default_factory=dict)


def _profiles_in_dir(dirpath: bytes, names: list[bytes], links: dict[bytes, bytes]) -> set[bytes]:
    """Names in one directory that are profiles: a symlink to a sibling
    generation of its own name, or the name of orphaned generation links."""
    out = set()
    for name, target in links.items():
        if parse_generation_name(name, base_name(abs_path(target, dirpath))) is not None:
            out.add(name)
    for name in names:
        m = _GEN_NAME.fullmatch(name)
        if m:
            out.add(m.group(1))  # also when the profile link itself is gone
    # A generation link is never itself a profile.
    return {p for p in out if not any(parse_generation_name(q, p) is not None for q in out)}


def walk_profiles(top: bytes, found: Found, *, trusted: bytes | None = None) -> None:
    """Profiles under `top`, recursively; symlinked directories are not
    entered (as Nix's GC does not).  Each subdirectory is opened relative
    to its parent's fd with O_NOFOLLOW and listed by that fd, and every
    profile found carries the identity of the directory actually listed:
    whoever owns a subdirectory may swap it for a symlink at any moment,
    and whoever acts on the profile later checks it is still that one.
    `trusted`: a directory above `top` that is opened as the path says;
    from it down to `top` no symlink is followed either (a home: its
    owner may make `.local` a link to anywhere)."""
    try:
        top_fd = opendir.open_dir(top, nofollow.READ_FLAGS, trusted=trusted or top)
    except (FileNotFoundError, nofollow.SymlinkInPath):
        return
    except OSError as e:
        if e.errno != errno.ENOTDIR:
            found.warnings.append(f"cannot read {os.fsdecode(top)}: {e.strerror}")
        return

    def list_dir(fd: int, path: bytes, subdirs: list[bytes]) -> Iterator[None]:
        subdirs += _walk_one(path, fd, found)
        return iter(())

    def cannot_enter(path: bytes, e: OSError) -> Iterator[None]:
        # A symlink now (swapped since the listing) is not entered.
        if not isinstance(e, (nofollow.SymlinkInPath, FileNotFoundError)):
            found.warnings.append(f"cannot read {os.fsdecode(path)}: {e.strerror}")
        return iter(())
    for _ in nofollow.walk(top_fd, top, list_dir, cannot_enter):
        pass


def _walk_one(path: bytes, fd: int, found: Found) -> list[bytes]:
    """List one directory by its fd: record its profiles, return the names
    of its real subdirectories."""
    try:
        # By fd, scandir gives str names: back to the exact bytes.
        entries = list(os.scandir(fd))
    except OSError as e:
        found.warnings.append(f"cannot read {os.fsdecode(path)}: {e.strerror}")
        return []
    ident = opendir.identity(fd)
    names, links, subdirs = [], {}, []
    for e in entries:
        name = os.fsencode(e.name)
        names.append(name)
        try:
            if e.is_symlink():
                links[name] = os.readlink(name, dir_fd=fd)
            elif e.is_dir(follow_symlinks=False):
                subdirs.append(name)
        except OSError as err:
            found.warnings.append(f"cannot read {os.fsdecode(os.path.join(path, name))}: "
                                  f"{err.strerror}")
    for p in sorted(_profiles_in_dir(path, names, links)):
        full = os.path.join(path, p)
        found.profiles.append(full)
        found.identity[full] = ident
    return sorted(subdirs)


def home_dir() -> bytes:
    home = os.environ.get("HOME")
    if home:
        return os.fsencode(home)
    return os.fsencode(pwd.getpwuid(os.geteuid()).pw_dir)


def discover(profiles_dir: bytes, *, home: bytes | None) -> Found:
    """Every profile the caller can see: `<state>/profiles/**` (with
    `per-user/<user>`), then, given a home, `~/.local/state/nix/profiles`
    (Nix >= 2.14; $XDG_STATE_HOME honoured) and what `~/.nix-profile` links
    to.  Duplicates (the same directory entry by two paths) are dropped."""
    found = Found()
    walk_profiles(profiles_dir, found)
    if home is not None:
        state = os.environ.get("XDG_STATE_HOME")
        xdg = os.fsencode(state) if state else os.path.join(home, b".local/state")
        walk_profiles(os.path.join(xdg, b"nix/profiles"), found)
        link = os.path.join(home, b".nix-profile")
        try:
            target = abs_path(os.readlink(link), home)
        except OSError:
            target = None
        # Nix makes ~/.nix-profile point at a profile before there is one
        # (root's at profiles/default): no profile, nothing to list.
        if target is not None and os.path.lexists(target):
            found.profiles.append(target)
    found.profiles = dedupe(found.profiles, found.identity)
    return found


def discover_everyone(profiles_dir: bytes) -> Found:
    """As root: every user's profiles -- those under the state dir, then
    each home's ~/.local/state/nix/profiles.  A home is its user's, who may
    make anything below it a symlink: nothing below the home directory is
    followed (a profile found there is acted on only while its directory
    is the one listed), nor ~/.nix-profile (it leads to a profile found
    anyway, or somewhere its owner chose)."""
    found = Found()
    walk_profiles(profiles_dir, found)
    homes = sorted({os.fsencode(pw.pw_dir) for pw in pwd.getpwall()
                    if pw.pw_dir.startswith("/") and pw.pw_dir.rstrip("/")})
    for home in homes:
        walk_profiles(os.path.join(home, b".local/state/nix/profiles"), found, trusted=home)
    found.profiles = dedupe(found.profiles, found.identity)
    return found


def dedupe(paths: list[bytes], identity: dict[bytes, tuple[int, int]] | None = None) -> list[bytes]:
    seen, out = set(), []
    for p in paths:
        try:
            ident = (identity or {}).get(p)
            if ident is None:
                st = os.stat(dir_of(p))
                ident = (st.st_dev, st.st_ino)
            key: object = (*ident, base_name(p))
        except OSError:
            key = p
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def may_modify(path: bytes) -> bool:
    """Whether the caller could lock and prune this profile (write and
    search access to its directory)."""
    return os.access(dir_of(path), os.W_OK | os.X_OK, effective_ids=True)


# -- the Nix DB: closure sizes ---------------------------------------------------

_CLOSURE = """
WITH RECURSIVE c(id) AS (
    SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
    UNION
    SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id)
"""


def _json_paths(paths: Iterable[bytes]) -> str:
    import json
    return json.dumps([os.fsdecode(p) for p in paths])


def closure_size(conn, store_path: bytes) -> tuple[int, int] | None:
    """(paths, sum of narSize) of a valid path's closure; None if invalid."""
    row = conn.execute(_CLOSURE + "SELECT count(*), coalesce(sum(v.narSize), 0) FROM c "
                       "JOIN ValidPaths v ON v.id = c.id", (_json_paths([store_path]),)).fetchone()
    return None if not row or not row[0] else (int(row[0]), int(row[1]))


def closure(conn, store_paths: Iterable[bytes]) -> set[bytes]:
    rows = conn.execute(_CLOSURE + "SELECT v.path FROM c JOIN ValidPaths v ON v.id = c.id",
                        (_json_paths(store_paths),))
    return {r[0] for r in rows}


# -- retention (profiles prune) ------------------------------------------------

@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None        # the N highest-numbered generations
    keep_since: float | None = None     # seconds: generations newer than now - this

    def describe(self) -> str:
        parts = []
        if self.keep_last is not None:
            parts.append(f"the last {self.keep_last}")
        if self.keep_since is not None:
            parts.append(f"those newer than {cliargs.format_duration(self.keep_since)}")
        return " and ".join(parts)


@dataclass
class Protected:
    """Store paths that are never to lose a generation: what the system
    links point at and the runtime roots.  Values are labels for the plan."""
    system: dict[bytes, list[bytes]] = field(default_factory=dict)
    runtime: dict[bytes, list[bytes]] = field(default_factory=dict)
    runtime_checked: bool = True


@dataclass(frozen=True)
class Verdict:
    generation: Generation
    delete: bool
    reasons: tuple[str, ...]
    store_path: bytes | None


def plan_prune(profile: Profile, policy: Policy, protected: Protected, now: float,
               store_dir: bytes) -> list[Verdict]:
    """Keep the union of the policy's sets and, always, the current
    generation, the system's and the running ones.  Everything we cannot
    prove safe is kept (no current generation, odd entries, non-store
    targets)."""
    if profile.current is None or profile.current not in {g.number for g in profile.generations}:
        # A profile without a (present) current generation is broken or
        # not a profile as Nix makes them: which one matters is anyone's
        # guess, so nothing goes.
        why = ("profile has no current generation: keeping all" if profile.current is None else
               f"current generation {profile.current} is missing: keeping all")
        return [Verdict(g, False, (why,), g.store_path(store_dir)) for g in profile.generations]
    last = set(profile.numbers()[-policy.keep_last:]) if policy.keep_last else set()
    cutoff = None if policy.keep_since is None else now - policy.keep_since
    numbers = [g.number for g in profile.generations]
    out = []
    for g in profile.generations:
        sp = g.store_path(store_dir)
        keep: list[str] = []
        if g.number == profile.current:
            keep.append("current")
        if g.number in last:
            keep.append(f"last {policy.keep_last}")
        if cutoff is not None and g.mtime >= cutoff:
            keep.append(f"newer than {cliargs.format_duration(policy.keep_since)}")
        if sp is not None and sp in protected.system:
            keep.append(" & ".join(os.fsdecode(x) for x in protected.system[sp]))
        if sp is not None and sp in protected.runtime:
            keep.append("running (runtime root)")
        if not g.is_link or not g.canonical or numbers.count(g.number) > 1:
            keep.append("not a plain generation link")
        elif sp is None:
            keep.append("does not point into the store")
        if keep:
            out.append(Verdict(g, False, tuple(keep), sp))
            continue
        why = []
        if policy.keep_last is not None:
            why.append(f"not in last {policy.keep_last}")
        if cutoff is not None:
            why.append(f"older than {cliargs.format_duration(policy.keep_since)}")
        out.append(Verdict(g, True, tuple(why) or ("no rule keeps it",), sp))
    return out


def apply_prune(path: bytes, approved: list[Verdict], policy: Policy, protected: Protected,
                now: float, store_dir: bytes, *, identity: tuple[int, int] | None,
                lock_timeout: float | None,
                on_wait: Callable[[str], None] | None = None) -> list[int]:
    """Delete what was approved, under the lock, after planning again on
    what is there now: only generations both plans delete go (the profile
    may have changed since the plan was shown).  `identity` is the
    profile directory's the plan read: another directory now at that path
    is refused, whatever its generations."""
    approved_keys = {(v.generation.name, v.generation.ino) for v in approved if v.delete}
    if not approved_keys:
        return []
    with ProfileDir(path, identity) as d:
        with d.lock(lock_timeout, on_wait):
            profile = d.read()
            fresh = plan_prune(profile, policy, protected, now, store_dir)
            doomed = [v.generation for v in fresh
                      if v.delete and (v.generation.name, v.generation.ino) in approved_keys]
            doomed = check_deletable(profile, doomed)
            d.check_may_unlink(doomed)
            return d.unlink_all(profile, doomed)


# -- the system links -----------------------------------------------------------

DEFAULT_SYSTEM_LINKS = (b"/run/current-system", b"/run/booted-system")


def system_links_from_env() -> tuple[bytes, ...]:
    """$GCROOTS_SYSTEM_LINKS (colon-separated) overrides the NixOS links
    (tests, other distributions' equivalents)."""
    value = os.environ.get("GCROOTS_SYSTEM_LINKS")
    if value is None:
        return DEFAULT_SYSTEM_LINKS
    return tuple(os.fsencode(p) for p in value.split(":") if p)


def resolve_system_link(link: bytes, store_dir: bytes) -> bytes | None:
    """The store path a system link leads to, following a chain of links up
    to the store (not into it: in a chroot store the store path's physical
    location differs).  None if the link does not exist; a link that exists
    but cannot be resolved is an error, since we then cannot tell which
    generation must stay."""
    p = link
    for _ in range(40):
        try:
            target = os.readlink(p)
        except FileNotFoundError:
            if p == link:
                return None
            raise ProfileError(f"{os.fsdecode(link)} leads to {os.fsdecode(p)}, which does not "
                               "exist: cannot tell which generation it is; refusing to prune")
        except OSError as e:
            if p != link or e.errno != errno.EINVAL:
                raise ProfileError(f"cannot resolve {os.fsdecode(link)} ({os.fsdecode(p)}: "
                                   f"{e.strerror}): refusing to prune") from None
            sp = to_store_path(p, store_dir)
            if sp is not None:
                return sp
            raise ProfileError(f"{os.fsdecode(link)} is not a symlink into the store: cannot tell "
                               "which generation it is; refusing to prune") from None
        resolved = abs_path(target, dir_of(p))
        sp = to_store_path(resolved, store_dir)
        if sp is not None:
            return sp
        p = resolved
    raise ProfileError(f"too many levels of symbolic links resolving {os.fsdecode(link)}")


def system_paths(links: Iterable[bytes], store_dir: bytes) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for link in links:
        sp = resolve_system_link(link, store_dir)
        if sp is not None:
            out.setdefault(sp, []).append(link)
    return out


def runtime_paths(rows: Iterable[tuple[bytes, ...]]) -> dict[bytes, list[bytes]]:
    """From gcrootsd's `roots` rows (label, store path, kind): the runtime
    and temp roots (labels are `{censored}` for unprivileged callers)."""
    out: dict[bytes, list[bytes]] = {}
    for label, path, kind in rows:
        if kind in (b"runtime", b"temp"):
            out.setdefault(path, []).append(label)
    return out


def generations_of(paths: Iterable[bytes], identity: dict[bytes, tuple[int, int]] | None = None
                   ) -> Iterator[tuple[bytes, Profile | None, str | None]]:
    """Read each profile (no lock: listing is read-only); `identity` as
    discover() found the directories."""
    for p in paths:
        try:
            with ProfileDir(p, (identity or {}).get(p)) as d:
                yield p, d.read(), None
        except ProfileError as e:
            yield p, None, str(e)
