"""Read-only access to the Nix SQLite DB (schema 10).  Standard library only.

Nix keeps the DB in WAL mode.  A read-only connection needs the `-shm` file;
SQLite creates it (and `-wal`) when the directory is writable for us, and
otherwise fails.  The store owner (gcrootsd) may let it do so.  Anyone else
must not: a root-owned `-shm` next to a DB owned by a `nix` user would lock
Nix out of its own database.  So `create_files=False` opens the DB
`immutable` when no `-wal` exists (no writer is active, nothing to
coordinate with) and `mode=ro` on the existing files otherwise.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable


class NixDBError(Exception):
    pass


# SQLite's primary result codes, as what they mean for the Nix DB.
_MEANING = {
    3: "permission denied",
    5: "another process holds it locked (a Nix command writing?) and did not let go",
    6: "it is locked",
    8: "it is read-only for us (the mode of the file, of its -wal/-shm files or of its "
       "directory, or a read-only mount)",
    10: "an I/O error",
    11: "the database file is damaged",
    13: "the disk is full",
    14: "it cannot be opened",
}
BUSY = 5


def describe_error(e: sqlite3.Error, db_path: bytes) -> str:
    """An SQLite error as what it is, naming the DB, for one line to a person."""
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", None) or type(e).__name__
    meaning = _MEANING.get(code & 0xFF if code is not None else -1)
    return (f"the Nix database {os.fsdecode(db_path)}: "
            + (f"{meaning} ({name}: {e})" if meaning else f"{name}: {e}"))


# What a file: URI's path may hold as it is (RFC 3986's unreserved and
# "/"); SQLite decodes %HH of any other byte (not only of UTF-8 text).
_URI_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


def ro_uri(db_path: bytes, *, create_files: bool = True) -> str:
    """The URI connect_ro opens (decided now: `immutable` or not)."""
    if not os.path.exists(db_path):
        raise NixDBError(f"no Nix database at {os.fsdecode(db_path)}")
    path = "".join(chr(b) if b in _URI_PLAIN else f"%{b:02X}" for b in db_path)
    uri = "file:" + path + "?mode=ro"
    if not create_files and not os.path.exists(db_path + b"-wal"):
        uri += "&immutable=1"
    return uri


def is_immutable(uri: str) -> bool:
    """Does ro_uri's `uri` open the DB `immutable` (no locks, no change seen)?"""
    return uri.endswith("&immutable=1")


def connect_ro(db_path: bytes, *, create_files: bool = True,
               timeout: float = 30.0, uri: str | None = None) -> sqlite3.Connection:
    """`uri`: ro_uri's, decided before (a second connection opens the DB
    as the first did)."""
    if uri is None:
        uri = ro_uri(db_path, create_files=create_files)
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False,
                               isolation_level=None)
        conn.text_factory = bytes
        conn.execute("PRAGMA query_only = ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise NixDBError(f"cannot open the Nix database {os.fsdecode(db_path)} read-only: {e}") from None
    return conn


def valid_subset(conn: sqlite3.Connection, paths: Iterable[bytes]) -> set[bytes]:
    """Which of `paths` are registered valid paths."""
    todo = list(set(paths))
    valid: set[bytes] = set()
    for i in range(0, len(todo), 500):
        batch = todo[i:i + 500]
        marks = ",".join("?" * len(batch))
        # Compare as text: Nix stores paths as TEXT; bytes would be BLOBs.
        rows = conn.execute(f"SELECT path FROM ValidPaths WHERE path IN ({marks})",
                            [os.fsdecode(p) for p in batch])
        valid.update(r[0] for r in rows)
    return valid
