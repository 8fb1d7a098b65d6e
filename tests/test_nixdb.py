"""gcroots/nixdb.py: the Nix DB opened read-only wherever it lives."""

from __future__ import annotations

import os
import sqlite3

import pytest

from gcroots.nixdb import connect_ro


@pytest.mark.parametrize("name", [b"plain", b"a b?c#d%25e", "\u00e9t\u00e9".encode(), b"not-utf8-\xff\xfe"])
def test_opens_a_db_under_any_directory_name(scratch, name):
    """Paths are bytes: a directory name with URI syntax in it, or that is
    not UTF-8, names the DB there (it failed to encode before: quote() of
    the fsdecoded path)."""
    d = os.path.join(os.fsencode(scratch), name)
    os.mkdir(d)
    path = os.path.join(d, b"db.sqlite")
    with sqlite3.connect(path) as w:
        w.execute("CREATE TABLE ValidPaths (id integer primary key, path text)")
        w.execute("INSERT INTO ValidPaths (path) VALUES ('/nix/store/x')")
    w.close()
    for create_files in (False, True):
        conn = connect_ro(path, create_files=create_files)
        try:
            assert conn.execute("SELECT path FROM ValidPaths").fetchall() == [(b"/nix/store/x",)]
        finally:
            conn.close()
