"""--max-freed stops as Nix's collector stops: right after the path that
brings the bytes freed past the limit, counted as Nix counts them (the
apparent size of every file that had one or two links); in the daemon,
with --standalone and in the dry run's forecast; and only what is deleted
is invalidated."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from . import support
from .support import Pipeline, oracle, valid_set


def nix_count(top: Path) -> int:
    """What Nix's deletePath counts for a tree whose files no other
    deleted path shares."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink <= 2:
                total += st.st_size
    st = os.lstat(top)
    return total if stat.S_ISDIR(st.st_mode) else (st.st_size if st.st_nlink <= 2 else 0)


def entries(root: Path) -> set[bytes]:
    return {b"/nix/store/" + n for n in os.listdir(os.fsencode(root / "nix/store"))} - {
        b"/nix/store/.links"}


def nix_freed(out: subprocess.CompletedProcess) -> tuple[int, float]:
    m = re.search(rb"(\d+) store paths deleted, ([\d.]+) MiB freed", out.stdout)
    assert m, out.stdout + out.stderr
    return int(m[1]), float(m[2])


def check_stop(pristine: Path, root: Path, done: dict, limit: int) -> None:
    """Deleted in order until the count passed the limit, not one path
    more; nothing invalidated that is still on disk."""
    sizes = [nix_count(pristine / p.lstrip("/")) for p in done["paths_list"]]
    assert sum(sizes[:-1]) <= limit < sum(sizes), (len(sizes), sum(sizes[:-1]), sum(sizes))
    assert sum(sizes) == done["nix_bytes_freed"] and done["stopped_at_limit"]
    deleted = {p.encode() for p in done["paths_list"]}
    assert entries(root) == entries(pristine) - deleted
    assert valid_set(root) == valid_set(pristine) - deleted


@pytest.mark.parametrize("optimise", [False, True])
def test_max_freed_stops_where_nix_stops(scratch, users, pipelines, optimise):
    base = scratch / "base"
    support.make_store(base, paths=1000, seed=91, quirks=0, roots=30, indirect=5, stale=0)
    if optimise:  # files with two links (one in .links): Nix counts them as freed
        oracle(base, "nix-store", "--optimise")
    limit = 100_000
    sizes = {}
    for p in entries(base):
        sizes[p] = nix_count(base / p.decode().lstrip("/"))
    biggest = max(sizes.values())
    copies = {name: scratch / name for name in ("nix", "standalone", "daemon")}
    for c in copies.values():
        subprocess.run(["cp", "-a", str(base), str(c)], check=True)

    # Nix on its copy: past the limit by less than one path.
    n, mib = nix_freed(oracle(copies["nix"], "nix-store", "--gc", "--max-freed", str(limit)))
    assert limit < mib * 2**20 + 0.005 * 2**20 and (mib - 0.005) * 2**20 <= limit + biggest
    assert valid_set(copies["nix"]) == valid_set(base) - (entries(base) - entries(copies["nix"]))

    q = [support.QUERY, "--standalone", "--root", str(copies["standalone"]), "--no-runtime", "gc",
         "--max-freed", str(limit), "--json"]
    plan = json.loads(subprocess.run(q + ["--dry-run"], capture_output=True, check=True).stdout)
    done = json.loads(subprocess.run(q + ["--yes"], capture_output=True, check=True).stdout)
    if not optimise:  # a file shared by deleted paths counts once: not per path
        check_stop(base, copies["standalone"], done, limit)
    assert plan["paths_list"] == done["paths_list"]
    assert plan["nix_bytes_freed"] == done["nix_bytes_freed"]
    # The dry run says the limit cut it (issue 15: it said false), and where.
    assert plan["stopped_at_limit"] and plan["limit"] == "max-freed" == done["limit"]
    assert plan["paths_over_limit"] == done["paths_over_limit"] > 0
    assert limit < done["nix_bytes_freed"] <= limit + biggest
    # Nix's figure and ours: both within one path of the limit.
    assert abs(done["nix_bytes_freed"] - mib * 2**20) <= biggest + 0.005 * 2**20

    p = Pipeline(copies["daemon"], scratch / "run")
    pipelines.append(p)
    p.start()
    out = p.query("gc", "--yes", "--max-freed", str(limit), "--json")
    assert out.returncode == 0, out.stderr
    by_daemon = json.loads(out.stdout)
    if not optimise:
        check_stop(base, copies["daemon"], by_daemon, limit)
    assert limit < by_daemon["nix_bytes_freed"] <= limit + biggest


def test_max_freed_zero_collects_nothing_as_with_nix(scratch):
    root = scratch / "store"
    support.make_store(root, paths=300, seed=92, quirks=0, roots=10, indirect=0, stale=0)
    twin = scratch / "twin"
    subprocess.run(["cp", "-a", str(root), str(twin)], check=True)
    assert nix_freed(oracle(twin, "nix-store", "--gc", "--max-freed", "0"))[0] == 0
    before = entries(root), valid_set(root)
    out = support.standalone(root, "gc", "--yes", "--max-freed", "0", "--json")
    assert json.loads(out.stdout)["paths"] == 0
    assert (entries(root), valid_set(root)) == before == (entries(twin), valid_set(twin))


# -- --keep-recent and --ensure-free (issue 15) ----------------------------------------

def test_keep_recent_keeps_recently_registered_paths_and_their_closure(scratch):
    """fast-nix-gc's --keep-recent: a dead path registered within the
    duration is kept with its closure (the GC's edges); the dry run says
    so, and the collection leaves exactly that."""
    import sqlite3
    from .test_why_cost import RefGraph
    root = scratch / "store"
    support.make_store(root, paths=400, seed=93, quirks=0, roots=10, indirect=0, stale=0)
    dead = {p for p in support.standalone(root, "dead").stdout.split()}
    valid_dead = sorted(dead & valid_set(root))
    graph = RefGraph(root)
    young = max(valid_dead, key=lambda p: len(graph.closure([p]) & dead))
    kept = graph.closure([young]) & dead
    assert len(kept) > 1
    db = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    db.execute("UPDATE ValidPaths SET registrationTime = strftime('%s', 'now') - 7200 "
               "WHERE path = ?", (young.decode(),))
    db.commit()
    db.close()
    q = ("gc", "--keep-recent", "1d", "--json")
    plan = json.loads(support.standalone(root, *q, "--dry-run").stdout)
    assert set(plan["paths_list"]) == {p.decode() for p in dead - kept}
    assert plan["kept_recent"] == len(kept)
    # Registered two hours ago: a 1-hour grace period keeps nothing.
    short = json.loads(support.standalone(root, "gc", "--keep-recent", "1h", "--json",
                                          "--dry-run").stdout)
    assert short["kept_recent"] == 0 and short["paths"] == len(dead)
    done = json.loads(support.standalone(root, *q, "--yes").stdout)
    assert done["paths_list"] == plan["paths_list"] and done["kept_recent"] == len(kept)
    assert kept <= valid_set(root) and not (dead - kept) & valid_set(root)


def test_ensure_free_stops_when_the_file_system_has_that_much_free(scratch):
    """--ensure-free SIZE or N%: collect until the store's file system has
    that much free, as Nix's auto-GC: the limit is what is missing (as Nix
    counts bytes freed); the dry run says exactly where it cuts."""
    root = scratch / "store"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=True)
    try:
        support.make_store(root, paths=800, seed=94, quirks=0, roots=10, indirect=0, stale=0)
        st = os.statvfs(root)
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        everything = json.loads(support.standalone(root, "gc", "--dry-run", "--json").stdout)
        assert everything["nix_bytes_freed"] > 200_000
        for want, missing in ((f"{free + 100_000}", 100_000),
                              (f"{(free + 150_000) * 100 / size:.4f}%", None)):
            plan = json.loads(support.standalone(root, "gc", "--dry-run", "--json",
                                                 "--ensure-free", want).stdout)
            assert plan["limit"] == "ensure-free" and plan["stopped_at_limit"], plan
            limit = plan["limit_bytes"]
            if missing is not None:
                assert limit == missing and plan["free_bytes"] == free
            else:
                assert abs(limit - 150_000) < size / 1e6 + 1
            assert limit < plan["nix_bytes_freed"] < everything["nix_bytes_freed"]
            assert plan["paths"] + plan["paths_over_limit"] == everything["paths"]
        # Enough free already: nothing to delete; the plan says the limit cut it all.
        plan = json.loads(support.standalone(root, "gc", "--dry-run", "--json",
                                             "--ensure-free", "1K").stdout)
        assert plan["paths"] == 0 and plan["limit_bytes"] == 0 and plan["stopped_at_limit"]
        # The tighter of --max-freed and --ensure-free wins.
        plan = json.loads(support.standalone(root, "gc", "--dry-run", "--json", "--max-freed",
                                             "50000", "--ensure-free", "100%").stdout)
        assert plan["limit"] == "max-freed" and plan["limit_bytes"] == 50_000
        before = valid_set(root)
        want = f"{free + 100_000}"
        plan = json.loads(support.standalone(root, "gc", "--dry-run", "--json",
                                             "--ensure-free", want).stdout)
        done = json.loads(support.standalone(root, "gc", "--yes", "--json",
                                             "--ensure-free", want).stdout)
        assert done["paths_list"] == plan["paths_list"] and done["stopped_at_limit"]
        assert done["nix_bytes_freed"] == plan["nix_bytes_freed"] > 100_000
        assert before - valid_set(root) == {p.encode() for p in done["paths_list"]} & before
    finally:
        subprocess.run(["umount", str(root)], check=True)
