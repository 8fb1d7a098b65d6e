"""gcroots-query clean: one command, one plan -- profiles pruned, old result
links aged out, garbage collected -- against Nix 2.8 on identical copies
(`nix-collect-garbage -d` where the two overlap), as root (every user's)
and as a user (their own)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from gcroots.client import profiles as prof

from . import support
from .support import QUERY, Pipeline, oracle, tree_snapshot, valid_set

ENV = {"GCROOTS_SYSTEM_LINKS": ""}   # no /run/current-system on this host


def disk_set(root: Path) -> set[str]:
    return set(os.listdir(root / "nix/store")) - {".links"}


def profile_links(root: Path) -> dict[str, str]:
    top = root / "nix/var/nix/profiles"
    return {str(p.relative_to(top)): os.readlink(p) for p in top.rglob("*") if p.is_symlink()}


def result_links(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for p in home.rglob("*")
            if p.is_symlink() and p.name.startswith("result")}


def clean(p: Pipeline, root: Path, *args: str, user: str | None = None):
    cmd = [QUERY, "--socket", str(p.sock), "--root", str(root), "clean", *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **ENV))


def test_clean_as_root_equals_nix_collect_garbage(scratch, users, pipelines):
    """`clean --keep 1 --roots-older-than 30d --yes` against, on an identical
    copy, `nix-collect-garbage -d` after the same links went: the same
    generations deleted in every profile, the same paths collected, Nix's
    sentence with Nix's number, and a plan whose forecast was exact."""
    base = scratch / "base"
    support.make_store(base, paths=900, seed=111, roots=10, indirect=8, stale=2, quirks=0,
                       profiles=3, generations=5, users=2)
    home = base / "home"
    ours, twin = scratch / "ours", scratch / "twin"
    for c in (ours, twin):
        subprocess.run(["cp", "-a", str(base), str(c)], check=True)
    # Every generation link is years old (storegen's epoch): --keep 1 keeps
    # the newest, which is each profile's current one -- Nix's `old`.
    for top in (ours, twin):
        for prof_link in (top / "nix/var/nix/profiles").rglob("*"):
            if prof_link.is_symlink() and not re.search(r"-\d+-link$", prof_link.name):
                n = re.search(r"-(\d+)-link$", os.readlink(prof_link))
                gens = [int(m[1]) for x in prof_link.parent.iterdir()
                        if (m := re.fullmatch(re.escape(prof_link.name) + r"-(\d+)-link", x.name))]
                assert n and int(n[1]) == max(gens), prof_link
    old = time.time() - 60 * 86400
    for link in home.rglob("result*"):
        os.utime(link, (old, old), follow_symlinks=False)
    young = sorted(home.rglob("result*"))[0]  # one link stays: made just now
    os.utime(young, follow_symlinks=False)
    links_before = result_links(home)
    p = Pipeline(ours, scratch / "run")
    pipelines.append(p)
    p.start()

    before = tree_snapshot(ours / "nix/var/nix/profiles"), valid_set(ours), result_links(home)
    dry = clean(p, ours, "--keep", "1", "--roots-older-than", "30d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (tree_snapshot(ours / "nix/var/nix/profiles"), valid_set(ours),
            result_links(home)) == before
    by_profile = {Path(x["profile"]).name: x for x in plan["profiles"]}
    assert {"default", "channels", "profile"} <= set(by_profile)
    for x in plan["profiles"]:
        gens = x["generations"]
        assert [g["action"] for g in gens] == ["delete"] * (len(gens) - 1) + ["keep"], x
        assert gens[-1]["reasons"][:2] == ["current", "last 1"]
    links = {Path(x["link"]).relative_to(home).as_posix(): x for x in plan["links"]}
    assert set(links) == links_before  # root: everyone's links, alice's and bob's
    assert links[young.relative_to(home).as_posix()]["action"] == "keep"
    doomed_links = {k for k, x in links.items() if x["action"] == "delete"}
    needed = {k for k, x in links.items() if "in a current profile generation" in x["reasons"]}
    assert len(doomed_links) >= 4
    assert doomed_links == links_before - {young.relative_to(home).as_posix()} - needed
    text = clean(p, ours, "--keep", "1", "--roots-older-than", "30d", "--dry-run").stdout.decode()
    assert re.search(r"^\S*/nix/var/nix/profiles/default\s+4 of 5 generations\s+\S+ \S*B$",
                     text, re.M), text
    assert re.search(r"^total: \d+ store paths\s+\S+ \S*B$", text, re.M), text

    done = clean(p, ours, "--keep", "1", "--roots-older-than", "30d", "--yes")
    assert done.returncode == 0, done.stderr
    first = done.stdout.decode().split("\n")
    assert re.fullmatch(r"deleted \d+ generations in 3 profiles; removed "
                        f"{len(doomed_links)} links", first[0]), first
    assert result_links(home) == links_before - doomed_links
    p.stop()

    nix = oracle(twin, "nix-collect-garbage", "-d").stdout.decode().strip().split("\n")[-1]
    assert first[1] == nix, (first, nix)   # "N store paths deleted, X MiB freed", Nix's number
    assert profile_links(ours) == profile_links(twin)
    assert valid_set(ours) == valid_set(twin) and disk_set(ours) == disk_set(twin)
    # The plan's forecast: exactly the valid paths that went.
    assert plan["total"]["paths"] == len(valid_set(base) - valid_set(ours))
    support.chown_tree(ours / "nix", "root")
    support.verify_clean(ours)


def test_clean_as_a_user_touches_only_their_own(scratch, users, pipelines):
    """alice's clean: her profile and her links, not bob's nor root's; the
    collection is root's and the admin group's: said, exit 0."""
    root = scratch / "store"
    support.make_store(root, paths=500, seed=112, roots=5, indirect=6, stale=0, quirks=0,
                       profiles=3, generations=4, users=2)
    home = root / "home"
    old = time.time() - 10 * 86400
    for link in home.rglob("result*"):
        os.utime(link, (old, old), follow_symlinks=False)
    for name, user in (("alice", support.ALICE), ("bob", support.BOB)):
        support.chown_tree(home / name, user, 0o755)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    per_user = root / "nix/var/nix/profiles/per-user"
    support.chown_tree(per_user / "alice", support.ALICE)
    others = tree_snapshot(root / "nix/var/nix/profiles/per-user/root"), \
        os.readlink(root / "nix/var/nix/profiles/default"), tree_snapshot(home / "bob")
    alice_links = result_links(home / "alice")
    assert alice_links and result_links(home / "bob")
    valid = valid_set(root)
    out = clean(p, root, "--keep", "1", "--roots-older-than", "1d", "--yes", "--json",
                user=support.ALICE)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [Path(x["profile"]).name for x in doc["profiles"]] == ["profile"]
    assert doc["gc"]["exit"] == 3 and "admin group" in doc["gc"]["error"]
    assert not doc["everyone"] and all(x["uid"] == users[support.ALICE].pw_uid
                                       for x in doc["links"])
    assert sorted(os.listdir(per_user / "alice")) == ["profile", "profile-4-link"]
    kept = {Path(x["link"]).relative_to(home / "alice").as_posix() for x in doc["links"]
            if x["action"] == "keep"}
    assert all(x["reasons"] == ["in a current profile generation"] for x in doc["links"]
               if x["action"] == "keep")
    assert result_links(home / "alice") == kept and len(kept) < len(alice_links)
    assert (tree_snapshot(root / "nix/var/nix/profiles/per-user/root"),
            os.readlink(root / "nix/var/nix/profiles/default"), tree_snapshot(home / "bob")) == others
    assert valid_set(root) == valid  # nothing collected
    text = clean(p, root, "--keep", "1", "--dry-run", user=support.ALICE)
    assert text.returncode == 0 and b"per-user/root" not in text.stdout, text.stdout


def test_discovery_never_follows_a_symlink_below_a_home(scratch, users):
    """Root's clean walks every home's ~/.local/state/nix/profiles without
    following a symlink below the home: alice's `.local` pointing at root's
    profiles would otherwise let her steer root's pruning."""
    alice = users[support.ALICE]
    home = Path(alice.pw_dir)
    victim = scratch / "roots-own"
    (victim / "nix/profiles").mkdir(parents=True)
    os.symlink("/nix/store/" + "a" * 32 + "-x", victim / "nix/profiles/p-1-link")
    os.symlink("p-1-link", victim / "nix/profiles/p")
    try:
        os.symlink(victim, home / ".local")
        found = prof.discover_everyone(os.fsencode(scratch / "no-state-dir"))
        assert not [p for p in found.profiles if b"roots-own" in p or home.name.encode() in p]
        os.unlink(home / ".local")
        (home / ".local/state/nix/profiles").mkdir(parents=True)
        os.symlink(victim / "nix/profiles/p-1-link", home / ".local/state/nix/profiles/q-1-link")
        os.symlink("q-1-link", home / ".local/state/nix/profiles/q")
        found = prof.discover_everyone(os.fsencode(scratch / "no-state-dir"))
        assert os.fsencode(home / ".local/state/nix/profiles/q") in found.profiles
        # The state dir's profiles ... and `nix` swapped for a link: not entered.
        subprocess.run(["rm", "-rf", str(home / ".local/state/nix")], check=True)
        os.symlink(victim / "nix", home / ".local/state/nix")
        found = prof.discover_everyone(os.fsencode(scratch / "no-state-dir"))
        assert not [p for p in found.profiles if home.name.encode() in p or b"roots-own" in p]
    finally:
        subprocess.run(["rm", "-rf", str(home / ".local")], check=True)
