"""gcroots-query profiles … and roots prune: client-side commands that run
with the caller's own rights (never through the privileged helper).

  profiles list [PROFILE…]                      generations, sizes, current marker
  profiles delete-generations PROFILE SPEC…     exactly nix-env --delete-generations
  profiles prune [--keep N] [--keep-since D] (PROFILE… | --all)
  roots prune --older-than D [--match GLOB]     the caller's own old result links

(`clean`, client/clean_cmd.py, plans with the same pieces for every user.)

Exit codes: 0 done, 1 error, 2 usage, 3 permission refused, 4 lock busy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from gcroots import cliargs
from gcroots.layout import StoreLayout
from gcroots.nixdb import NixDBError, connect_ro
from gcroots.protocol.admin import Status
from gcroots.storepath import abs_path

from . import conn, indirect, term
from . import profiles as prof
from .format import error, human, plural, s, write_json

DEFAULT_LOCK_TIMEOUT = 30.0
MAX_LOCK_TIMEOUT = 86400.0


class CmdError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- argument parsing -------------------------------------------------------------

def layout_options() -> argparse.ArgumentParser:
    """Accepted after the subcommand too; without them the top-level
    options apply (SUPPRESS keeps those)."""
    from .cli import path_arg
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--root", default=argparse.SUPPRESS, metavar="DIR", type=path_arg("root"),
                      help="physical root of a chroot store (like nix-store --store DIR)")
    opts.add_argument("--store-dir", default=argparse.SUPPRESS, metavar="DIR",
                      type=path_arg("store_dir"), help="logical store dir (default /nix/store)")
    opts.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                      type=path_arg("state_dir"), help="logical state dir (default /nix/var/nix)")
    return opts


def lock_options() -> argparse.ArgumentParser:
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--lock-timeout", type=cliargs.seconds(maximum=MAX_LOCK_TIMEOUT),
                      default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
                      help="wait at most this long for a profile's lock held by another "
                           "process, e.g. nix-env")
    return opts


def runtime_check_option(p) -> None:
    p.add_argument("--no-runtime-check", action="store_true",
                   help="do not ask gcrootsd which store paths running processes use (without "
                        "that answer nothing is deleted)")


def policy_options(p, *, keep_flag: str = "--keep") -> None:
    """What profile pruning keeps: profiles prune's and clean's."""
    p.add_argument(keep_flag, dest="keep", type=cliargs.count(), metavar="N",
                   help="keep the N highest-numbered generations of each profile")
    p.add_argument("--keep-since", type=cliargs.duration(positive=False), metavar="DURATION",
                   help="keep generations newer than this (e.g. 14d, 2w, 1w2d, 12h, 3mo)")
    p.add_argument("--system-link", action="append", metavar="PATH",
                   help="a link whose generation is never deleted (default: /run/current-system "
                        "and /run/booted-system, or $GCROOTS_SYSTEM_LINKS, colon-separated; "
                        "repeatable)")


def roots_age_options(p, *, flag: str = "--older-than") -> None:
    """Which indirect roots go: roots prune's and clean's."""
    p.add_argument(flag, dest="older_than", type=cliargs.duration(positive=False),
                   metavar="DURATION",
                   help="result/direnv links (re)made longer ago than this (e.g. 30d)")
    p.add_argument("--match", metavar="GLOB",
                   help="only links whose path matches (fnmatch, e.g. '*/.direnv/*')")


def register(sub, common) -> None:
    from .cli import subcommand
    layout_opts, lock_opts = layout_options(), lock_options()
    p = subcommand(sub, "profiles", "Nix profiles and their generations (your own rights)",
                   "List and prune Nix profiles' generations, with your own rights (never "
                   "through the privileged helper).",
                   "  gcroots-query profiles list\n"
                   "  gcroots-query profiles prune --keep 5 --keep-since 30d --all --dry-run")
    psub = p.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")

    ls = subcommand(psub, "list", "generations: number, date, current, store path, closure size",
                    "Every generation of each profile: its number, date, whether it is the "
                    "current one, its store path and the closure's NAR size. Without PROFILE, "
                    "every profile you can see (those under the state dir, "
                    "~/.local/state/nix/profiles and ~/.nix-profile's).",
                    "  gcroots-query profiles list\n"
                    "  gcroots-query profiles list /nix/var/nix/profiles/system --json",
                    parents=[common, layout_opts])
    ls.add_argument("profiles", nargs="*", metavar="PROFILE",
                    help="profiles to list (default: every profile you can see)")
    ls.add_argument("--no-size", action="store_true", help="skip closure sizes (no DB reads)")
    ls.set_defaults(handler=_guard(cmd_list))

    dg = subcommand(psub, "delete-generations", "exactly nix-env -p PROFILE --delete-generations",
                    "Delete generations exactly as `nix-env -p PROFILE --delete-generations "
                    "SPEC...` does (old, <N>d, +<N>, numbers; never the current one), under "
                    "the profile's lock; where Nix 2.8 would go wrong it refuses first.",
                    "  gcroots-query profiles delete-generations ~/.local/state/nix/profiles/profile +5\n"
                    "  gcroots-query profiles delete-generations /nix/var/nix/profiles/system 30d",
                    parents=[common, layout_opts, lock_opts])
    dg.add_argument("profile", metavar="PROFILE", help="the profile (its link, as nix-env -p)")
    dg.add_argument("spec", nargs="+", metavar="SPEC",
                    help="old | <N>d | +<N> | <N>... (nix-env's forms)")
    dg.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    dg.set_defaults(handler=_guard(cmd_delete_generations))

    pr = subcommand(psub, "prune", "keep the last N and/or those newer than D; never the "
                    "current, booted or running generation",
                    "Delete the generations no rule keeps: the union of the last N and those "
                    "newer than DURATION stays, and always the current generation, those "
                    "/run/current-system and /run/booted-system point at, and any a running "
                    "process uses (asked from gcrootsd).",
                    "  gcroots-query profiles prune --keep 5 --keep-since 30d --all --dry-run\n"
                    "  gcroots-query profiles prune --keep 3 /nix/var/nix/profiles/system --ask --gc",
                    parents=[common, layout_opts, lock_opts])
    pr.add_argument("profiles", nargs="*", metavar="PROFILE", help="profiles to prune (or --all)")
    pr.add_argument("--all", action="store_true",
                    help="every profile you may modify (others are reported as skipped)")
    policy_options(pr)
    runtime_check_option(pr)
    mode = pr.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    mode.add_argument("--ask", action="store_true", help="print the plan and ask before deleting")
    pr.add_argument("--gc", action="store_true", help="then collect garbage through gcrootsd")
    pr.set_defaults(handler=_guard(cmd_prune))

    # `roots` stays the query it is; `roots prune ...` is client-side.
    roots = sub.choices["roots"]
    for flag, nargs in (("--older-than", 1), ("--match", 1), ("--dry-run", 0), ("--ask", 0),
                        ("--no-runtime-check", 0)):
        roots.add_argument(flag, nargs=nargs, action=_PruneOnly, help=argparse.SUPPRESS)
    rsub = roots.add_subparsers(dest="roots_action", metavar="[ACTION]")
    rp = subcommand(rsub, "prune", "remove your own old result/direnv links",
                    "Remove your own indirect roots (result and direnv links) older than "
                    "DURATION: never one a running process or a current profile generation "
                    "needs, nor one whose directory path goes through a symbolic link. The "
                    "gcroots/auto entry left dangling is a stale link the next collection "
                    "removes.",
                    "  gcroots-query roots prune --older-than 30d --dry-run\n"
                    "  gcroots-query roots prune --older-than 90d --match '*/.direnv/*' --ask",
                    parents=[common, layout_opts])
    roots_age_options(rp)
    runtime_check_option(rp)
    mode = rp.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    mode.add_argument("--ask", action="store_true", help="print the plan and ask before deleting")
    rp.set_defaults(handler=_guard(cmd_roots_prune))


class _PruneOnly(argparse.Action):
    """`roots --older-than 30d`: said to be prune's, not taken for an action."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} belongs to `roots prune` (gcroots-query roots prune "
                     f"{option_string} ...)")


def _guard(fn):
    """Errors become one clear line (a JSON object with --json) and an exit
    code, never a traceback."""
    def handler(args) -> int:
        try:
            return fn(args)
        except CmdError as e:
            return error(args, str(e), e.code)
        except prof.ProfileError as e:
            return error(args, str(e), e.exit_code, deleted=e.deleted)
        except KeyboardInterrupt:
            return error(args, "interrupted", 130)
    return handler


# -- shared helpers -----------------------------------------------------------------

def _layout(args) -> StoreLayout:
    try:
        return StoreLayout.make(args.store_dir, args.state_dir, args.root)
    except ValueError as e:
        raise CmdError(str(e), 2) from None


def _home(layout: StoreLayout) -> bytes | None:
    # A chroot store's profiles do not live in the host's home directory.
    return prof.home_dir() if layout.root == b"/" else None


def _profile_paths(args, layout: StoreLayout) -> prof.Found:
    """The profiles named, or else discovered (then with the identity of
    the directory each was found in)."""
    if args.profiles:
        return prof.Found([prof.absolute(p) for p in args.profiles])
    found = prof.discover(layout.profiles_dir, home=_home(layout))
    for w in found.warnings:
        print(f"gcroots-query: warning: {w}", file=sys.stderr)
    return found


def _date(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _out(text: str) -> None:
    sys.stdout.buffer.write(os.fsencode(text))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def apply_planned(args, layout, policy, protected, planned: list[_Planned], now: float, *,
                  say_removed: bool) -> int:
    """Delete the planned generations, each under its profile's lock and
    planned again there (prof.apply_prune); the worst exit code."""
    rc = 0
    for p in planned:
        if not any(v.delete for v in p.verdicts):
            continue
        try:
            p.deleted = prof.apply_prune(p.path, p.verdicts, policy, protected, now,
                                         layout.store_dir, identity=p.identity,
                                         lock_timeout=args.lock_timeout, on_wait=_stderr)
        except prof.ProfileError as e:
            p.error, p.deleted = str(e), e.deleted
            _stderr(f"gcroots-query: {e}")
            rc = max(rc, e.exit_code)
        if say_removed:
            for n in p.deleted:
                _stderr(f"removed generation {n} of {s(p.path)}")
    return rc


def _hint_linked_profile(profile: prof.Profile) -> None:
    """`-p ~/.nix-profile` names a link to a profile, not a profile: Nix
    then finds no generations.  Say so instead of silently doing nothing."""
    if profile.generations or profile.link is None:
        return
    other = abs_path(profile.link, profile.dir)
    try:
        with prof.ProfileDir(other) as d:
            target = d.read()
    except prof.ProfileError:
        return
    if target.generations:
        _stderr(f"gcroots-query: note: {s(profile.path)} has no generations; it links to the "
                f"profile {s(other)}, which has {len(target.generations)}")


def _check_ask(args) -> None:
    if args.ask and args.json:
        raise CmdError("--ask shows the plan to a person; use --dry-run --json for scripts", 2)
    if args.ask and not term.interactive():
        raise CmdError("--ask needs a terminal to ask on; nothing was changed", 2)


def runtime_roots(args, layout: StoreLayout) -> dict[bytes, list[bytes]] | None:
    """Store paths that running processes use, from gcrootsd (or, with
    --standalone and root, from an in-process /proc scan).  None when the
    check is switched off; an error when we cannot get a complete answer."""
    if args.no_runtime_check:
        return None
    return prof.runtime_paths(root_rows(args, "use --no-runtime-check to go ahead without "
                                              "this check"))


def root_rows(args, skip: str = "") -> list[tuple[bytes, ...]]:
    """Every root, (label, store path, kind), from gcrootsd (or, with
    --standalone and root, from an in-process scan); CmdError without a
    complete answer (`skip`: how to do without)."""
    skip = f"; {skip}" if skip else ""
    if args.standalone:
        if os.geteuid() != 0:
            raise CmdError("--standalone cannot see other users' processes without root, so it "
                           f"cannot tell which generations are running or what they use{skip}")
        from . import standalone
        ns = argparse.Namespace(**{**vars(args), "no_runtime": False})
        try:
            answer = standalone.answer(ns, "roots", {}, ())
        except conn.DaemonError as e:
            raise CmdError(f"cannot scan for runtime roots: {e}{skip}") from None
    else:
        try:
            answer = conn.request(args.socket or conn.default_socket(), "roots")
        except conn.DaemonError as e:
            raise CmdError(f"cannot ask gcrootsd which store paths are in use: {e}; refusing to "
                           f"delete anything{skip}") from None
    if answer.status != Status.OK:
        raise CmdError(f"gcrootsd could not list the runtime roots ({answer.message or answer.status.name}); "
                       f"refusing to delete anything{skip}")
    return answer.rows


# -- profiles list ------------------------------------------------------------------

def cmd_list(args) -> int:
    layout = _layout(args)
    found = _profile_paths(args, layout)
    db = None
    if not args.no_size:
        try:
            db = connect_ro(layout.db_path, create_files=False)
        except NixDBError as e:
            _stderr(f"gcroots-query: warning: no closure sizes: {e}")
    rc, listing = 0, []
    try:
        for path, profile, err in prof.generations_of(found.profiles, found.identity):
            if err is not None:
                _stderr(f"gcroots-query: {err}")
                rc = 1
                listing.append({"profile": s(path), "error": err})
                continue
            if args.profiles:
                _hint_linked_profile(profile)
            listing.append(_list_entry(profile, layout, db))
    finally:
        if db is not None:
            db.close()
    if args.json:
        write_json(listing)
    else:
        _list_text(listing)
    return rc


def _list_entry(profile: prof.Profile, layout: StoreLayout, db) -> dict:
    gens = []
    for g in profile.generations:
        sp = g.store_path(layout.store_dir)
        size = prof.closure_size(db, sp) if db is not None and sp is not None else None
        gens.append({"number": g.number, "time": g.mtime, "date": _date(g.mtime),
                     "current": g.number == profile.current,
                     "store_path": None if sp is None else s(sp),
                     "target": None if g.target is None else s(g.target),
                     "closure_paths": None if size is None else size[0],
                     "closure_bytes": None if size is None else size[1]})
    return {"profile": s(profile.path), "current": profile.current,
            "link": None if profile.link is None else s(profile.link), "generations": gens}


def _list_text(listing: list[dict]) -> None:
    for i, entry in enumerate(listing):
        if "error" in entry:
            continue
        _out(("\n" if i else "") + entry["profile"] + "\n")
        if not entry["generations"]:
            _out("  (no generations)\n")
            continue
        _out(f"  {'GEN':>5}  {'DATE':19}  {'':9}  {'CLOSURE':>10}  STORE PATH\n")
        for g in entry["generations"]:
            size = "?" if g["closure_bytes"] is None else human(g["closure_bytes"])
            mark = "(current)" if g["current"] else ""
            if g["target"] is None:
                where = "(not a symlink)"
            else:
                where = g["store_path"] or f"-> {g['target']} (not a store path)"
            _out(f"  {g['number']:>5}  {g['date']}  {mark:9}  {size:>10}  {where}\n")
    sys.stdout.flush()


# -- profiles delete-generations ----------------------------------------------------

def cmd_delete_generations(args) -> int:
    spec = prof.parse_spec(args.spec)
    path = prof.absolute(args.profile)
    verb = "would remove" if args.dry_run else "removing"
    try:
        result = prof.delete_generations(
            path, spec, dry_run=args.dry_run, lock_timeout=args.lock_timeout,
            on_wait=_stderr, on_delete=lambda n, dry: _stderr(f"{verb} profile version {n}"))
    except prof.ProfileError as e:
        if e.deleted and not args.json:  # with --json: the error's "deleted"
            _stderr(f"gcroots-query: generations {', '.join(map(str, e.deleted))} of "
                    f"{s(path)} were deleted before the error")
        raise
    _hint_linked_profile(result.profile)
    if args.json:
        write_json({"profile": s(path), "deleted": result.deleted, "dry_run": args.dry_run})
    return 0


# -- profiles prune -----------------------------------------------------------------

@dataclass
class _Planned:
    path: bytes
    verdicts: list[prof.Verdict]
    deleted: list[int]
    error: str | None = None
    skipped: str | None = None
    identity: tuple[int, int] | None = None   # the directory the plan read


def cmd_prune(args) -> int:
    if args.keep is None and args.keep_since is None:
        raise CmdError("say what to keep: --keep N and/or --keep-since DURATION", 2)
    if args.all == bool(args.profiles):
        raise CmdError("name the profiles to prune, or --all (not both)", 2)
    if args.gc and args.standalone:
        raise CmdError("--gc collects through gcrootsd; drop --standalone (or run "
                       "`nix-store --gc` afterwards)", 2)
    _check_ask(args)
    layout = _layout(args)
    policy = prof.Policy(args.keep, args.keep_since)
    now = time.time()
    links = [os.fsencode(p) for p in args.system_link] if args.system_link \
        else prof.system_links_from_env()
    protected = prof.Protected(system=prof.system_paths(links, layout.store_dir))
    runtime = runtime_roots(args, layout)
    protected.runtime = runtime or {}
    protected.runtime_checked = runtime is not None
    planned = _plan_profiles(args, layout, policy, protected, now)
    doomed = sum(1 for p in planned for v in p.verdicts if v.delete)
    if not args.json:
        _prune_text(planned, layout, protected, policy)
    if args.dry_run or doomed == 0:
        gc = _collect(args) if args.gc and not args.dry_run else None
        if args.json:
            _prune_json(planned, layout, protected, args, gc)
        elif doomed == 0:
            _out("nothing to delete\n")
        return 1 if gc is not None and not gc["ok"] else 0
    if args.ask and not term.confirm(f"Delete {plural(doomed, 'generation')}?"):
        _stderr("nothing was deleted")
        return 0
    rc = apply_planned(args, layout, policy, protected, planned, now, say_removed=True)
    total = sum(len(p.deleted) for p in planned)
    gc = _collect(args) if args.gc else None
    if gc is not None and not gc["ok"]:
        rc = max(rc, 1)
    if args.json:
        _prune_json(planned, layout, protected, args, gc)
    else:
        _out(f"deleted {plural(total, 'generation')} in "
             f"{plural(sum(1 for p in planned if p.deleted), 'profile')}\n")
    return rc


def _plan_profiles(args, layout, policy, protected, now,
                   found: prof.Found | None = None) -> list[_Planned]:
    """Plan every profile first; an explicitly named profile we cannot read
    or modify stops everything before anything is deleted.  `found`: the
    profiles to plan (default: those named, or every one the caller sees)."""
    out = []
    explicit = bool(getattr(args, "profiles", None))
    found = found or _profile_paths(args, layout)
    for path in found.profiles:
        if not explicit and not prof.may_modify(path):
            out.append(_Planned(path, [], [], skipped="not yours to modify"))
            continue
        try:
            # A discovered profile must still be in the directory the walk
            # listed; the apply step checks the one read here again.
            with prof.ProfileDir(path, found.identity.get(path)) as d:
                profile = d.read()
                identity = d.identity
        except prof.ProfileError as e:
            if explicit:
                raise
            out.append(_Planned(path, [], [], skipped=str(e)))
            continue
        verdicts = prof.plan_prune(profile, policy, protected, now, layout.store_dir)
        if explicit and not args.dry_run and any(v.delete for v in verdicts) \
                and not prof.may_modify(path):
            raise prof.refused(profile.dir, os.stat(profile.dir))
        out.append(_Planned(path, verdicts, [], identity=identity))
    return out


def _prune_text(planned, layout, protected, policy) -> None:
    if not protected.runtime_checked:
        _stderr("gcroots-query: warning: runtime roots not checked (--no-runtime-check)")
    _out(f"keeping {policy.describe()}, the current generation, the system's and the running ones\n")
    for p in planned:
        _out(f"\n{s(p.path)}\n")
        if p.skipped:
            _out(f"  skipped: {p.skipped}\n")
            continue
        if not p.verdicts:
            _out("  (no generations)\n")
            continue
        _out(f"  {'GEN':>5}  {'DATE':19}  {'ACTION':6}  {'REASON':34}  STORE PATH\n")
        for v in p.verdicts:
            g = v.generation
            reason = ", ".join(v.reasons)
            _out(f"  {g.number:>5}  {_date(g.mtime)}  {'DELETE' if v.delete else 'KEEP':6}  "
                 f"{reason:34}  {s(v.store_path) if v.store_path else '-'}\n")
    n = sum(1 for p in planned for v in p.verdicts if v.delete)
    _out(f"\nplan: delete {n} of {plural(sum(len(p.verdicts) for p in planned), 'generation')}\n")
    sys.stdout.flush()


def _prune_json(planned, layout, protected, args, gc) -> None:
    out = {"dry_run": bool(args.dry_run), "runtime_checked": protected.runtime_checked,
           "system": {s(k): [s(x) for x in v] for k, v in protected.system.items()},
           "profiles": [], "gc": gc}
    for p in planned:
        entry = {"profile": s(p.path), "generations": []}
        if p.skipped:
            entry["skipped"] = p.skipped
        if p.error:
            entry["error"] = p.error
        for v in p.verdicts:
            g = v.generation
            entry["generations"].append({
                "number": g.number, "time": g.mtime, "date": _date(g.mtime),
                "action": "delete" if v.delete else "keep", "reasons": list(v.reasons),
                "store_path": None if v.store_path is None else s(v.store_path),
                "deleted": g.number in p.deleted})
        out["profiles"].append(entry)
    write_json(out)


def _collect(args, opts: dict | None = None) -> dict:
    """The collection after pruning (gc_cmd's), its summary on stderr; for
    --json {"ok": ..., the summary or "error" and "exit"}."""
    from .gc_cmd import Failed, request, summary_lines
    try:
        summary, rows = request(args, dict(opts or {"dry_run": False}))
    except Failed as e:
        _stderr(f"gcroots-query: the collection failed: {e}; what was pruned stays pruned "
                "(its garbage goes with the next collection)")
        return {"ok": False, "error": str(e), "exit": e.code}
    for line in summary_lines(summary):
        _stderr(line)
    return {"ok": True, **summary, "paths_list": [s(r[0]) for r in rows]}


# -- roots prune ---------------------------------------------------------------------

def cmd_roots_prune(args) -> int:
    if args.older_than is None:
        raise CmdError("roots prune needs --older-than DURATION (e.g. 30d)", 2)
    _check_ask(args)
    layout = _layout(args)
    now = time.time()
    in_profiles = _current_generation_closure(layout)
    scanned = indirect.scan(layout)

    def plan(runtime: dict[bytes, list[bytes]]) -> list[indirect.Verdict]:
        return indirect.plan(scanned, older_than=args.older_than, now=now,
                             match=None if args.match is None else os.fsencode(args.match),
                             uid=os.geteuid(), runtime=runtime, in_profiles=in_profiles,
                             older_text=cliargs.format_duration(args.older_than))
    # What running processes use can only keep more: gcrootsd (a full scan)
    # is asked only when there is something to remove.
    verdicts, runtime = plan({}), None
    if any(v.delete for v in verdicts) and (runtime := runtime_roots(args, layout)) is not None:
        verdicts = plan(runtime)
    doomed = [v for v in verdicts if v.delete]
    if args.no_runtime_check and not args.json:
        _stderr("gcroots-query: warning: runtime roots not checked (--no-runtime-check)")
    if not args.json:
        _roots_text(verdicts, now)
    if args.dry_run or not doomed:
        if args.json:
            _roots_json(verdicts, [], args, scanned, runtime is not None)
        elif not doomed:
            _out("nothing to remove\n")
        return 0
    if args.ask and not term.confirm(f"Remove {plural(len(doomed), 'link')}?"):
        _stderr("nothing was removed")
        return 0
    removals = [indirect.remove(v) for v in doomed]
    if args.json:
        _roots_json(verdicts, removals, args, scanned, runtime is not None)
    else:
        _roots_summary(removals, layout)
    return 0 if all(r.removed or r.changed for r in removals) else 1


def _current_generation_closure(layout: StoreLayout, found: prof.Found | None = None) -> set[bytes]:
    """Everything a current generation of a visible profile needs: a result
    link to one of those paths is never called stale."""
    found = found or prof.discover(layout.profiles_dir, home=_home(layout))
    current = set()
    for _, profile, _err in prof.generations_of(found.profiles, found.identity):
        if profile is None or profile.current is None:
            continue
        for g in profile.generations:
            sp = g.store_path(layout.store_dir)
            if g.number == profile.current and sp is not None:
                current.add(sp)
    try:
        db = connect_ro(layout.db_path, create_files=False)
    except NixDBError as e:
        raise CmdError(f"{e}: cannot tell which store paths current profile generations use; "
                       "refusing to remove anything") from None
    try:
        return prof.closure(db, current) | current
    finally:
        db.close()


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= prof.DAY:
        return f"{seconds // prof.DAY}d"
    if seconds >= 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}min"  # as durations are written: a bare m is refused


def _roots_text(verdicts, now) -> None:
    if not verdicts:
        _out("no indirect roots of yours\n")
        return
    _out(f"{'ACTION':6}  {'AGE':>5}  {'KIND':6}  {'REASON':32}  LINK -> STORE PATH\n")
    for v in verdicts:
        r = v.root
        _out(f"{'DELETE' if v.delete else 'KEEP':6}  {_age(now - r.mtime):>5}  {r.kind:6}  "
             f"{', '.join(v.reasons):32}  {s(r.link)} -> {s(r.store_path)}\n")
    sys.stdout.flush()


def _roots_summary(removals, layout) -> None:
    removed = [r for r in removals if r.removed]
    dangling = [r for r in removed if not r.auto_removed]
    _out(f"removed {plural(len(removed), 'link')}")
    if removed:
        _out(f"; {plural(len(removed) - len(dangling), 'gcroots/auto entry', 'gcroots/auto entries')}"
             " removed with them")
    _out("\n")
    if dangling:
        n = len(dangling)
        _out(f"{plural(n, 'entry', 'entries')} in {s(layout.auto_dir)} now "
             f"{'points' if n == 1 else 'point'} nowhere: that directory is not yours to change; "
             "gcrootsd (or Nix's GC) removes such stale links\n")
    for r in removals:
        if r.error:
            _stderr(f"gcroots-query: {s(r.root.link)}: {r.error}")


def _roots_json(verdicts, removals, args, scanned, runtime_checked) -> None:
    done = {r.root.link: r for r in removals}
    out = {"dry_run": bool(args.dry_run), "runtime_checked": runtime_checked,
           "stale_auto_entries": scanned.stale, "unreadable": scanned.unreadable, "links": []}
    for v in verdicts:
        r, rem = v.root, done.get(v.root.link)
        out["links"].append({
            "link": s(r.link), "store_path": s(r.store_path), "kind": r.kind,
            "auto_entry": s(r.auto_entry), "time": r.mtime, "date": _date(r.mtime),
            "action": "delete" if v.delete else "keep", "reasons": list(v.reasons),
            "removed": bool(rem and rem.removed), "auto_entry_removed": bool(rem and rem.auto_removed),
            "error": rem.error if rem else None})
    write_json(out)
