"""gcroots-query gc [--dry-run] [--max-freed SIZE] [--ensure-free SIZE|N%] [--keep-recent D]
gcroots-query delete [--dry-run] PATH...

The sizes a collection reports, one meaning each (README: "Sizes"):
  nix_bytes_freed    what Nix's collector counts and prints in its sentence
                     "N store paths deleted, X MiB freed" (the apparent size
                     of each file that had one or two links); --max-freed
                     and --ensure-free stop on it, as Nix's do
  disk_bytes_freed   blocks freed on disk, .links included: a file counts
                     once, and only when its last hard link goes
  nar_bytes_freed    the NAR sizes the Nix DB records for the deleted paths
                     (what `stats` and `cost` count)"""

from __future__ import annotations

import json
import os
import stat
import sys

from gcroots import cliargs
from gcroots.protocol.admin import MAX_ARGS, Status
from gcroots.storepath import abs_path, dir_of, is_in_dir, is_store_basename, to_store_path

from . import conn, term
from .format import error, human, mib, plural, table, write_json

EXIT = {Status.REFUSED: 3, Status.BUSY: 4, Status.BAD_REQUEST: 2}


class Failed(Exception):
    """A collection (or its dry run) did not happen: why, and the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def add_collection_options(p) -> None:
    """What limits a collection: gc's, and clean's for the collection it ends with."""
    p.add_argument("--max-freed", metavar="SIZE", type=cliargs.size(),
                   help="stop once this much is freed, counted as Nix counts it (e.g. 500M, "
                        "10G; 0 deletes nothing)")
    p.add_argument("--ensure-free", metavar="SIZE|N%", type=cliargs.size(percent=True),
                   help="collect only until the store's file system has this much free space "
                        "(e.g. 20G, or 10%% of its size), like Nix's min-free/max-free")
    p.add_argument("--keep-recent", metavar="DURATION", type=cliargs.duration(),
                   help="keep store paths registered within DURATION (e.g. 7d), and their "
                        "closure, whether a root needs them or not")
    p.add_argument("--throttle", type=cliargs.seconds(maximum=cliargs.MAX_THROTTLE),
                   default=0.0, metavar="SECONDS",
                   help=f"pause between deletion batches, to spare the disk (at most "
                        f"{cliargs.MAX_THROTTLE:g})")


def add_confirm_options(p) -> None:
    """Asking before deleting: the same rules for gc and clean."""
    p.add_argument("--dry-run", action="store_true",
                   help="show the plan (what would go and what that frees); delete nothing")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ask", action="store_true",
                     help="show the plan and ask on the terminal before deleting (what "
                          "happens anyway on a terminal without --yes)")
    how.add_argument("--yes", action="store_true",
                     help="delete without asking (required when not on a terminal)")


def register(sub, common) -> None:
    from .cli import subcommand
    g = subcommand(sub, "gc", "collect garbage (through gcrootsd, or --standalone)",
                   "Collect garbage with Nix's locking protocol, so that Nix builds running "
                   "meanwhile are safe. On a terminal without --yes it shows the plan and asks "
                   "(on the terminal: stdout carries only the answer). After it, a summary: "
                   "Nix's sentence with Nix's count, the bytes freed on disk and the NAR size "
                   "of what went. --dry-run works for every user.",
                   "  gcroots-query gc --dry-run\n"
                   "  gcroots-query gc --yes --max-freed 10G\n"
                   "  gcroots-query gc --yes --ensure-free 15% --keep-recent 7d\n"
                   "  gcroots-query gc --ask --print-deleted > deleted.txt", parents=[common])
    add_confirm_options(g)
    add_collection_options(g)
    g.add_argument("--print-deleted", action="store_true",
                   help="print the deleted store paths on stdout, one per line (the summary "
                        "then goes to stderr)")
    g.set_defaults(handler=run)
    d = subcommand(sub, "delete", "delete exactly these store paths, if they are garbage",
                   "Delete exactly the given store paths, as nix-store --delete does: a path "
                   "that is alive, or that a path not being deleted still needs, is refused "
                   "(naming the root's chain), and then nothing is deleted (exit 1). Root and "
                   "the admin group only.",
                   "  gcroots-query delete /nix/store/...-big-iso\n"
                   "  gcroots-query delete --dry-run ./result", parents=[common])
    d.add_argument("paths", nargs="+", metavar="PATH",
                   help="store paths, or links to them (followed as nix-store does)")
    d.add_argument("--dry-run", action="store_true",
                   help="say whether they may go and what that frees; delete nothing")
    d.add_argument("--print-deleted", action="store_true",
                   help="print the deleted store paths on stdout, one per line (the summary "
                        "then goes to stderr)")
    d.set_defaults(handler=run_delete)


def options_of(args) -> dict:
    """The gc request's options (gcrootsd checks them again)."""
    opts = {"dry_run": args.dry_run, "max_freed": args.max_freed, "throttle": args.throttle}
    if args.keep_recent is not None:
        opts["keep_recent"] = args.keep_recent
    if isinstance(args.ensure_free, cliargs.Percent):
        opts["ensure_free_percent"] = args.ensure_free.value
    elif args.ensure_free is not None:
        opts["ensure_free"] = args.ensure_free
    return opts


def request(args, opts: dict, paths: tuple[bytes, ...] | None = None):
    """(summary, rows) of a collection (or with `paths`, a delete); Failed
    if there was none."""
    command = "gc" if paths is None else "delete"
    with term.ProgressBar() as progress:
        try:
            if args.standalone:
                from . import standalone
                answer = standalone.collect(args, opts, paths, progress)
            else:
                answer = conn.request(args.socket or conn.default_socket(), command, opts,
                                      paths or (), on_progress=progress)
        except conn.DaemonError as e:
            raise Failed(str(e), 1) from None
    if answer.status != Status.OK:
        raise Failed(f"{command}: {answer.message}", EXIT.get(answer.status, 1))
    return labelled(json.loads(answer.message)), answer.rows


def labelled(summary: dict) -> dict:
    """The summary with each size under its one name (a version-1 gcrootsd
    says bytes_freed + links_freed for what is disk_bytes_freed)."""
    if "disk_bytes_freed" not in summary and "bytes_freed" in summary:
        summary["disk_bytes_freed"] = summary.pop("bytes_freed") + summary.pop("links_freed", 0)
    return summary


def may_ask(args, what: str) -> int | None:
    """None if a real run may go on (--yes, or there is a person to ask);
    else the exit code, after saying why."""
    if args.dry_run or args.yes:
        return None
    if not term.interactive():
        return error(args, f"{what}: " + ("--ask needs a terminal to ask on" if args.ask else
                     "refusing to delete without --yes (not a terminal)") +
                     "; see what would go with --dry-run", 2)
    if args.json:
        return error(args, f"{what}: asking shows the plan to a person; use --yes (or "
                     "--dry-run) with --json", 2)
    return None


def run(args) -> int:
    try:
        return _run(args)
    except Failed as e:
        return error(args, str(e), e.code)


def _run(args) -> int:
    opts = options_of(args)
    if (refused := may_ask(args, "gc")) is not None:
        return refused
    if not args.dry_run and not args.yes:
        plan = request(args, dict(opts, dry_run=True))[0]
        if plan["paths"] == 0:
            print("nothing to delete", file=sys.stderr)
            return 0
        if not term.confirm(f"Delete {plural(plan['paths'], 'store path')}, freeing "
                            f"{human(plan['disk_bytes_freed'])} on disk?",
                            sizes_text(plan, "garbage collection plan:")):
            print("nothing deleted", file=sys.stderr)
            return 0
    return show(args, *request(args, opts))


def sizes_text(summary: dict, title: str) -> str:
    """The plan or result of a collection as a small table (stderr)."""
    verb = "would be " if summary["dry_run"] else ""
    rows = [(f"store paths {verb}deleted", str(summary["paths"])),
            ("freed as Nix counts it", mib(summary["nix_bytes_freed"])),
            ("freed on disk", human(summary["disk_bytes_freed"])),
            ("NAR size of those paths", human(summary.get("nar_bytes_freed", 0)))]
    return title + "\n" + table(rows, right=(1,), indent="  ")


def nix_sentence(summary: dict) -> str:
    """Nix's own sentence, with the number Nix would print there."""
    if summary["dry_run"]:
        return (f"{summary['paths']} store paths would be deleted, "
                f"{mib(summary['nix_bytes_freed'])} would be freed")
    return f"{summary['paths']} store paths deleted, {mib(summary['nix_bytes_freed'])} freed"


def summary_lines(summary: dict) -> list[str]:
    lines = [nix_sentence(summary),
             f"  on disk: {human(summary['disk_bytes_freed'])} (blocks; a file counts once its "
             "last hard link is gone; .links included)"]
    if "nar_bytes_freed" in summary:
        lines.append(f"  NAR size of those paths: {human(summary['nar_bytes_freed'])}")
    if summary.get("stopped_at_limit"):
        lines.append(f"  stopped at --{summary.get('limit') or 'max-freed'} "
                     f"({mib(summary.get('limit_bytes') or 0)} as Nix counts): "
                     f"{plural(summary.get('paths_over_limit', 0), 'more dead path')} left")
    if summary.get("kept_recent"):
        lines.append(f"  {plural(summary['kept_recent'], 'dead path')} kept by --keep-recent")
    if summary.get("stale_links_removed"):
        lines.append(f"  {plural(summary['stale_links_removed'], 'stale gcroots/auto link')} "
                     "removed")
    if summary.get("protected_during_gc"):
        lines.append(f"  {plural(summary['protected_during_gc'], 'path')} kept for running Nix "
                     "processes")
    return lines


def show(args, summary: dict, rows) -> int:
    """The answer on stdout: the summary; with --print-deleted the paths
    (the summary then on stderr); with --json one document with both."""
    if args.json:
        write_json(dict(summary, paths_list=[os.fsdecode(r[0]) for r in rows]))
        return 0
    text = "".join(line + "\n" for line in summary_lines(summary))
    if getattr(args, "print_deleted", False):
        sys.stdout.buffer.write(b"".join(r[0] + b"\n" for r in rows))
        sys.stdout.flush()
        sys.stderr.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


# -- store paths as arguments -------------------------------------------------------

def store_dir_of(args) -> bytes:
    """The store dir the arguments are in: --store-dir, else Nix's
    NIX_STORE_DIR, else /nix/store."""
    return os.fsencode(args.store_dir or os.environ.get("NIX_STORE_DIR") or "/nix/store")


def follow_links_to_store_path(arg: str, store_dir: bytes) -> bytes:
    """Nix's followLinksToStorePath: links are followed, with our rights,
    until the path is in the store; a path inside a store path names that
    store path.  ValueError says why not."""
    if not arg or "\0" in arg:
        raise ValueError(f"{arg!r} is not a path")
    path = abs_path(os.fsencode(arg), os.getcwdb())
    for _ in range(40):  # ELOOP's bound (Nix would loop for ever)
        if is_in_dir(path, store_dir):
            break
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                break
            path = abs_path(os.readlink(path), dir_of(path))
        except OSError as e:
            raise ValueError(f"{arg}: {e.strerror}") from None
    else:
        raise ValueError(f"{arg}: too many levels of symbolic links")
    if not is_in_dir(path, store_dir):
        raise ValueError(f"path '{os.fsdecode(path)}' is not in the Nix store "
                         f"{os.fsdecode(store_dir)}")
    store_path = to_store_path(path, store_dir)
    if store_path is None:
        raise ValueError(f"path '{os.fsdecode(path)}' is not a valid store path")
    return store_path


def store_path_argument(args, arg: str) -> bytes:
    """What `nix-store -q --roots` accepts: a store path, a link into the
    store (`result`), a file or directory inside a store path -- and a
    bare `<hash>-<name>`.  ValueError (a usage error) if it is no path into
    the store (whether that store path exists, the answer says)."""
    store_dir = store_dir_of(args)
    name = os.fsencode(arg)
    if b"/" not in name and is_store_basename(name) and not os.path.lexists(name):
        store_path = store_dir + b"/" + name
    else:
        store_path = follow_links_to_store_path(arg, store_dir)
    args.path = os.fsdecode(store_path)
    return store_path


def run_delete(args) -> int:
    """Exit 1 when a path may not go (and then none goes), as nix-store
    --delete exits 1."""
    try:
        paths = tuple(follow_links_to_store_path(a, store_dir_of(args)) for a in args.paths)
    except ValueError as e:
        return error(args, f"delete: {e}", 1)
    if len(paths) > MAX_ARGS or sum(len(p) + 4 for p in paths) > 60 * 1024:
        return error(args, f"delete: at most {MAX_ARGS} paths (and 60 KiB of them) at once", 2)
    try:
        return show(args, *request(args, {"dry_run": args.dry_run}, paths))
    except Failed as e:
        return error(args, str(e), e.code)
