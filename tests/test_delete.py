"""gcroots-query delete PATH...: exactly `nix-store --delete` on an
identical copy -- what goes, the exit code, every table of the DB after --
except that a request with any path that may not go deletes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from . import support
from .support import Pipeline, oracle


def db_rows(root: Path) -> dict[str, list]:
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}
    finally:
        db.close()


def entries(root: Path) -> set[str]:
    return set(os.listdir(root / "nix/store")) - {".links"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated store, its dead and live sets, and picks of paths."""
    top = tmp_path_factory.mktemp("delete")
    os.chmod(top, 0o755)
    base = top / "base"
    support.make_store(base, paths=1000, seed=93, quirks=1, roots=30, indirect=5, stale=1)
    (base / "nix/store/junkfile").write_text("junk")
    dead = set(support.standalone(base, "dead").stdout.split())
    live = set(support.standalone(base, "live").stdout.split())
    db = sqlite3.connect(f"file:{base}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    db.text_factory = bytes
    valid = {p for (p,) in db.execute("SELECT path FROM ValidPaths")}
    referrers: dict[bytes, set[bytes]] = {}
    for a, b in db.execute("SELECT x.path, y.path FROM Refs r JOIN ValidPaths x ON x.id = "
                           "r.referrer JOIN ValidPaths y ON y.id = r.reference WHERE x.id != y.id"):
        referrers.setdefault(b, set()).add(a)
    # keep-derivations (on by default): Nix's referrer search goes from a
    # .drv on to each valid output it lists that names it as deriver.
    built: dict[bytes, set[bytes]] = {}
    for drv, out in db.execute("SELECT d.path, o.path FROM DerivationOutputs x JOIN ValidPaths d "
                               "ON d.id = x.drv JOIN ValidPaths o ON o.path = x.path "
                               "AND o.deriver = d.path"):
        built.setdefault(drv, set()).add(out)
    db.close()
    outputs = sorted(p for p in dead & valid if not p.endswith(b".drv"))
    lonely = [p for p in outputs if p not in referrers]
    needed = [p for p in outputs if referrers.get(p, set()) and referrers[p] <= dead]
    unregistered = sorted(p for p in dead - valid if not p.endswith(b"junkfile"))
    return dict(top=top, base=base, dead=dead, live=live, lonely=lonely, needed=needed,
                unregistered=unregistered, referrers=referrers, built=built)


def referrer_closure(world, p: bytes) -> set[bytes]:
    """What Nix's referrer search visits from p: everything that refers to
    it, and a .drv's outputs that name it as deriver, transitively.
    `nix-store --delete` refuses p unless all of it is asked for too."""
    out, todo = {p}, [p]
    while todo:
        n = todo.pop()
        for r in world["referrers"].get(n, set()) | world["built"].get(n, set()):
            if r not in out:
                out.add(r)
                todo.append(r)
    return out


def both(world, name: str, paths: list[bytes], *extra: str):
    """gcroots-query --standalone delete and nix-store --delete, each on a
    fresh copy; (ours, nix, our copy, Nix's copy)."""
    ours, twin = world["top"] / f"{name}-ours", world["top"] / f"{name}-nix"
    for c in (ours, twin):
        subprocess.run(["rm", "-rf", str(c)], check=True)
        subprocess.run(["cp", "-a", str(world["base"]), str(c)], check=True)
    args = [os.fsdecode(p) for p in paths]
    mine = support.standalone(ours, "delete", *extra, *args, check=False)
    nix = oracle(twin, "nix-store", "--delete", *args, check=False)
    return mine, nix, ours, twin


def case_paths(world, case: str) -> list[bytes]:
    lonely, needed = world["lonely"], world["needed"]
    return {
        "lonely": lonely[:3],                       # garbage nothing refers to: goes
        "live": sorted(world["live"])[:1],          # alive: refused
        "needed": needed[:1],                       # garbage, but garbage refers to it: refused
        "with-referrers": sorted(referrer_closure(world, needed[0])),  # all of it: goes
        "unregistered": world["unregistered"][:1],  # on disk, not valid: goes
        "absent": [b"/nix/store/" + b"0" * 32 + b"-never-existed"],  # goes (nothing to do)
    }[case]


@pytest.mark.parametrize("case,code", [("lonely", 0), ("live", 1), ("needed", 1),
                                       ("with-referrers", 0), ("unregistered", 0), ("absent", 0)])
def test_delete_equals_nix_store_delete(world, case, code):
    paths = case_paths(world, case)
    assert paths
    mine, nix, ours, twin = both(world, case, paths)
    assert mine.returncode == nix.returncode == code, (mine.stderr, nix.stderr)
    assert entries(ours) == entries(twin)
    assert db_rows(ours) == db_rows(twin)
    if mine.returncode == 0:
        # Nix's sentence, with the number Nix prints there.
        assert mine.stdout.split(b"\n")[0] == nix.stdout.strip(), (mine.stdout, nix.stdout)
        assert not set(os.fsdecode(p).split("/")[-1] for p in paths) & entries(ours)
    else:
        assert b"nothing was deleted" in mine.stderr
        assert entries(ours) == entries(world["base"])
    support.verify_clean(ours)


def test_refusal_names_the_root_and_the_referrer(world):
    live = sorted(p for p in world["live"] if not p.endswith(b".drv"))[0]
    needed = world["needed"][0]
    out = support.standalone(world["base"], "delete", "--dry-run", os.fsdecode(live),
                             os.fsdecode(needed), check=False)
    assert out.returncode == 1
    text = out.stderr.decode()
    why = support.standalone(world["base"], "why", os.fsdecode(live)).stdout.decode().split("\n")[0]
    root_label = why.split(" -> ")[0]
    assert f"{os.fsdecode(live)} is alive: {root_label} -> " in text
    assert f"{os.fsdecode(needed)} is still needed by /nix/store/" in text


def test_a_refused_path_keeps_the_others_too(world):
    """nix-store --delete deletes the arguments that sort before the first
    one it refuses, then fails; we refuse the whole request first."""
    paths = world["lonely"][:2] + world["needed"][:1]
    mine, nix, ours, twin = both(world, "mixed", paths)
    assert mine.returncode == nix.returncode == 1
    assert entries(ours) == entries(world["base"]) and db_rows(ours) == db_rows(world["base"])


def test_delete_follows_links_as_nix_does(world, tmp_path):
    """A link to a store path, and a path inside one, name that path."""
    p = world["lonely"][0]
    link = tmp_path / "link"
    os.symlink(os.fsdecode(p) + "/sub/dir", link)  # dangling on the host: never opened
    out = support.standalone(world["base"], "delete", "--dry-run", "--json", str(link))
    assert json.loads(out.stdout)["paths_list"] == [os.fsdecode(p)]
    bad = support.standalone(world["base"], "delete", "--dry-run", str(tmp_path), check=False)
    assert bad.returncode == 1 and b"is not in the Nix store" in bad.stderr


def test_delete_through_the_daemon(world, users, pipelines, scratch):
    root = scratch / "store"
    subprocess.run(["cp", "-a", str(world["base"]), str(root)], check=True)
    twin = scratch / "twin"
    subprocess.run(["cp", "-a", str(world["base"]), str(twin)], check=True)
    p = Pipeline(root, scratch / "run", daemon_args=("--admin-group", support.ADMIN_GROUP))
    pipelines.append(p)
    p.start()
    paths = [os.fsdecode(x) for x in world["lonely"][:2]]
    assert p.query("delete", *paths, user=support.BOB).returncode == 3  # not admin
    plan = p.query("delete", "--dry-run", "--json", *paths, user=support.CAROL)
    assert plan.returncode == 0, plan.stderr
    assert sorted(json.loads(plan.stdout)["paths_list"]) == sorted(paths)
    assert entries(root) == entries(world["base"])
    refused = p.query("delete", *paths, os.fsdecode(sorted(world["live"])[0]))
    assert refused.returncode == 1 and b"is alive" in refused.stderr
    done = p.query("delete", "--print-deleted", *paths)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(x.encode() for x in paths)
    assert oracle(twin, "nix-store", "--delete", *paths).returncode == 0
    p.stop()
    assert entries(root) == entries(twin) and db_rows(root) == db_rows(twin)


def test_the_deleter_never_follows_a_symlink_above_the_store_dir(scratch):
    """A store dir below a directory its owner can write: the owner swaps
    that directory for a symlink to a copy root owns.  Root's deleter
    must fail there (Nix refuses a symlink in the store dir's path too),
    never delete in the copy; nor may its check before deleting look there."""
    from gcroots.daemon import deleter
    victim = scratch / "victim/store"
    (victim / "aaaa-x/sub").mkdir(parents=True)
    (victim / "aaaa-x/sub/file").write_text("root's\n")
    user = scratch / "user"
    user.mkdir()
    (user / "st").symlink_to(scratch / "victim")   # the swap, as it stands
    path = os.fsencode(user / "st/store/aaaa-x")
    with pytest.raises(OSError, match="symbolic link|symlink"):
        deleter.delete_trees([path], deleter.Freed())
    with pytest.raises(OSError, match="symbolic link|symlink"):
        list(deleter.walk_trees(os.path.dirname(path), [b"aaaa-x"]))
    assert (victim / "aaaa-x/sub/file").read_text() == "root's\n"
