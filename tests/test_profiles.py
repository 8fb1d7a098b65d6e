"""Profiles and generations, client-side: delete-generations equals Nix 2.8's
`nix-env --delete-generations` (hypothesis over layouts and specs, each
example run through the real nix-env), retention that never deletes the
current, booted or running generation, the caller's own rights, Nix's
profile lock, and `roots prune`."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcroots.client import profiles as prof

from . import storegen, support
from .support import QUERY, oracle, tree_snapshot

NOW = time.time()
FAKE_ENV = "/nix/store/{:0>32}-user-environment"


# -- fixtures and helpers ----------------------------------------------------------

@pytest.fixture(scope="module")
def nix_store():
    """A small chroot store for nix-env to open (the profiles under test
    live elsewhere; --delete-generations never looks at the store)."""
    d = support.scratch_dir()
    support.make_store(d / "store", paths=200, seed=71, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=2, users=1)
    yield d
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)


@dataclass(frozen=True)
class Layout:
    """A profile directory as Nix would leave it, give or take odd entries."""
    numbers: tuple[int, ...]
    ages_h: tuple[int, ...]              # age of each generation link, hours
    current: int | None                  # the profile link's generation (may not exist)
    aliases: tuple[tuple[str, int], ...] = ()   # (name, age_h): entries that parse as generations

    def make(self, d: Path, now: float = NOW) -> Path:
        d.mkdir(parents=True)
        for n, age in zip(self.numbers, self.ages_h):
            self._link(d / f"p-{n}-link", FAKE_ENV.format(n), now, age)
        for name, age in self.aliases:
            self._link(d / name, FAKE_ENV.format(zlib.crc32(name.encode())), now, age)
        if self.current is not None:
            os.symlink(f"p-{self.current}-link", d / "p")
        return d / "p"

    @staticmethod
    def _link(path: Path, target: str, now: float, age_h: int) -> None:
        os.symlink(target, path)
        # Half an hour off the full hour: never within reach of a day boundary.
        t = int(now) - age_h * 3600 - 1800
        os.utime(path, (t, t), follow_symlinks=False)


def listing(d: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in d.iterdir() if p.is_symlink()} | \
        {p.name: "<file>" for p in d.iterdir() if not p.is_symlink()}


def ours(profile: Path, spec: list[str]) -> tuple[bool, list[int], str]:
    order: list[int] = []
    try:
        prof.delete_generations(os.fsencode(profile), prof.parse_spec(spec), lock_timeout=5,
                                on_delete=lambda n, dry: order.append(n))
        return True, order, ""
    except prof.ProfileError as e:
        return False, order, str(e)


def nix_delete(store: Path, profile: Path, spec: list[str]) -> tuple[int, list[int], bytes]:
    r = oracle(store, "nix-env", "-p", str(profile), "--delete-generations", *spec, check=False)
    order = [int(x) for x in re.findall(rb"removing profile version (\d+)", r.stderr)]
    return r.returncode, order, r.stderr


def compare_with_nix(store: Path, base: Path, layout: Layout, spec: list[str]) -> None:
    theirs_dir, ours_dir = base / "nix", base / "ours"
    theirs_p, ours_p = layout.make(theirs_dir), layout.make(ours_dir)
    before = tree_snapshot(ours_dir)
    rc, nix_order, err = nix_delete(store, theirs_p, spec)
    ok, our_order, why = ours(ours_p, spec)
    if rc != 0:
        # Nix refused or failed (possibly half-way): we fail too, and before
        # anything was deleted.
        assert not ok, f"Nix failed ({err!r}) but we deleted {our_order}"
        assert tree_snapshot(ours_dir) == before, f"we failed ({why}) after changing things"
    else:
        assert ok, f"Nix succeeded ({err!r}), we failed: {why}"
        assert listing(ours_dir) == listing(theirs_dir)
        assert our_order == nix_order


# -- delete-generations against nix-env --------------------------------------------------

# Ages in hours; often right next to a day boundary (30 minutes off it,
# see Layout._link), where `<N>d` decides.
ages_h = st.one_of(st.integers(0, 24 * 40), st.integers(1, 40).map(lambda d: d * 24),
                   st.integers(1, 40).map(lambda d: d * 24 - 1))


@st.composite
def layouts(draw) -> Layout:
    numbers = sorted(draw(st.sets(st.integers(0, 12), max_size=8)))
    ages = draw(st.lists(ages_h, min_size=len(numbers), max_size=len(numbers)))
    if draw(st.booleans()):
        ages = sorted(ages, reverse=True)  # the usual case: newer number, newer link
    kind = draw(st.sampled_from(["existing", "dangling", "none"]))
    current = None
    if kind == "existing" and numbers:
        current = draw(st.sampled_from(numbers))
    elif kind == "dangling":
        current = draw(st.integers(0, 14))
    aliases = draw(st.lists(st.tuples(
        st.sampled_from(["p-0{}-link", "p-{}-link.bak", "p-+{}-link"]), st.integers(0, 12),
        ages_h), max_size=2, unique_by=lambda t: (t[0], t[1])))
    return Layout(tuple(numbers), tuple(ages), current,
                  tuple((form.format(n), age) for form, n, age in aliases))


ODD_SPECS = [["+0"], ["+"], ["0d"], ["dd"], ["d"], ["1+2"], ["++2"], ["3+"], ["07"], ["+02"],
             ["old", "1"], ["1", "old"], ["old "], ["OLD"], ["+3d"], ["1e1"], ["0x1"], [" 2"],
             ["-1"], ["18446744073709551616"], ["4294967296"], ["+-1"], ["1d2d"], ["+2", "1"],
             ["2147483648d"], ["00"], ["+18446744073709551615"]]

specs = st.one_of(
    st.just(["old"]),
    st.integers(1, 45).map(lambda d: [f"{d}d"]),
    st.integers(1, 10).map(lambda k: [f"+{k}"]),
    st.lists(st.integers(0, 14), min_size=1, max_size=5).map(lambda ns: [str(n) for n in ns]),
    st.sampled_from(ODD_SPECS))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), spec=specs)
def test_delete_generations_equals_nix_env(nix_store, layout, spec):
    base = Path(tempfile.mkdtemp(dir=nix_store))
    try:
        compare_with_nix(nix_store / "store", base, layout, spec)
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("layout,spec", [
    # The cases the random search should find, pinned.
    (Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), 3), ["+2"]),        # newer than current kept
    (Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), 3), ["3"]),         # the current: an error
    (Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), None), ["+1"]),     # no current: nothing
    (Layout((1, 2, 3, 4, 5), (200, 150, 100, 30, 0), 3), ["2d"]),     # gen 4 was active at -2d
    (Layout((1, 2, 3, 4, 5), (200, 10, 100, 30, 0), 3), ["2d"]),      # Nix asserts half-way
    (Layout((0, 1, 2), (3, 2, 1), None), ["0"]),                      # generation 0 exists
    (Layout((1, 2), (2, 1), 2, (("p-+4-link", 1),)), ["old"]),        # Nix fails half-way
    (Layout((1, 2), (2, 1), 3, (("p-3-link.bak", 1),)), ["old"]),     # .bak is "current" 3
    # An alias selects its number; Nix unlinks p-N-link for it, once.
    (Layout((0, 1), (24, 24), 0, (("p-01-link", 24),)), ["1d"]),      # the alias kept, p-1 goes
    (Layout((1, 2, 3), (72, 48, 0), 3, (("p-01-link", 72),)), ["old"]),  # 1 twice: half-way
    (Layout((2, 3), (48, 0), 3, (("p-01-link", 72),)), ["old"]),      # no p-1-link: half-way
])
def test_delete_generations_pinned_cases(nix_store, scratch, layout, spec):
    compare_with_nix(nix_store / "store", scratch, layout, spec)


@pytest.mark.parametrize("spec", ODD_SPECS, ids=repr)
def test_odd_specs_equal_nix_env(nix_store, scratch, spec):
    compare_with_nix(nix_store / "store", scratch, Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), 4),
                     spec)


def test_deviations_from_nix_keep_more(nix_store, scratch):
    """Where Nix would break a profile, we keep (documented in profiles.py)."""
    store = nix_store / "store"
    # 1. A profile linking its generation by absolute path: Nix does not see
    #    a current generation, and `old` deletes the one the profile uses.
    for side in ("nix", "ours"):
        d = scratch / side
        Layout((1, 2, 3), (3, 2, 1), None).make(d)
        os.symlink(d / "p-2-link", d / "p")
    assert nix_delete(store, scratch / "nix/p", ["old"])[0] == 0
    assert not (scratch / "nix/p-2-link").exists()  # Nix's behaviour, for the record
    assert ours(scratch / "ours/p", ["old"])[:2] == (True, [1, 3])
    assert os.path.lexists(scratch / "ours/p-2-link")
    with pytest.raises(prof.ProfileError, match="current"):
        prof.delete_generations(os.fsencode(scratch / "ours/p"), prof.parse_spec(["2"]))
    # 2. A generation "link" that is a regular file: Nix remove()s it.
    for side in ("nix2", "ours2"):
        d = scratch / side
        Layout((1, 2), (2, 1), 2).make(d)
        (d / "p-3-link").write_text("not a link")
        os.utime(d / "p-3-link", (NOW - 9000, NOW - 9000))
    assert nix_delete(store, scratch / "nix2/p", ["old"])[0] == 0
    assert not (scratch / "nix2/p-3-link").exists()
    ok, _, why = ours(scratch / "ours2/p", ["old"])
    assert not ok and "not a symlink" in why
    assert sorted(listing(scratch / "ours2")) == ["p", "p-1-link", "p-2-link", "p-3-link"]
    # 3. Days beyond a 32-bit int of seconds: Nix's cutoff wraps into the
    #    future and deletes; we refuse the spec (a usage error).
    for side in ("nix3", "ours3"):
        Layout((1, 2, 3), (300, 200, 100), 3).make(scratch / side)
    assert nix_delete(store, scratch / "nix3/p", ["30000d"])[1] == [2, 1]
    with pytest.raises(prof.SpecError, match="24855"):
        prof.parse_spec(["30000d"])
    assert sorted(listing(scratch / "ours3")) == ["p", "p-1-link", "p-2-link", "p-3-link"]


def test_day_counts_nix_overflows_are_refused(nix_store, scratch):
    """Nix 2.8 computes days * 24 * 3600 in an int: 24855d is the last
    count it gets right, from 24856d on it deletes nearly everything.  We
    refuse those before touching anything (exit 2); 24855d equals Nix."""
    compare_with_nix(nix_store / "store", scratch / "ok",
                     Layout((1, 2, 3), (300, 200, 100), 3), ["24855d"])
    p = Layout((1, 2, 3), (300, 200, 100), 3).make(scratch / "d")
    before = tree_snapshot(scratch / "d")
    for spec in ("24856d", "30000d", "2147483647d"):
        r = subprocess.run([QUERY, "profiles", "delete-generations", str(p), spec],
                           capture_output=True)
        assert r.returncode == 2, (spec, r.stderr)
        assert f"'{spec}'".encode() in r.stderr and b"at most 24855" in r.stderr
        assert tree_snapshot(scratch / "d") == before


@pytest.mark.parametrize("form", ["absolute", "dot-slash"])
# Not other numbers: with no current generation from parseName, Nix 2.8's
# "cannot delete current version" check reads an unset std::optional
# (the build here refuses 2, or 1, by chance); there is nothing defined to
# compare with.  `4`, the generation the profile uses: we refuse it.
@pytest.mark.parametrize("spec", [["+1"], ["+2"], ["+3"], ["+9"], ["old"], ["2d"], ["4"]],
                         ids=repr)
def test_current_by_path_only_ever_keeps_more_than_nix(nix_store, scratch, form, spec):
    """A profile linking its generation not by bare name (`p -> /dir/p-4-link`,
    `p -> ./p-4-link`): Nix sees no current generation.  Ours sees one;
    whatever that changes, we delete a subset of what Nix deletes (`+N`:
    nothing, as Nix), or fail before deleting anything."""
    layout = Layout((1, 2, 3, 4, 5), (120, 96, 72, 48, 0), None)
    for side in ("nix", "ours"):
        d = scratch / side
        layout.make(d)
        os.symlink(d / "p-4-link" if form == "absolute" else "./p-4-link", d / "p")
    rc, nix_order, err = nix_delete(nix_store / "store", scratch / "nix/p", spec)
    before = listing(scratch / "ours")
    ok, our_order, why = ours(scratch / "ours/p", spec)
    if not ok:
        assert listing(scratch / "ours") == before, why
        return
    assert rc == 0, err
    assert set(listing(scratch / "ours")) >= set(listing(scratch / "nix"))
    assert set(our_order) <= set(nix_order)
    assert os.path.lexists(scratch / "ours/p-4-link")
    if spec[0].startswith("+"):
        assert nix_order == our_order == []


def test_cli_delete_generations_equals_nix_env_on_a_generated_store(scratch):
    """The command, end to end, on a real profile: same result, same
    `removing profile version N` lines as nix-env."""
    root = scratch / "store"
    support.make_store(root, paths=400, seed=72, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=2, generations=7, users=1)
    twin = scratch / "twin"
    support.copy_store(root, twin)
    profile = "nix/var/nix/profiles/per-user/root/channels"
    for spec in (["2", "3"], ["+2"], ["old"]):
        nix = oracle(twin, "nix-env", "-p", str(twin / profile), "--delete-generations", *spec)
        mine = subprocess.run([QUERY, "profiles", "delete-generations", str(root / profile), *spec],
                              capture_output=True)
        assert mine.returncode == 0, mine.stderr
        assert mine.stderr == nix.stderr
        assert listing(root / profile.rsplit("/", 1)[0]) == listing(twin / profile.rsplit("/", 1)[0])
    bad = subprocess.run([QUERY, "profiles", "delete-generations", str(root / profile), "+0"],
                         capture_output=True)
    assert bad.returncode == 2 and b"invalid number of generations to keep '+0'" in bad.stderr
    cur = subprocess.run([QUERY, "--json", "profiles", "delete-generations", str(root / profile),
                          "7"], capture_output=True)
    # --json: the error is a JSON object on stdout, with the same exit code.
    doc = json.loads(cur.stdout)
    assert cur.returncode == doc["exit"] == 1 and "cannot delete current version" in doc["error"]
    assert doc["deleted"] == []


def test_list_equals_nix_env_list_generations_with_closure_sizes(scratch):
    root = scratch / "store"
    support.make_store(root, paths=400, seed=73, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=3, generations=4, users=1)
    out = subprocess.run([QUERY, "--root", str(root), "--json", "profiles", "list"],
                         capture_output=True, check=True)
    listed = {Path(e["profile"]).relative_to(root / "nix/var/nix/profiles").as_posix(): e
              for e in json.loads(out.stdout)}
    assert sorted(listed) == ["default", "per-user/alice/profile", "per-user/root/channels"]
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    for name, entry in listed.items():
        nix = oracle(root, "nix-env", "-p", str(root / "nix/var/nix/profiles" / name),
                     "--list-generations").stdout.decode()
        expected = [(int(m[0]), m[1], bool(m[2]))
                    for m in re.findall(r"^\s*(\d+)\s+(\S+ \S+)\s*(\(current\))?\s*$", nix, re.M)]
        assert [(g["number"], g["date"], g["current"]) for g in entry["generations"]] == expected
        for g in entry["generations"]:
            reqs = oracle(root, "nix-store", "-q", "--requisites", g["store_path"]).stdout.split()
            size = sum(db.execute("SELECT narSize FROM ValidPaths WHERE path = ?",
                                  (p.decode(),)).fetchone()[0] for p in reqs)
            assert (g["closure_paths"], g["closure_bytes"]) == (len(reqs), size)
    text = subprocess.run([QUERY, "--root", str(root), "profiles", "list"], capture_output=True,
                          check=True).stdout.decode()
    assert "(current)" in text and "KiB" in text and "/nix/store/" in text


# -- Nix's lock ----------------------------------------------------------------------

HOLDER = r"""
import fcntl, os, sys, time
lock = sys.argv[1]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)          # what nix-env holds while it works
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
os.unlink(lock)                          # and how Nix lets go: delete, mark stale
os.write(fd, b"d")
os.close(fd)
"""


def _holder(lock: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)],
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"locked\n"
    return p


def test_lock_held_by_another_process_times_out_clearly(scratch):
    p = Layout((1, 2, 3), (3, 2, 1), 3).make(scratch / "d")
    holder = _holder(scratch / "d/p.lock", 30)
    try:
        before = tree_snapshot(scratch / "d")
        t0 = time.monotonic()
        r = subprocess.run([QUERY, "profiles", "delete-generations", "--lock-timeout", "1",
                            str(p), "old"], capture_output=True)
        assert time.monotonic() - t0 >= 1.0
        assert r.returncode == 4
        assert b"waiting for lock on profile" in r.stderr
        assert b"timed out after 1 s" in r.stderr and b"nothing was changed" in r.stderr
        assert tree_snapshot(scratch / "d") == before
    finally:
        holder.kill()
        holder.wait()


SWAPPER = r"""
import fcntl, os, sys, time
lock, d = sys.argv[1], os.path.dirname(sys.argv[1])
x = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(x, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
# Nix's release of X (unlink, mark stale) -- and before X's waiters wake up,
# the next Nix process already holds a fresh lock file Y.
os.unlink(lock)
os.write(x, b"d")
y = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(y, fcntl.LOCK_EX)
os.close(x)
before = sorted(os.listdir(d))
time.sleep(2)
print("intact" if sorted(os.listdir(d)) == before else "violated", flush=True)
os.unlink(lock)
os.write(y, b"d")
os.close(y)
"""


def test_a_stale_lock_file_is_not_a_lock(scratch):
    """Woken up on a lock file its holder deleted, we must lock the new one
    (held by the next process) instead of going ahead: Nix's protocol."""
    p = Layout((1, 2, 3), (3, 2, 1), 3).make(scratch / "d")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(scratch / "d/p.lock")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert swapper.stdout.readline() == b"locked\n"
    t0 = time.monotonic()
    mine = subprocess.Popen([QUERY, "profiles", "delete-generations", "--lock-timeout", "20",
                             str(p), "old"], stderr=subprocess.PIPE)
    assert b"waiting for lock on profile" in mine.stderr.readline()
    swapper.stdin.write(b"go\n")
    swapper.stdin.flush()
    assert swapper.stdout.readline() == b"intact\n"
    assert mine.wait(30) == 0, mine.stderr.read()
    assert time.monotonic() - t0 >= 2.0
    swapper.wait()
    assert sorted(listing(scratch / "d")) == ["p", "p-3-link"]  # lock file removed, like Nix


def test_hostile_lock_files(scratch):
    """A lock path planted as a symlink, or a hard link to a file with data,
    is refused; an empty hard-linked file is locked but never written into."""
    victim = scratch / "victim"
    victim.write_bytes(b"precious")
    p = Layout((1, 2, 3), (3, 2, 1), 3).make(scratch / "d")
    all_there = ["p", "p-1-link", "p-2-link", "p-3-link", "p.lock"]

    def delete_old() -> subprocess.CompletedProcess:
        return subprocess.run([QUERY, "profiles", "delete-generations", "--lock-timeout", "5",
                               str(p), "old"], capture_output=True, timeout=60)

    os.symlink(victim, scratch / "d/p.lock")
    r = delete_old()
    assert r.returncode == 1 and b"is a symlink" in r.stderr
    assert sorted(listing(scratch / "d")) == all_there
    os.unlink(scratch / "d/p.lock")
    os.link(victim, scratch / "d/p.lock")
    r = delete_old()
    assert r.returncode == 1 and b"not a Nix lock file" in r.stderr
    assert sorted(listing(scratch / "d")) == all_there
    os.unlink(scratch / "d/p.lock")
    victim.write_bytes(b"")
    os.link(victim, scratch / "d/p.lock")
    r = delete_old()
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"" and victim.stat().st_nlink == 1
    assert sorted(listing(scratch / "d")) == ["p", "p-3-link"]


def test_nix_env_waits_for_our_lock(nix_store, scratch):
    p = Layout((1, 2, 3), (3, 2, 1), 3).make(scratch / "d")
    with prof.ProfileDir(os.fsencode(p)) as d, d.lock(timeout=5):
        r = subprocess.run(["timeout", "2", str(support.NIX_ORACLE), str(nix_store / "store"),
                            "nix-env", "-p", str(p), "--delete-generations", "old"],
                           capture_output=True)
        assert r.returncode == 124 and b"waiting for lock on profile" in r.stderr
        assert sorted(listing(scratch / "d")) == ["p", "p-1-link", "p-2-link", "p-3-link", "p.lock"]
    # Released the way Nix releases: nix-env now goes ahead at once.
    nix_delete(nix_store / "store", p, ["old"])
    assert sorted(listing(scratch / "d")) == ["p", "p-3-link"]


def test_concurrent_nix_env_installs_never_leave_a_dangling_profile(scratch):
    """nix-env -i creates and switches generations under the lock while we
    delete old ones: at no moment may the profile point at a missing
    generation, and no generation we could not prove old may go."""
    root = scratch / "store"
    support.make_store(root, paths=300, seed=74, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=2, users=1)
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    pkgs = [r[0] for r in db.execute("SELECT path FROM ValidPaths WHERE path NOT LIKE '%.drv' "
                                     "AND path NOT LIKE '%-user-environment' ORDER BY id")
            if (root / r[0].lstrip("/")).is_dir()][:12]
    profile = scratch / "prof/p"
    profile.parent.mkdir()
    oracle(root, "nix-env", "-p", str(profile), "-i", pkgs[0])
    stop, bad = threading.Event(), []

    def watch():
        while not stop.is_set():
            try:
                target = os.readlink(profile)
                there = os.path.lexists(profile.parent / target)
                # Only a miss while the profile still points there counts.
                if not there and os.readlink(profile) == target:
                    bad.append(f"profile -> {target}, which is gone")
            except FileNotFoundError:
                bad.append("profile link missing")
            time.sleep(0.0005)

    def install():
        for i, pkg in enumerate(pkgs[1:]):
            op = ["-i", pkg] if i % 3 != 2 else ["-e", os.path.basename(pkgs[i])[33:]]
            oracle(root, "nix-env", "-p", str(profile), *op, check=False)

    watcher, installer = threading.Thread(target=watch), threading.Thread(target=install)
    watcher.start()
    installer.start()
    runs = 0
    while installer.is_alive():
        spec = ["old"] if runs % 2 else ["+2"]
        r = subprocess.run([QUERY, "profiles", "delete-generations", str(profile), *spec],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        runs += 1
    installer.join()
    stop.set()
    watcher.join()
    assert not bad, bad[:3]
    assert runs >= 3
    subprocess.run([QUERY, "profiles", "delete-generations", str(profile), "old"], check=True)
    gens = sorted(n for n in listing(profile.parent) if n != "p")
    assert gens == [os.readlink(profile)]
    assert not (profile.parent / "p.lock").exists()


# -- the caller's own rights -----------------------------------------------------------

def _as(user: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", QUERY, *args], capture_output=True,
                          timeout=120)


def test_user_manages_own_profiles_and_is_refused_on_others(scratch, users):
    root = scratch / "store"
    support.make_store(root, paths=400, seed=75, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=4, generations=4, users=2)
    per_user = root / "nix/var/nix/profiles/per-user"
    support.chown_tree(per_user / "alice", support.ALICE)
    support.chown_tree(per_user / "bob", support.BOB)
    mine, bobs = per_user / "alice/profile", per_user / "bob/profile"
    snapshot_others = {p: tree_snapshot(p) for p in (per_user / "bob", per_user / "root")}
    # Listing others' profiles is fine (they are world-readable); deleting is not.
    listed = _as(support.ALICE, "--root", str(root), "--json", "profiles", "list")
    assert listed.returncode == 0, listed.stderr
    assert {Path(e["profile"]).name for e in json.loads(listed.stdout)} >= {"profile", "channels"}
    r = _as(support.ALICE, "profiles", "delete-generations", str(bobs), "old")
    assert r.returncode == 3
    assert b"permission denied" in r.stderr and f"owned by {support.BOB}".encode() in r.stderr
    assert b"nothing was changed" in r.stderr
    r = _as(support.ALICE, "profiles", "delete-generations", str(mine), "+2")
    assert r.returncode == 0, r.stderr
    assert sorted(listing(mine.parent)) == ["profile", "profile-3-link", "profile-4-link"]
    # An explicit prune including someone else's profile is refused before
    # anything, also in alice's own profile.
    r = _as(support.ALICE, "profiles", "prune", "--keep", "1", "--no-runtime-check",
            str(mine), str(bobs))
    assert r.returncode == 3 and b"permission denied" in r.stderr
    assert sorted(listing(mine.parent)) == ["profile", "profile-3-link", "profile-4-link"]
    # prune --all: only what alice may modify; others reported as skipped.
    r = _as(support.ALICE, "--root", str(root), "--json", "profiles", "prune", "--all",
            "--keep", "1", "--no-runtime-check")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    done = {Path(p["profile"]).parent.name: p for p in report["profiles"]}
    assert [g["number"] for g in done["alice"]["generations"] if g["deleted"]] == [3]
    assert all("skipped" in p for k, p in done.items() if k != "alice")
    assert sorted(listing(mine.parent)) == ["profile", "profile-4-link"]
    assert {p: tree_snapshot(p) for p in snapshot_others} == snapshot_others


# -- prune --all: a directory swapped for a symlink is never followed --------------------------

@pytest.fixture
def swappable(scratch, users, monkeypatch):
    """per-user/alice/sub/p (alice's) and per-user/bob/custom/p (bob's),
    five generations each; `swap()` does what alice may do at any moment:
    replace her `sub` with a symlink to bob's directory."""
    root = scratch / "store"
    per_user = root / "nix/var/nix/profiles/per-user"
    mine = Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), 5).make(per_user / "alice/sub")
    # Outside the state dir (nix-env -p ~/custom/p): only a swap reaches it.
    bobs = Layout((1, 2, 3, 4, 5), (96, 72, 48, 24, 0), 5).make(scratch / "bob/custom")
    support.chown_tree(per_user / "alice", support.ALICE)
    support.chown_tree(scratch / "bob", support.BOB)
    monkeypatch.setenv("GCROOTS_SYSTEM_LINKS", "")

    def swap():
        os.rename(per_user / "alice/sub", per_user / "alice/sub.real")
        os.symlink(scratch / "bob/custom", per_user / "alice/sub")

    return root, mine, bobs, swap


def _prune_in_process(capsys, root: Path, *args: str) -> tuple[int, dict]:
    from gcroots.client import cli
    rc = cli.main(["--root", str(root), "--json", "profiles", "prune", "--all", "--keep", "1",
                   "--no-runtime-check", *args])
    out = capsys.readouterr().out
    return rc, {Path(p["profile"]).relative_to(root / "nix/var/nix/profiles").as_posix(): p
                for p in json.loads(out)["profiles"]}


def test_prune_all_refuses_a_directory_swapped_after_discovery(swappable, monkeypatch, capsys):
    """alice swaps her directory for a symlink to bob's between root's scan
    and its plan: the plan opens the path, finds another directory than
    the scan listed, and skips the profile; bob's generations stay."""
    root, mine, bobs, swap = swappable
    real_discover = prof.discover

    def discover_then_swap(*a, **kw):
        found = real_discover(*a, **kw)
        swap()
        return found

    monkeypatch.setattr(prof, "discover", discover_then_swap)
    bob_before = tree_snapshot(bobs.parent)
    rc, report = _prune_in_process(capsys, root)
    assert tree_snapshot(bobs.parent) == bob_before
    assert rc == 0
    assert "no longer the directory that was scanned" in report["per-user/alice/sub/p"]["skipped"]
    assert report["per-user/alice/sub/p"]["generations"] == []


def test_prune_all_refuses_a_directory_swapped_after_the_plan(swappable, monkeypatch, capsys):
    """The swap between the plan and the deletion: the deletion checks the
    directory is the one planned and reports the profile as changed."""
    root, mine, bobs, swap = swappable
    real_apply = prof.apply_prune
    swapped = []

    def swap_then_apply(path, *a, **kw):
        if path == os.fsencode(mine) and not swapped:
            swap()
            swapped.append(path)
        return real_apply(path, *a, **kw)

    monkeypatch.setattr(prof, "apply_prune", swap_then_apply)
    bob_before = tree_snapshot(bobs.parent)
    mine_real = mine.parent.parent / "sub.real"
    rc, report = _prune_in_process(capsys, root)
    assert swapped
    assert rc == 1
    entry = report["per-user/alice/sub/p"]
    assert "no longer the directory that was scanned" in entry["error"]
    assert not any(g["deleted"] for g in entry["generations"])
    assert tree_snapshot(bobs.parent) == bob_before
    assert sorted(listing(mine_real)) == ["p", "p-1-link", "p-2-link", "p-3-link", "p-4-link",
                                          "p-5-link"]


# -- prune: never the current, booted or running generation --------------------------------

def _gen_paths(profile: Path) -> dict[int, str]:
    return {int(n.rsplit("-", 2)[1]): os.readlink(profile.parent / n)
            for n in listing(profile.parent) if re.fullmatch(r"default-\d+-link", n)}


@pytest.fixture
def pruning_store(scratch, users):
    """A default profile with 8 generations, rolled back to generation 5;
    /run/current-system-like links to generations 3 and 2."""
    root = scratch / "store"
    support.make_store(root, paths=600, seed=76, roots=5, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=8, users=1)
    profile = root / "nix/var/nix/profiles/default"
    os.unlink(profile)
    os.symlink("default-5-link", profile)
    gens = _gen_paths(profile)
    run = scratch / "sys"
    run.mkdir()
    os.symlink(gens[3], run / "current-system")
    # booted-system by way of another link, as /run/booted-system -> profile link
    os.symlink(gens[2], run / "system-2-link")
    os.symlink(run / "system-2-link", run / "booted-system")
    env = {"GCROOTS_SYSTEM_LINKS": f"{run}/current-system:{run}/booted-system"}
    return root, profile, gens, env


def _prune(root: Path, sock: Path | None, *args: str, env: dict | None = None,
           user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [QUERY, *(["--socket", str(sock)] if sock else []), "--root", str(root),
           "profiles", "prune", *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **(env or {})))


def test_prune_keeps_current_booted_and_running_generations(pruning_store, scratch):
    root, profile, gens, env = pruning_store
    pipe = support.Pipeline(root, scratch / "run", helper_args=())  # with /proc
    pipe.start()
    runner = subprocess.Popen(["sleep", "300"], env={"PATH": os.environ["PATH"],
                                                    "RUNNING_ENV": gens[1]})
    try:
        before = tree_snapshot(profile.parent)
        # A dry run: the plan, with reasons, and nothing touched.
        r = _prune(root, pipe.sock, "--keep", "1", "--dry-run", "--json", str(profile), env=env)
        assert r.returncode == 0, r.stderr
        plan = {g["number"]: g for g in json.loads(r.stdout)["profiles"][0]["generations"]}
        assert tree_snapshot(profile.parent) == before
        assert {n for n, g in plan.items() if g["action"] == "delete"} == {4, 6, 7}
        assert "current" in plan[5]["reasons"] and "last 1" in plan[8]["reasons"]
        assert any("current-system" in x for x in plan[3]["reasons"])
        assert any("booted-system" in x for x in plan[2]["reasons"])
        assert "running (runtime root)" in plan[1]["reasons"]
        text = _prune(root, pipe.sock, "--keep", "1", "--dry-run", str(profile), env=env)
        assert re.search(rb"\n\s+4\s+\S+ \S+\s+DELETE\s+not in last 1", text.stdout)
        assert re.search(rb"\n\s+5\s+\S+ \S+\s+KEEP\s+current", text.stdout)
        # The real thing.
        r = _prune(root, pipe.sock, "--keep", "1", str(profile), env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(_gen_paths(profile)) == [1, 2, 3, 5, 8]
        assert os.readlink(profile) == "default-5-link"
        # --gc then collects through gcrootsd: generation 8's environment goes.
        assert gens[8].encode() in support.valid_set(root)
        r = _prune(root, pipe.sock, "--keep", "0", "--keep-since", "1d", "--gc", str(profile),
                   env=env)
        assert sorted(_gen_paths(profile)) == [1, 2, 3, 5]
        assert r.returncode == 0, r.stderr
        assert b"store paths deleted" in r.stderr
        assert gens[8].encode() not in support.valid_set(root)
        assert gens[5].encode() in support.valid_set(root)
        # gcrootsd without its helper has no complete root set: no answer, no deletion.
        pipe.stop_helper()
        r = _prune(root, pipe.sock, "--keep", "1", str(profile), env=env)
        assert r.returncode == 1 and b"could not list the runtime roots" in r.stderr
        assert sorted(_gen_paths(profile)) == [1, 2, 3, 5]
    finally:
        runner.kill()
        runner.wait()
        pipe.stop()
    # Without gcrootsd, nothing is deleted unless the caller says so.
    r = _prune(root, pipe.sock, "--keep", "1", str(profile), env=env)
    assert r.returncode == 1 and b"--no-runtime-check" in r.stderr
    assert sorted(_gen_paths(profile)) == [1, 2, 3, 5]
    r = _prune(root, pipe.sock, "--keep", "1", "--no-runtime-check", str(profile), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(_gen_paths(profile)) == [2, 3, 5]


def test_prune_standalone_scans_processes_itself_as_root_only(pruning_store, users):
    root, profile, gens, env = pruning_store
    runner = subprocess.Popen(["sleep", "300"], env={"PATH": os.environ["PATH"], "X": gens[6]})
    try:
        r = subprocess.run([QUERY, "--standalone", "--root", str(root), "--json", "profiles",
                            "prune", "--keep", "1", "--dry-run", str(profile)],
                           capture_output=True, env=dict(os.environ, **env))
        assert r.returncode == 0, r.stderr
        plan = {g["number"]: g for g in json.loads(r.stdout)["profiles"][0]["generations"]}
        # Generations may share a store path (here 4 and 6): both are running then.
        running = {n for n, p in gens.items() if p == gens[6]}
        assert all(plan[n]["reasons"] == ["running (runtime root)"] for n in running)
        assert {n for n, g in plan.items() if g["action"] == "delete"} == {1, 4, 6, 7} - running
    finally:
        runner.kill()
        runner.wait()
    support.chown_tree(profile.parent, support.ALICE)
    before = tree_snapshot(profile.parent)
    r = _prune(root, root / "no-daemon.sock", "--keep", "1", str(profile), env=env,
               user=support.ALICE)
    assert r.returncode == 1 and b"cannot ask gcrootsd" in r.stderr
    r = subprocess.run(["runuser", "-u", support.ALICE, "--", QUERY, "--standalone", "--root",
                        str(root), "profiles", "prune", "--keep", "1", str(profile)],
                       capture_output=True, env=dict(os.environ, **env))
    assert r.returncode == 1 and b"cannot tell which generations are running" in r.stderr
    assert tree_snapshot(profile.parent) == before


def test_prune_refuses_when_a_system_link_cannot_be_resolved(pruning_store, scratch):
    root, profile, gens, env = pruning_store
    run = scratch / "sys"
    os.unlink(run / "system-2-link")  # booted-system now dangles: which one was it?
    before = tree_snapshot(profile.parent)
    r = _prune(root, None, "--keep", "1", "--no-runtime-check", str(profile), env=env)
    assert r.returncode == 1 and b"booted-system" in r.stderr and b"refusing" in r.stderr
    assert tree_snapshot(profile.parent) == before


def test_prune_usage_errors_change_nothing(pruning_store):
    root, profile, gens, env = pruning_store
    before = tree_snapshot(profile.parent)
    for args in ([str(profile)], ["--keep", "1"], ["--keep", "1", "--all", str(profile)],
                 ["--keep", "x", str(profile)], ["--keep-since", "3", str(profile)],
                 ["--keep", "1", "--ask", "--no-runtime-check", str(profile)]):  # no TTY
        r = _prune(root, None, *args, env=env)
        assert r.returncode == 2, (args, r.stderr)
    assert tree_snapshot(profile.parent) == before


def _answer_on_a_tty(cmd: list[str], answer: bytes, env: dict) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(cmd[0], cmd, env)
    out = b""
    sent = False
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            os.kill(pid, 9)
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if not sent and b"[y/N]" in out:
            os.write(fd, answer)
            sent = True
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def test_prune_ask_on_a_terminal(pruning_store):
    root, profile, gens, env = pruning_store
    cmd = [QUERY, "--root", str(root), "profiles", "prune", "--keep", "1", "--ask",
           "--no-runtime-check", str(profile)]
    env = dict(os.environ, **env)
    rc, out = _answer_on_a_tty(cmd, b"n\n", env)
    assert rc == 0 and b"DELETE" in out and b"nothing was deleted" in out
    assert sorted(_gen_paths(profile)) == list(range(1, 9))
    rc, out = _answer_on_a_tty(cmd, b"y\n", env)
    assert rc == 0, out
    assert sorted(_gen_paths(profile)) == [2, 3, 5, 8]  # 1 is not running-checked here


# -- prune's decision, over many profiles (pure, no processes) --------------------------------

@settings(max_examples=300, deadline=None)
@given(layout=layouts(), keep=st.one_of(st.none(), st.integers(0, 6)), data=st.data(),
       protected_numbers=st.sets(st.integers(0, 12), max_size=3),
       running_numbers=st.sets(st.integers(0, 12), max_size=3))
def test_plan_prune_keeps_the_union_and_never_a_protected_one(layout, keep, data,
                                                              protected_numbers, running_numbers):
    # --keep-since right at a generation's age, or an hour either side
    near = [max(0, a + d) for a in layout.ages_h for d in (-1, 0, 1)]
    since_h = data.draw(st.one_of(st.none(), st.integers(0, 24 * 30),
                                  *([st.sampled_from(near)] * 2 if near else [])))
    d = Path(tempfile.mkdtemp(prefix="gcroots-plan-"))
    try:
        path = layout.make(d / "p")
        with prof.ProfileDir(os.fsencode(path)) as pd:
            profile = pd.read()
    finally:
        shutil.rmtree(d)
    env_of = {n: FAKE_ENV.format(n).encode() for n in range(13)}
    protected = prof.Protected(system={env_of[n]: [b"/run/booted-system"] for n in protected_numbers},
                               runtime={env_of[n]: [b"{censored}"] for n in running_numbers})
    policy = prof.Policy(keep, None if since_h is None else since_h * 3600)
    plan = prof.plan_prune(profile, policy, protected, NOW, b"/nix/store")
    assert [v.generation for v in plan] == profile.generations
    numbers = profile.numbers()
    last = set(numbers[-keep:]) if keep else set()
    for v in plan:
        g = v.generation
        sp = g.store_path(b"/nix/store")
        never = (profile.current not in numbers or g.number == profile.current
                 or sp is None or sp in protected.system or sp in protected.runtime
                 or not g.canonical or [x.number for x in profile.generations].count(g.number) > 1)
        wanted = g.number in last or (since_h is not None and g.mtime >= NOW - since_h * 3600)
        assert v.delete == (not never and not wanted), v
        assert v.reasons


def test_plan_prune_keep_since_boundary():
    """Newer than D keeps a link made D - 30 min ago and not one made
    D + 30 min ago; --keep counts by number, not by age."""
    d = Path(tempfile.mkdtemp(prefix="gcroots-plan-"))
    try:
        path = Layout((1, 2, 3, 4, 5), (5, 3, 2, 1, 0), 5).make(d / "p")
        with prof.ProfileDir(os.fsencode(path)) as pd:
            profile = pd.read()
    finally:
        shutil.rmtree(d)
    plan = prof.plan_prune(profile, prof.Policy(None, 2 * 3600), prof.Protected(), NOW,
                           b"/nix/store")
    assert [v.generation.number for v in plan if v.delete] == [1, 2, 3]
    plan = prof.plan_prune(profile, prof.Policy(2, 3 * 3600), prof.Protected(), NOW, b"/nix/store")
    assert [v.generation.number for v in plan if v.delete] == [1, 2]
    assert plan[1].reasons == ("not in last 2", "older than 3h")


# -- roots prune ---------------------------------------------------------------------

def _auto_link(root: Path, link: Path) -> Path:
    """Register `link` as an indirect root, as Nix's addIndirectRoot does."""
    entry = root / "nix/var/nix/gcroots/auto" / storegen.auto_root_name(str(link))
    os.symlink(link, entry)
    return entry


def _age(path: Path, days: float) -> None:
    t = NOW - days * 86400
    os.utime(path, (t, t), follow_symlinks=False)


def test_roots_prune_removes_only_the_callers_own_stale_links(scratch, users):
    root = scratch / "store"
    support.make_store(root, paths=600, seed=77, roots=5, indirect=6, stale=1, quirks=0,
                       profiles=2, generations=3, users=2)
    home = root / "home"
    db = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    current_env = os.readlink(root / "nix/var/nix/profiles" / os.readlink(
        root / "nix/var/nix/profiles/default"))
    in_profile = db.execute(
        "SELECT v.path FROM Refs r JOIN ValidPaths u ON u.id = r.referrer JOIN ValidPaths v "
        "ON v.id = r.reference WHERE u.path = ? AND v.id != u.id LIMIT 1", (current_env,)).fetchone()[0]
    # Paths no current generation needs (nix-store -q --requisites says so).
    profiles_dir = root / "nix/var/nix/profiles"
    needed = set()
    for p in profiles_dir.rglob("*"):
        if p.is_symlink() and re.fullmatch(r".+-\d+-link", os.readlink(p)):
            gen = os.readlink(p.parent / os.readlink(p))
            needed |= {x.decode() for x in oracle(root, "nix-store", "-q", "--requisites",
                                                  gen).stdout.split()}
    assert in_profile in needed
    free = [r[0] for r in db.execute(
        "SELECT path FROM ValidPaths WHERE path NOT LIKE '%.drv' ORDER BY id DESC LIMIT 60")
        if r[0] not in needed]
    assert len(free) >= 10
    links = {}
    for i, (name, target, days) in enumerate([
            ("old", free[0], 40), ("old-direnv/.direnv/flake-profile-1-link", free[1], 50),
            ("young", free[2], 2), ("running", free[3], 60), ("in-profile", in_profile, 60)]):
        link = home / "alice/work" / name / "result"
        link.parent.mkdir(parents=True)
        os.symlink(target, link)
        _age(link, days)
        links[name] = link
        _auto_link(root, link)
    # A profile outside the state dir (nix-env -p ~/work/myprof/p): its
    # generations are indirect roots too; the current one must stay.
    prof_dir = home / "alice/work/myprof"
    prof_dir.mkdir(parents=True)
    for n, target in ((1, free[7]), (2, free[8])):
        os.symlink(target, prof_dir / f"p-{n}-link")
        _age(prof_dir / f"p-{n}-link", 70)
        _auto_link(root, prof_dir / f"p-{n}-link")
    os.symlink("p-2-link", prof_dir / "p")
    bob_link = home / "bob/work/ancient/result"
    bob_link.parent.mkdir(parents=True)
    os.symlink(free[5], bob_link)
    _age(bob_link, 400)
    _auto_link(root, bob_link)
    for name, user in (("alice", support.ALICE), ("bob", support.BOB)):
        support.chown_tree(home / name, user, 0o700)
    # Make everything else in both homes old as well: only alice's may go.
    for p in (home / "alice").rglob("result*"):
        if p.is_symlink() and p not in links.values():
            _age(p, 100)
    pipe = support.Pipeline(root, scratch / "run", helper_args=())
    pipe.start()
    runner = subprocess.Popen(["sleep", "300"], env={"PATH": os.environ["PATH"], "X": free[3]})
    try:
        bob_before = tree_snapshot(home / "bob")
        auto_before = sorted(os.listdir(root / "nix/var/nix/gcroots/auto"))
        r = _as(support.ALICE, "--socket", str(pipe.sock), "--root", str(root), "--json",
                "roots", "prune", "--older-than", "30d", "--dry-run")
        assert r.returncode == 0, r.stderr
        plan = {Path(x["link"]).relative_to(home / "alice").as_posix(): x
                for x in json.loads(r.stdout)["links"]}
        assert all(p.startswith(("work/", "src/")) for p in plan)  # nothing of bob's
        assert plan["work/old/result"]["action"] == "delete"
        assert plan["work/old-direnv/.direnv/flake-profile-1-link/result"]["kind"] == "direnv"
        assert plan["work/young/result"]["reasons"] == ["newer than 30d"]
        assert plan["work/running/result"]["reasons"] == ["running (runtime root)"]
        assert plan["work/in-profile/result"]["reasons"] == ["in a current profile generation"]
        assert plan["work/myprof/p-1-link"]["action"] == "delete"
        assert plan["work/myprof/p-2-link"]["kind"] == "profile"
        assert plan["work/myprof/p-2-link"]["reasons"] == [
            "current generation of its profile (see profiles prune)"]
        doomed = {k for k, x in plan.items() if x["action"] == "delete"}
        assert all(os.path.lexists(home / "alice" / k) for k in doomed)
        # --match narrows it down.
        r = _as(support.ALICE, "--socket", str(pipe.sock), "--root", str(root), "roots", "prune",
                "--older-than", "30d", "--match", "*/.direnv/*")
        assert r.returncode == 0, r.stderr
        assert not os.path.lexists(links["old-direnv/.direnv/flake-profile-1-link"])
        assert os.path.lexists(links["old"])
        assert b"not yours to change" in r.stdout and b"gcrootsd" in r.stdout
        # Counts in words (issue 15: "entr(y/ies)", "link(s)").
        assert re.search(rb"removed 1 link; 0 gcroots/auto entries removed with them\n1 entry "
                         rb"in \S+ now points nowhere", r.stdout), r.stdout
        assert b"(s)" not in r.stdout and b"(y/ies)" not in r.stdout
        r = _as(support.ALICE, "--socket", str(pipe.sock), "--root", str(root), "roots", "prune",
                "--older-than", "30d")
        assert r.returncode == 0, r.stderr
        for k in doomed:
            assert not os.path.lexists(home / "alice" / k), k
        for k in ("young", "running", "in-profile"):
            assert os.path.lexists(links[k]), k
        assert sorted(os.listdir(prof_dir)) == ["p", "p-2-link"]
        assert tree_snapshot(home / "bob") == bob_before
        # gcroots/auto is root's: alice could not remove the entries; they dangle now.
        assert sorted(os.listdir(root / "nix/var/nix/gcroots/auto")) == auto_before
    finally:
        runner.kill()
        runner.wait()
        pipe.stop()
    # Nothing of alice's is that old: gcrootsd (gone now) is not even asked
    # which paths running processes use -- that could only keep more.
    r = _as(support.ALICE, "--socket", str(pipe.sock), "--root", str(root), "roots", "prune",
            "--older-than", "365d")
    assert r.returncode == 0 and r.stdout.endswith(b"nothing to remove\n"), r
    # Root removes its own stale link and the auto entry with it.
    mine = scratch / "rootwork/result"
    mine.parent.mkdir()
    os.symlink(free[6], mine)
    _age(mine, 90)
    entry = _auto_link(root, mine)
    r = subprocess.run([QUERY, "--root", str(root), "roots", "prune", "--older-than", "30d",
                        "--no-runtime-check"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(mine) and not os.path.lexists(entry)
    assert os.path.lexists(links["young"]) and tree_snapshot(home / "bob") == bob_before


FAR_STORE_PATH = "/nix/store/" + "z" * 32 + "-not-in-any-profile"


def test_roots_prune_as_root_never_follows_a_users_directory_symlink(scratch, users):
    """alice registers `~/x/booted-system` as an indirect root, then makes
    ~/x a symlink to root's directory: root's prune must not remove root's
    own, old `booted-system` link there.  Such a link is listed, kept, with
    the reason."""
    root = scratch / "store"
    support.make_store(root, paths=120, seed=79, roots=2, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=3, users=1)
    run = scratch / "run"
    run.mkdir()
    os.symlink(FAR_STORE_PATH, run / "booted-system")
    _age(run / "booted-system", 60)
    alice = scratch / "alice"
    alice.mkdir()
    support.chown_tree(alice, support.ALICE, 0o755)
    subprocess.run(["runuser", "-u", support.ALICE, "--", "ln", "-s", str(run), str(alice / "x")],
                   check=True)
    _auto_link(root, alice / "x/booted-system")
    # Root's own old result link in a plain directory still goes: the check
    # is not vacuous.
    (scratch / "rootwork").mkdir()
    plain = scratch / "rootwork/result"
    os.symlink(FAR_STORE_PATH, plain)
    _age(plain, 60)
    _auto_link(root, plain)
    run_before = tree_snapshot(run)
    r = subprocess.run([QUERY, "--root", str(root), "--json", "roots", "prune", "--older-than",
                        "30d", "--no-runtime-check"], capture_output=True)
    assert r.returncode == 0, r.stderr
    links = {x["link"]: x for x in json.loads(r.stdout)["links"]}
    via = links[str(alice / "x/booted-system")]
    assert via["action"] == "keep" and via["removed"] is False
    assert "its directory path goes through a symbolic link" in via["reasons"]
    assert links[str(plain)]["removed"] is True and not os.path.lexists(plain)
    assert tree_snapshot(run) == run_before
    text = subprocess.run([QUERY, "--root", str(root), "roots", "prune", "--older-than", "30d",
                           "--no-runtime-check", "--dry-run"], capture_output=True, check=True)
    assert re.search(rb"KEEP .*its directory path goes through a symbolic link.*"
                     rb"/alice/x/booted-system", text.stdout)


def test_roots_prune_between_users_never_follows_a_directory_symlink(scratch, users):
    """bob names `~bob/.direnv/old/result` as an indirect root, with
    ~bob/.direnv a symlink into alice's work directory: alice's
    `--match '*/.direnv/*'` must not delete her non-direnv link there."""
    root = scratch / "store"
    support.make_store(root, paths=120, seed=80, roots=2, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=3, users=1)
    alice, bob = scratch / "alice", scratch / "bob"
    for name in ("work/old", "real/.direnv/flake"):
        (alice / name).mkdir(parents=True)
        os.symlink(FAR_STORE_PATH, alice / name / "result")
    bob.mkdir()
    os.symlink(alice / "work", bob / ".direnv")
    support.chown_tree(alice, support.ALICE, 0o755)
    support.chown_tree(bob, support.BOB, 0o755)
    for name in ("work/old", "real/.direnv/flake"):
        _age(alice / name / "result", 60)
    _auto_link(root, bob / ".direnv/old/result")
    _auto_link(root, alice / "real/.direnv/flake/result")
    r = _as(support.ALICE, "--root", str(root), "--json", "roots", "prune", "--older-than",
            "30d", "--match", "*/.direnv/*", "--no-runtime-check")
    assert r.returncode == 0, r.stderr
    links = {x["link"]: x for x in json.loads(r.stdout)["links"]}
    assert links[str(bob / ".direnv/old/result")]["action"] == "keep"
    assert links[str(bob / ".direnv/old/result")]["reasons"] == [
        "its directory path goes through a symbolic link"]
    assert os.path.lexists(alice / "work/old/result")
    assert links[str(alice / "real/.direnv/flake/result")]["removed"] is True
    assert not os.path.lexists(alice / "real/.direnv/flake/result")


def test_roots_prune_rewalks_the_directory_at_removal(scratch):
    """The link's directory moved and replaced by a symlink to it between
    the plan and the removal (the very link, same inode, is there): the
    removal walks the path again and leaves it alone."""
    from gcroots.client import indirect
    from gcroots.layout import StoreLayout
    root = scratch / "store"
    support.make_store(root, paths=120, seed=81, roots=2, indirect=0, stale=0, quirks=0,
                       profiles=1, generations=3, users=1)
    (scratch / "alice/x").mkdir(parents=True)
    os.symlink(FAR_STORE_PATH, scratch / "alice/x/result")
    _age(scratch / "alice/x/result", 60)
    _auto_link(root, scratch / "alice/x/result")
    layout = StoreLayout.make(None, None, str(root))
    verdicts = indirect.plan(indirect.scan(layout), older_than=30 * 86400, now=NOW, match=None,
                             uid=0, runtime={}, in_profiles=set(), older_text="30d")
    [v] = [v for v in verdicts if v.root.link == os.fsencode(scratch / "alice/x/result")]
    assert v.delete
    os.rename(scratch / "alice/x", scratch / "elsewhere")
    os.symlink(scratch / "elsewhere", scratch / "alice/x")
    removal = indirect.remove(v)
    assert not removal.removed and removal.changed
    assert "symbolic link" in removal.error
    assert os.path.lexists(scratch / "elsewhere/result")


def test_plain_roots_query_is_unchanged(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=78, roots=10, indirect=3, stale=0, quirks=0)
    r = support.standalone(root, "roots")
    assert r.stdout == support.nix_roots(root)
    bad = subprocess.run([QUERY, "roots", "--older-than", "3d"], capture_output=True)
    assert bad.returncode == 2 and b"belongs to `roots prune`" in bad.stderr


def test_list_finds_home_profiles(scratch):
    """Without a chroot root: ~/.local/state/nix/profiles (Nix >= 2.14) and
    the profile ~/.nix-profile links to, once each."""
    home = scratch / "home"
    xdg = home / ".local/state/nix/profiles"
    Layout((1, 2), (2, 1), 2).make(xdg)
    elsewhere = Layout((4, 5, 6), (3, 2, 1), 5).make(scratch / "elsewhere")
    os.symlink(elsewhere, home / ".nix-profile")
    os.symlink(xdg / "p", xdg / "q")  # not a profile: a link to one (no q-N-link)
    env = dict(os.environ, HOME=str(home))
    env.pop("XDG_STATE_HOME", None)
    r = subprocess.run([QUERY, "--json", "profiles", "list", "--no-size", "--state-dir",
                        str(scratch / "empty-state")], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    found = {e["profile"]: [(g["number"], g["current"]) for g in e["generations"]]
             for e in json.loads(r.stdout)}
    assert found == {str(xdg / "p"): [(1, False), (2, True)],
                     str(elsewhere): [(4, False), (5, True), (6, False)]}
    # ~/.nix-profile pointing at a profile Nix has not made yet (root's
    # profiles/default on a fresh install): not listed (issue 15).
    os.unlink(home / ".nix-profile")
    os.symlink(scratch / "empty-state/profiles/default", home / ".nix-profile")
    r = subprocess.run([QUERY, "--json", "profiles", "list", "--no-size", "--state-dir",
                        str(scratch / "empty-state")], capture_output=True, env=env)
    assert [e["profile"] for e in json.loads(r.stdout)] == [str(xdg / "p")], r.stdout
