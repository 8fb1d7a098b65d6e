"""gcroots/nofollow.py's walk: the one no-follow tree walk (the helper's
scan, the client's search for profiles)."""

from __future__ import annotations

import os

from gcroots import nofollow, opendir


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_walk_lists_in_order_enters_no_link_and_closes_every_fd(tmp_path):
    top = os.fsencode(tmp_path / "top")
    for d in (b"a/x", b"b", b"c/y/z"):
        os.makedirs(top + b"/" + d)
    os.makedirs(os.fsencode(tmp_path / "elsewhere/secret"))
    refused = []

    def list_dir(fd, path, subdirs):
        names = sorted(os.fsencode(e.name) for e in os.scandir(fd) if e.is_dir(follow_symlinks=False))
        subdirs += names
        if path == top:   # b becomes a link after the listing: it must not be entered
            os.rmdir(top + b"/b")
            os.symlink(os.fsencode(tmp_path / "elsewhere"), top + b"/b")
        yield path

    def cannot_enter(path, e):
        refused.append((path, type(e)))
        return iter(())

    before = _fds()
    seen = list(nofollow.walk(os.open(top, nofollow.READ_FLAGS), top, list_dir, cannot_enter))
    assert seen == [top, top + b"/a", top + b"/a/x", top + b"/c", top + b"/c/y", top + b"/c/y/z"]
    assert refused == [(top + b"/b", nofollow.SymlinkInPath)]
    assert _fds() == before


def test_walk_closes_its_fds_when_the_caller_stops(tmp_path):
    top = os.fsencode(tmp_path)
    os.makedirs(top + b"/a/b/c")
    before = _fds()

    def list_dir(fd, path, subdirs):
        subdirs += [os.fsencode(e.name) for e in os.scandir(fd)]
        yield path

    walk = nofollow.walk(os.open(top, nofollow.READ_FLAGS), top, list_dir, lambda p, e: iter(()))
    assert next(walk) == top and next(walk) == top + b"/a" and next(walk) == top + b"/a/b"
    walk.close()
    assert _fds() == before


def test_open_dir_below_a_trusted_directory(tmp_path):
    """From `trusted` down, no link is followed; `trusted` itself is opened
    as its path says (a home may be a link: its owner's own .local may not)."""
    home = tmp_path / "home"
    (tmp_path / "real-home/.local/state").mkdir(parents=True)
    home.symlink_to(tmp_path / "real-home")
    top = os.fsencode(home / ".local/state")
    os.close(opendir.open_dir(top, trusted=os.fsencode(home)))
    (tmp_path / "real-home/.local").rename(tmp_path / "real-home/elsewhere")
    (tmp_path / "real-home/.local").symlink_to(tmp_path / "real-home/elsewhere")
    try:
        opendir.open_dir(top, trusted=os.fsencode(home))
    except nofollow.SymlinkInPath as e:
        assert e.path == os.fsencode(home / ".local")
    else:
        raise AssertionError("followed .local")
    for bad, trusted in ((top, os.fsencode(tmp_path / "hom")), (b"rel/x", b"/")):
        try:
            opendir.open_dir(bad, trusted=trusted)
        except ValueError:
            continue
        raise AssertionError((bad, trusted))
