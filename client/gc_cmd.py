"""gcroots-query gc [--dry-run] [--max-freed SIZE] [--yes]
gcroots-query delete [--dry-run] PATH..."""

from __future__ import annotations

import json
import os
import stat
import sys

from gcroots import cliargs
from gcroots.protocol.admin import MAX_ARGS, Status
from gcroots.storepath import abs_path, dir_of, is_in_dir, to_store_path

from . import conn


def register(sub, common) -> None:
    g = sub.add_parser("gc", parents=[common],
                       help="collect garbage (through gcrootsd, or --standalone)")
    g.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted and the exact bytes that would be freed")
    g.add_argument("--max-freed", metavar="SIZE", type=cliargs.size(),
                   help="stop after freeing this much (e.g. 500M, 10G)")
    g.add_argument("--throttle", type=cliargs.seconds(maximum=cliargs.MAX_THROTTLE),
                   default=0.0, metavar="SECONDS",
                   help=f"pause between deletion batches, to spare the disk (at most "
                        f"{cliargs.MAX_THROTTLE:g})")
    g.add_argument("--yes", action="store_true",
                   help="delete without asking (required when not on a terminal)")
    g.set_defaults(handler=run)
    d = sub.add_parser("delete", parents=[common],
                       help="delete exactly these store paths, if they are garbage, like "
                            "nix-store --delete (through gcrootsd, or --standalone)")
    d.add_argument("paths", nargs="+", metavar="PATH",
                   help="store paths, or links to them (followed as nix-store does)")
    d.add_argument("--dry-run", action="store_true",
                   help="say whether they may go and what that frees; delete nothing")
    d.set_defaults(handler=run_delete)


def _human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _options(args) -> dict:
    return {"dry_run": args.dry_run, "max_freed": args.max_freed, "throttle": args.throttle}


def _request(args, opts: dict, paths: tuple[bytes, ...] | None = None):
    """(summary, rows) or None after printing the error.  With `paths`:
    delete those."""
    try:
        if args.standalone:
            from . import standalone
            answer = standalone.collect(args, opts, paths)
        elif paths is None:
            answer = conn.request(args.socket or conn.default_socket(), "gc", opts,
                                  on_progress=conn.progress_printer())
        else:
            answer = conn.request(args.socket or conn.default_socket(), "delete", opts, paths,
                                  on_progress=conn.progress_printer())
    except conn.DaemonError as e:
        print(f"gcroots-query: {e}", file=sys.stderr)
        return None
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if answer.status != Status.OK:
        print(f"gcroots-query {args.command}: {answer.message}", file=sys.stderr)
        args._exit = {Status.REFUSED: 3, Status.BUSY: 4, Status.BAD_REQUEST: 2}.get(answer.status, 1)
        return None
    return json.loads(answer.message), answer.rows


def run(args) -> int:
    opts = _options(args)
    args._exit = 1
    if not args.dry_run and not args.yes:
        # A real run needs --yes, or a person at a terminal who saw the plan.
        if not sys.stdin.isatty():
            print("gcroots-query gc: refusing to delete without --yes (not a terminal); "
                  "see what would go with --dry-run", file=sys.stderr)
            return 2
        plan = _request(args, dict(opts, dry_run=True))
        if plan is None:
            return args._exit
        total = plan[0]["bytes_freed"] + plan[0]["links_freed"]
        reply = input(f"Delete {plan[0]['paths']} store paths, freeing {_human(total)}? [y/N] ")
        if reply.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 0
    got = _request(args, opts)
    if got is None:
        return args._exit
    return _show(args, *got)


def store_dir_of(args) -> bytes:
    """The store dir the arguments are in: --store-dir, else Nix's
    NIX_STORE_DIR, else /nix/store."""
    return os.fsencode(args.store_dir or os.environ.get("NIX_STORE_DIR") or "/nix/store")


def follow_links_to_store_path(arg: str, store_dir: bytes) -> bytes:
    """Nix's followLinksToStorePath: links are followed, with our rights,
    until the path is in the store; a path inside a store path names that
    store path.  ValueError says why not."""
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


def run_delete(args) -> int:
    """Exit 1 when a path may not go (and then none goes), as nix-store
    --delete exits 1."""
    try:
        paths = tuple(follow_links_to_store_path(a, store_dir_of(args)) for a in args.paths)
    except ValueError as e:
        print(f"gcroots-query delete: {e}", file=sys.stderr)
        return 1
    if len(paths) > MAX_ARGS or sum(len(p) + 4 for p in paths) > 60 * 1024:
        print(f"gcroots-query delete: at most {MAX_ARGS} paths (and 60 KiB of them) at once",
              file=sys.stderr)
        return 2
    args._exit = 1
    got = _request(args, {"dry_run": args.dry_run}, paths)
    return args._exit if got is None else _show(args, *got)


def _show(args, summary: dict, rows) -> int:
    """The paths deleted on stdout (or the JSON document); the summary on
    stderr."""
    if args.json:
        doc = dict(summary, paths_list=[os.fsdecode(r[0]) for r in rows])
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return 0
    sys.stdout.buffer.write(b"".join(r[0] + b"\n" for r in rows))
    sys.stdout.flush()
    verb = "would be deleted" if summary["dry_run"] else "deleted"
    freed = "would free" if summary["dry_run"] else "freed"
    line = (f"{summary['paths']} store paths {verb}, {_human(summary['bytes_freed'])} {freed}"
            f" (+{_human(summary['links_freed'])} in .links)")
    if summary.get("stopped_at_limit"):
        line += "; stopped at --max-freed"
    if summary.get("stale_links_removed"):
        line += f"; {summary['stale_links_removed']} stale gcroots/auto links removed"
    if summary.get("protected_during_gc"):
        line += f"; {summary['protected_during_gc']} paths kept for running Nix processes"
    print(line, file=sys.stderr)
    return 0
