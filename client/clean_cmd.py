"""gcroots-query clean: one-shot cleaning, like `nix-collect-garbage -d` or
`nh clean all` -- one command, one plan.  As root every user's profiles and
indirect roots, as anyone else their own:

1. prune profiles (--keep N, --keep-since D) with `profiles prune`'s planner
   and protections: never the current, booted or running generation;
2. age out result/direnv links (--roots-older-than D) with `roots prune`'s
   planner and removal: never one a running process or a current
   generation needs, nor one whose directory path goes through a symlink;
3. collect garbage (gc's options), which decides again under gc.lock.

The plan says what each profile and each link frees: the NAR bytes of the
store paths that become garbage through it alone (what several removals
free only together is a line of its own), then what is garbage already."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from gcroots import cliargs
from gcroots.nixdb import NixDBError
from gcroots.storepath import dir_of

from . import gc_cmd, indirect, term
from . import profiles as prof
from .format import human, plural, s, table, write_json
from .profiles_cmd import (CmdError, _age, _current_generation_closure, _date, _guard, _home,
                           _layout, _Planned, _plan_profiles, apply_planned, lock_options,
                           policy_options, roots_age_options, root_rows)


def register(sub, common) -> None:
    from .cli import subcommand
    c = subcommand(sub, "clean", "prune profiles, age out result links, collect: one plan",
                   "One-shot cleaning, like nix-collect-garbage -d or nh clean all: prune "
                   "profile generations (--keep, --keep-since; never the current, booted or "
                   "running one), remove result/direnv links older than --roots-older-than "
                   "(never one a running process or a current generation needs), then collect "
                   "garbage. As root every user's profiles and links, as anyone else their "
                   "own (collecting needs root or the admin group). One plan first, grouped by "
                   "profile and link, with the NAR bytes each frees; on a terminal without "
                   "--yes it asks.",
                   "  gcroots-query clean --keep 5 --keep-since 7d --dry-run\n"
                   "  sudo gcroots-query clean --keep 3 --roots-older-than 30d --yes\n"
                   "  gcroots-query clean --keep-since 14d --max-freed 20G --ask\n"
                   "  gcroots-query clean --dry-run --json | jq .total",
                   parents=[common, lock_options()])
    policy_options(c)
    roots_age_options(c, flag="--roots-older-than")
    gc_cmd.add_confirm_options(c)
    gc_cmd.add_collection_options(c)
    c.set_defaults(handler=_guard(cmd_clean), no_runtime_check=False, profiles=[])


@dataclass
class Forecast:
    """NAR bytes (and paths) that become garbage: per group (a profile's
    deleted generations, one link), shared by several, garbage already
    (`garbage` counts the `unregistered` store entries too: no NAR size, but
    the collection deletes them and Nix's sentence counts them)."""
    frees: dict[tuple[str, bytes], tuple[int, int]] = field(default_factory=dict)
    shared: tuple[int, int] = (0, 0)
    garbage: tuple[int, int] = (0, 0)
    unregistered: int = 0
    kept_recent: int = 0

    @property
    def total(self) -> tuple[int, int]:
        parts = [*self.frees.values(), self.shared, self.garbage]
        return sum(n for n, _ in parts), sum(b for _, b in parts)


def cmd_clean(args) -> int:
    if args.match is not None and args.older_than is None:
        raise CmdError("clean --match needs --roots-older-than DURATION (it picks among the "
                       "links that removes)", 2)
    if (refused := gc_cmd.may_ask(args, "clean")) is not None:
        return refused
    layout = _layout(args)
    now = time.time()
    everyone = os.geteuid() == 0
    rows = root_rows(args)
    runtime = prof.runtime_paths(rows)
    if args.keep is None and args.keep_since is None and args.older_than is None:
        found = prof.Found()  # nothing to prune or age: no profile is looked at
    elif everyone and layout.root == b"/":
        found = prof.discover_everyone(layout.profiles_dir)
    else:
        found = prof.discover(layout.profiles_dir, home=_home(layout))
    if not everyone:  # yours: the profiles you may modify
        found.profiles = [p for p in found.profiles if prof.may_modify(p)]
    for w in found.warnings:
        print(f"gcroots-query: warning: {w}", file=sys.stderr)
    policy = None
    if args.keep is not None or args.keep_since is not None:
        policy = prof.Policy(args.keep, args.keep_since)
    planned: list[_Planned] = []
    protected = None
    if policy is not None:
        links = [os.fsencode(p) for p in args.system_link] if args.system_link \
            else prof.system_links_from_env()
        protected = prof.Protected(system=prof.system_paths(links, layout.store_dir),
                                   runtime=runtime)
        planned = _plan_profiles(args, layout, policy, protected, now, found)
    verdicts: list[indirect.Verdict] = []
    if args.older_than is not None:
        verdicts = indirect.plan(
            indirect.scan(layout), older_than=args.older_than, now=now,
            match=None if args.match is None else os.fsencode(args.match),
            uid=None if everyone else os.geteuid(), runtime=runtime,
            in_profiles=_current_generation_closure(layout, found),
            older_text=cliargs.format_duration(args.older_than))
    forecast = predict(args, layout, rows, planned, verdicts)
    doomed_gens = sum(1 for p in planned for v in p.verdicts if v.delete)
    doomed_links = [v for v in verdicts if v.delete]
    if args.dry_run:
        if args.json:
            write_json(plan_json(args, planned, verdicts, forecast, [], None))
        else:
            sys.stdout.write(plan_text(args, planned, verdicts, forecast, now))
        return 0
    if args.yes and not args.json:  # for the log: what it was about to do
        sys.stderr.write(plan_text(args, planned, verdicts, forecast, now))
    if not args.yes:
        what = [plural(doomed_gens, "generation") if doomed_gens else "",
                plural(len(doomed_links), "link") if doomed_links else ""]
        question = (f"Delete {' and '.join(w for w in what if w)} and collect garbage?"
                    if any(what) else "Collect garbage?")
        if not term.confirm(question, plan_text(args, planned, verdicts, forecast, now)):
            print("nothing was deleted", file=sys.stderr)
            return 0
    rc = apply_planned(args, layout, policy, protected, planned, now, say_removed=False)
    removals = [indirect.remove(v) for v in doomed_links]
    for r in removals:
        if r.error and not r.changed:
            print(f"gcroots-query: {s(r.root.link)}: {r.error}", file=sys.stderr)
            rc = max(rc, 1)
    collected, failure = None, None
    try:
        collected = gc_cmd.request(args, gc_cmd.options_of(args))
    except gc_cmd.Failed as e:
        failure = e
        if e.code == 3 and not everyone:  # collecting is root's and the admin group's
            print(f"gcroots-query: note: {e}; what you pruned is garbage for the next collection "
                  "(root's, or the timer's)", file=sys.stderr)
        else:
            print(f"gcroots-query: {e}", file=sys.stderr)
            rc = max(rc, e.code)
    if args.json:
        gc = ({"error": str(failure), "exit": failure.code} if failure else
              dict(collected[0], paths_list=[s(r[0]) for r in collected[1]]))
        write_json(plan_json(args, planned, verdicts, forecast, removals, gc))
        return rc
    removed = [r for r in removals if r.removed]
    lines = [f"deleted {plural(sum(len(p.deleted) for p in planned), 'generation')} in "
             f"{plural(sum(1 for p in planned if p.deleted), 'profile')}; removed "
             f"{plural(len(removed), 'link')}"]
    if collected is not None:
        lines += gc_cmd.summary_lines(collected[0])
    sys.stdout.write("".join(line + "\n" for line in lines))
    return rc


def predict(args, layout, rows, planned: list[_Planned], verdicts) -> Forecast:
    """What becomes garbage, from the store graph: the closure of every root
    now against that of the roots left once the planned generations and
    links are gone (a root is a label: a generation link, a result link)."""
    from gcroots.daemon import engine
    from gcroots.daemon.nixconf import settings_from
    from gcroots.daemon.gc import recent_closure
    from gcroots.daemon.store import StoreDB, list_store

    groups: dict[tuple[str, bytes], tuple[set[bytes], set[bytes]]] = {}  # -> (labels, paths)
    def labels(path: bytes) -> set[bytes]:  # as the helper names it: logical in a chroot
        inside = layout.root != b"/" and path.startswith(layout.root + b"/")
        return {path, path[len(layout.root):]} if inside else {path}

    for p in planned:
        gone = [v for v in p.verdicts if v.delete]
        if gone:
            groups[("profile", p.path)] = (
                set().union(*(labels(os.path.join(dir_of(p.path), v.generation.name))
                              for v in gone)),
                {v.store_path for v in gone if v.store_path is not None})
    for v in verdicts:
        if v.delete:
            groups[("root", v.root.link)] = (labels(v.root.link), {v.root.store_path})
    removed = set().union(*(labels for labels, _ in groups.values()))
    settings = settings_from(args)
    try:
        db = StoreDB.open(layout, create_files=False)
    except NixDBError as e:
        raise CmdError(f"{e}: cannot tell what the plan frees; nothing was deleted") from None
    try:
        with db.snapshot():
            g = engine.store_graph(db, settings)
        recent = set() if args.keep_recent is None else set(
            recent_closure(db, g, settings, args.keep_recent).nonzero()[0].tolist())
    except engine.IncompleteRoots as e:
        raise CmdError(f"{e}; nothing was deleted") from None
    finally:
        db.close()
    nodes = lambda paths: [g.index[p] for p in paths if p in g.index]  # noqa: E731
    live_now = g.closure(nodes(path for _, path, _ in rows), settings)
    live_after = g.closure(nodes(path for label, path, _ in rows if label not in removed),
                           settings)
    newly = live_now - live_after - recent
    reach: dict[int, int] = {}
    per_group = {}
    for key, (_, paths) in groups.items():
        per_group[key] = g.closure(nodes(paths), settings) & newly
        for n in per_group[key]:
            reach[n] = reach.get(n, 0) + 1
    size = lambda ns: (len(ns), int(sum(g.sizes[n] for n in ns)))  # noqa: E731
    out = Forecast()
    for key, ns in per_group.items():
        out.frees[key] = size({n for n in ns if reach[n] == 1})
    out.shared = size({n for n, k in reach.items() if k > 1} | (newly - set(reach)))
    garbage = set(range(len(g.paths))) - live_now
    # Entries the DB does not know go too (unless a temp root names them).
    rooted = {path for _, path, _ in rows}
    out.unregistered = sum(1 for name in list_store(layout.real_store_dir)
                           if (path := layout.store_dir + b"/" + name) not in g.index
                           and path not in rooted)
    n, nbytes = size(garbage - recent)
    out.garbage = (n + out.unregistered, nbytes)
    out.kept_recent = len(garbage & recent)
    return out


def _policy_line(args) -> str:
    parts = []
    if args.keep is not None or args.keep_since is not None:
        parts.append(f"profiles: keep {prof.Policy(args.keep, args.keep_since).describe()} of "
                     "each, and always the current, booted and running generations")
    if args.older_than is not None:
        parts.append(f"links: remove result/direnv roots older than "
                     f"{cliargs.format_duration(args.older_than)} (never running or in a "
                     "current generation)")
    parts.append("then collect garbage" + ("" if os.geteuid() == 0 else
                                           " (root's and the admin group's)"))
    return "; ".join(parts)


def plan_text(args, planned, verdicts, f: Forecast, now: float) -> str:
    rows = []
    for p in planned:
        gone = sum(1 for v in p.verdicts if v.delete)
        n, nbytes = f.frees.get(("profile", p.path), (0, 0))
        rows.append((s(p.path), f"{gone} of {len(p.verdicts)} generations", "",
                     p.skipped or ("" if p.verdicts else "no generations"),
                     human(nbytes) if gone else ""))
        for v in p.verdicts:
            g = v.generation
            rows.append((f"  {g.number} -> {s(v.store_path) if v.store_path else '-'}",
                         "DELETE" if v.delete else "KEEP", _date(g.mtime), ", ".join(v.reasons),
                         ""))
    for v in verdicts:
        r = v.root
        n, nbytes = f.frees.get(("root", r.link), (0, 0))
        rows.append((f"{s(r.link)} -> {s(r.store_path)}", "DELETE" if v.delete else "KEEP",
                     f"{_age(now - r.mtime)} ago ({r.kind})", ", ".join(v.reasons),
                     human(nbytes) if v.delete else ""))
    if f.shared[0]:
        rows.append(("freed only by several of the above together", "", "", "",
                     human(f.shared[1])))
    unregistered = (f", {plural(f.unregistered, 'unregistered entry', 'unregistered entries')}"
                    if f.unregistered else "")
    rows.append((f"garbage already ({plural(f.garbage[0] - f.unregistered, 'valid path')}"
                 f"{unregistered})", "", "",
                 f"{plural(f.kept_recent, 'more')} kept by --keep-recent" if f.kept_recent
                 else "", human(f.garbage[1])))
    total = f.total
    rows.append((f"total: {plural(total[0], 'store path')}", "", "", "", human(total[1])))
    note = ""
    if args.max_freed is not None or args.ensure_free is not None:
        note = ("the collection stops at --max-freed/--ensure-free (as Nix counts bytes); ")
    return (f"{_policy_line(args)}\n"
            + table(rows, ("PROFILE / GENERATION / LINK", "ACTION", "DATE / AGE", "WHY",
                           "FREES (NAR)"), right=(4,))
            + f"({note}NAR sizes from the Nix DB; the collection decides again under "
              "gc.lock)\n")


def plan_json(args, planned, verdicts, f: Forecast, removals, gc) -> dict:
    done = {r.root.link: r for r in removals}
    out = {"dry_run": bool(args.dry_run), "everyone": os.geteuid() == 0, "profiles": [],
           "links": [], "shared": _sizes(f.shared), "garbage": dict(_sizes(f.garbage), unregistered=f.unregistered),
           "kept_recent": f.kept_recent, "total": _sizes(f.total), "gc": gc}
    for p in planned:
        out["profiles"].append({
            "profile": s(p.path), "skipped": p.skipped, "error": p.error,
            "frees": _sizes(f.frees.get(("profile", p.path), (0, 0))),
            "generations": [{"number": v.generation.number, "time": v.generation.mtime,
                             "date": _date(v.generation.mtime),
                             "action": "delete" if v.delete else "keep",
                             "reasons": list(v.reasons),
                             "store_path": None if v.store_path is None else s(v.store_path),
                             "deleted": v.generation.number in p.deleted}
                            for v in p.verdicts]})
    for v in verdicts:
        r, rem = v.root, done.get(v.root.link)
        out["links"].append({
            "link": s(r.link), "store_path": s(r.store_path), "kind": r.kind, "uid": r.uid,
            "time": r.mtime, "action": "delete" if v.delete else "keep",
            "reasons": list(v.reasons), "frees": _sizes(f.frees.get(("root", r.link), (0, 0))),
            "removed": bool(rem and rem.removed), "error": rem.error if rem else None})
    return out


def _sizes(pair: tuple[int, int]) -> dict:
    return {"paths": pair[0], "nar_bytes": pair[1]}

