"""gcroots-query profiles … and roots prune: client-side commands that run
with the caller's own rights (never through the privileged helper).

  profiles list [PROFILE…]                      generations, sizes, current marker
  profiles delete-generations PROFILE SPEC…     exactly nix-env --delete-generations
  profiles prune [--keep N] [--keep-since D] (PROFILE… | --all)
  roots prune --older-than D [--match GLOB]     the caller's own stale result links

Exit codes: 0 done, 1 error, 2 usage, 3 permission refused, 4 lock busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from gcroots import cliargs
from gcroots.layout import StoreLayout
from gcroots.nixdb import NixDBError, connect_ro
from gcroots.protocol.admin import Status
from gcroots.storepath import abs_path

from . import conn, indirect
from . import profiles as prof
from .format import human, s

DEFAULT_LOCK_TIMEOUT = 30.0
MAX_LOCK_TIMEOUT = 86400.0


class CmdError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- argument parsing -------------------------------------------------------------

def register(sub, common) -> None:
    # Accepted after the subcommand too; without them the top-level
    # options apply (SUPPRESS keeps those).
    layout_opts = argparse.ArgumentParser(add_help=False)
    layout_opts.add_argument("--root", default=argparse.SUPPRESS,
                             help="physical root of a chroot store (like nix-store --store DIR)")
    layout_opts.add_argument("--store-dir", default=argparse.SUPPRESS, help="logical store dir")
    layout_opts.add_argument("--state-dir", default=argparse.SUPPRESS, help="logical state dir")
    lock_opts = argparse.ArgumentParser(add_help=False)
    lock_opts.add_argument("--lock-timeout", type=cliargs.seconds(maximum=MAX_LOCK_TIMEOUT),
                           default=DEFAULT_LOCK_TIMEOUT,
                           metavar="SECONDS",
                           help="wait at most this long for a profile's lock held by another "
                                f"process, e.g. nix-env (default {DEFAULT_LOCK_TIMEOUT:g})")
    safety_opts = argparse.ArgumentParser(add_help=False)
    safety_opts.add_argument("--no-runtime-check", action="store_true",
                             help="do not ask gcrootsd for runtime roots (otherwise, without "
                                  "it, nothing is deleted)")
    mode = safety_opts.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    mode.add_argument("--ask", action="store_true", help="print the plan and ask before deleting")

    p = sub.add_parser("profiles", help="Nix profiles and their generations (your own rights)")
    psub = p.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")

    ls = psub.add_parser("list", parents=[common, layout_opts],
                         help="generations: number, date, current, store path, closure size")
    ls.add_argument("profiles", nargs="*", metavar="PROFILE",
                    help="default: every profile you can see")
    ls.add_argument("--no-size", action="store_true", help="skip closure sizes (no DB reads)")
    ls.set_defaults(handler=_guard(cmd_list))

    dg = psub.add_parser("delete-generations", parents=[common, layout_opts, lock_opts],
                         help="exactly nix-env -p PROFILE --delete-generations SPEC…")
    dg.add_argument("profile", metavar="PROFILE")
    dg.add_argument("spec", nargs="+", metavar="SPEC", help="old | <N>d | +<N> | <N>…")
    dg.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    dg.set_defaults(handler=_guard(cmd_delete_generations))

    pr = psub.add_parser("prune", parents=[common, layout_opts, lock_opts, safety_opts],
                         help="keep the last N and/or those newer than D; never the current, "
                              "booted or running generation")
    pr.add_argument("profiles", nargs="*", metavar="PROFILE")
    pr.add_argument("--all", action="store_true",
                    help="every profile you may modify (others are reported as skipped)")
    pr.add_argument("--keep", type=cliargs.count(), metavar="N",
                    help="keep the N highest-numbered")
    pr.add_argument("--keep-since", type=cliargs.duration(positive=False), metavar="DURATION",
                    help="keep those newer than this (e.g. 14d, 2w, 1w2d, 12h, 3mo)")
    pr.add_argument("--gc", action="store_true", help="then collect garbage through gcrootsd")
    pr.add_argument("--system-link", action="append", metavar="PATH",
                    help="a link whose generation is never deleted (default: /run/current-system "
                         "and /run/booted-system, or $GCROOTS_SYSTEM_LINKS, colon-separated)")
    pr.set_defaults(handler=_guard(cmd_prune))

    _extend_roots(sub.choices["roots"], layout_opts, safety_opts)


def _extend_roots(roots: argparse.ArgumentParser, layout_opts, safety_opts) -> None:
    """`roots` stays the query it is; `roots prune …` is ours.  The handler
    is only set when the action word is given, so plain `roots` still goes
    to gcrootsd exactly as before."""
    roots.add_argument("roots_action", nargs="?", choices=["prune"], action=_RootsAction,
                       metavar="prune", help="remove your own stale indirect roots (see below)")
    g = roots.add_argument_group("roots prune")
    g.add_argument("--older-than", type=cliargs.duration(positive=False), action=_PruneOnly,
                   metavar="DURATION",
                   help="links (re)made longer ago than this (e.g. 30d)")
    g.add_argument("--match", action=_PruneOnly, metavar="GLOB",
                   help="only links whose path matches (fnmatch, e.g. '*/.direnv/*')")
    for a in safety_opts._actions:
        if a.option_strings:  # --no-runtime-check, --dry-run, --ask
            g.add_argument(*a.option_strings, action=_PruneOnlyFlag, nargs=0, default=False,
                           help=a.help)
    for a in layout_opts._actions:
        if a.option_strings:
            g.add_argument(*a.option_strings, default=argparse.SUPPRESS, help=a.help)


class _RootsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if values == "prune":
            namespace.handler = _guard(cmd_roots_prune)


class _PruneOnly(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if getattr(namespace, "roots_action", None) != "prune":
            namespace.handler = _misuse(option_string)


class _PruneOnlyFlag(_PruneOnly):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, True, option_string)


def _misuse(option: str):
    def handler(args) -> int:
        print(f"gcroots-query: {option} belongs to `roots prune`", file=sys.stderr)
        return 2
    return handler


def _guard(fn):
    """Errors become one clear line and an exit code, never a traceback."""
    def handler(args) -> int:
        try:
            return fn(args)
        except CmdError as e:
            print(f"gcroots-query: {e}", file=sys.stderr)
            return e.code
        except prof.ProfileError as e:
            print(f"gcroots-query: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("gcroots-query: interrupted", file=sys.stderr)
            return 130
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


def _json(obj) -> None:
    sys.stdout.buffer.write(json.dumps(obj, indent=1, ensure_ascii=True).encode() + b"\n")
    sys.stdout.buffer.flush()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _check_ask(args) -> None:
    if args.ask and args.json:
        raise CmdError("--ask shows the plan to a person; use --dry-run --json for scripts", 2)
    if args.ask and not sys.stdin.isatty():
        raise CmdError("--ask needs a terminal to ask on; nothing was changed", 2)


def runtime_roots(args, layout: StoreLayout) -> dict[bytes, list[bytes]] | None:
    """Store paths that running processes use, from gcrootsd (or, with
    --standalone and root, from an in-process /proc scan).  None when the
    check is switched off; an error when we cannot get a complete answer."""
    if args.no_runtime_check:
        return None
    skip = "use --no-runtime-check to go ahead without this check"
    if args.standalone:
        if os.geteuid() != 0:
            raise CmdError("--standalone cannot see other users' processes without root, so it "
                           f"cannot tell which generations are running; {skip}")
        from . import standalone
        ns = argparse.Namespace(**{**vars(args), "no_runtime": False})
        try:
            answer = standalone.answer(ns, "roots", {}, ())
        except conn.DaemonError as e:
            raise CmdError(f"cannot scan for runtime roots: {e}; {skip}") from None
    else:
        try:
            answer = conn.request(args.socket or conn.default_socket(), "roots")
        except conn.DaemonError as e:
            raise CmdError(f"cannot ask gcrootsd which store paths are in use: {e}; refusing to "
                           f"delete anything; {skip}") from None
    if answer.status != Status.OK:
        raise CmdError(f"gcrootsd could not list the runtime roots ({answer.message or answer.status.name}); "
                       f"refusing to delete anything; {skip}")
    return prof.runtime_paths(answer.rows)


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
        for path, profile, error in prof.generations_of(found.profiles, found.identity):
            if error is not None:
                _stderr(f"gcroots-query: {error}")
                rc = 1
                listing.append({"profile": s(path), "error": error})
                continue
            if args.profiles:
                _hint_linked_profile(profile)
            listing.append(_list_entry(profile, layout, db))
    finally:
        if db is not None:
            db.close()
    if args.json:
        _json(listing)
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
        if e.deleted:
            _stderr(f"gcroots-query: generations {', '.join(map(str, e.deleted))} of "
                    f"{s(path)} were deleted before the error")
        if args.json:
            _json({"profile": s(path), "deleted": e.deleted, "dry_run": args.dry_run,
                   "error": str(e)})
        raise
    _hint_linked_profile(result.profile)
    if args.json:
        _json({"profile": s(path), "deleted": result.deleted, "dry_run": args.dry_run})
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
    if args.ask and not _confirm(f"Delete {doomed} generation(s)?"):
        _stderr("nothing was deleted")
        return 0
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
        for n in p.deleted:
            _stderr(f"removed generation {n} of {s(p.path)}")
    total = sum(len(p.deleted) for p in planned)
    gc = _collect(args) if args.gc else None
    if gc is not None and not gc["ok"]:
        rc = max(rc, 1)
    if args.json:
        _prune_json(planned, layout, protected, args, gc)
    else:
        _out(f"deleted {total} generation(s) in "
             f"{sum(1 for p in planned if p.deleted)} profile(s)\n")
    return rc


def _plan_profiles(args, layout, policy, protected, now) -> list[_Planned]:
    """Plan every profile first; an explicitly named profile we cannot read
    or modify stops everything before anything is deleted."""
    out = []
    explicit = bool(args.profiles)
    found = _profile_paths(args, layout)
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
    _out(f"\nplan: delete {n} of {sum(len(p.verdicts) for p in planned)} generation(s)\n")
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
    _json(out)


def _collect(args) -> dict:
    """A collection through gcrootsd's `gc` command."""
    try:
        answer = conn.request(args.socket or conn.default_socket(), "gc",
                              on_progress=conn.progress_printer())
    except conn.DaemonError as e:
        _stderr(f"gcroots-query: the generations are deleted, but no collection ran: {e}")
        return {"ok": False, "error": str(e)}
    if answer.status == Status.OK:
        summary = json.loads(answer.message)
        _stderr(f"{summary['paths']} store paths deleted, "
                f"{(summary['bytes_freed'] + summary['links_freed']) / 2**20:.2f} MiB freed")
        return {"ok": True, **summary}
    if answer.status == Status.BAD_REQUEST and "unknown command" in answer.message:
        msg = (f"this gcrootsd cannot collect garbage yet (it answered: {answer.message}); "
               "the generations are deleted: run `nix-store --gc` to free their space")
    elif answer.status == Status.REFUSED:
        msg = f"gcrootsd refused to collect ({answer.message}); the generations are deleted"
    else:
        msg = f"the collection failed: {answer.message or answer.status.name}"
    _stderr(f"gcroots-query: {msg}")
    return {"ok": False, "error": msg}


# -- roots prune ---------------------------------------------------------------------

def cmd_roots_prune(args) -> int:
    if args.older_than is None:
        raise CmdError("roots prune needs --older-than DURATION (e.g. 30d)", 2)
    _check_ask(args)
    layout = _layout(args)
    now = time.time()
    runtime = runtime_roots(args, layout)
    in_profiles = _current_generation_closure(layout)
    scanned = indirect.scan(layout)
    older = cliargs.format_duration(args.older_than)
    verdicts = indirect.plan(scanned, older_than=args.older_than, now=now,
                             match=None if args.match is None else os.fsencode(args.match),
                             uid=os.geteuid(), runtime=runtime or {}, in_profiles=in_profiles,
                             older_text=older)
    doomed = [v for v in verdicts if v.delete]
    if runtime is None and not args.json:
        _stderr("gcroots-query: warning: runtime roots not checked (--no-runtime-check)")
    if not args.json:
        _roots_text(verdicts, now)
    if args.dry_run or not doomed:
        if args.json:
            _roots_json(verdicts, [], args, scanned, runtime is not None)
        elif not doomed:
            _out("nothing to remove\n")
        return 0
    if args.ask and not _confirm(f"Remove {len(doomed)} link(s)?"):
        _stderr("nothing was removed")
        return 0
    removals = [indirect.remove(v) for v in doomed]
    if args.json:
        _roots_json(verdicts, removals, args, scanned, runtime is not None)
    else:
        _roots_summary(removals, layout)
    return 0 if all(r.removed or r.changed for r in removals) else 1


def _current_generation_closure(layout: StoreLayout) -> set[bytes]:
    """Everything a current generation of a visible profile needs: a result
    link to one of those paths is never called stale."""
    found = prof.discover(layout.profiles_dir, home=_home(layout))
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
    return f"{seconds // 60}m"


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
    _out(f"removed {len(removed)} link(s)")
    if removed:
        _out(f"; {len(removed) - len(dangling)} gcroots/auto entr(y/ies) removed with them")
    _out("\n")
    if dangling:
        _out(f"{len(dangling)} entr(y/ies) in {s(layout.auto_dir)} now point(s) nowhere: that "
             "directory is not yours to change; gcrootsd (or Nix's GC) removes such stale "
             "links\n")
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
    _json(out)
