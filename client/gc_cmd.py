"""gcroots-query gc [--dry-run] [--max-freed SIZE] [--yes]"""

from __future__ import annotations

import json
import os
import sys

from gcroots import cliargs
from gcroots.protocol.admin import Status

from . import conn


def register(sub, common) -> None:
    g = sub.add_parser("gc", parents=[common],
                       help="collect garbage (through gcrootsd, or --standalone)")
    g.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted and the exact bytes that would be freed")
    g.add_argument("--max-freed", metavar="SIZE", type=cliargs.size(minimum=1),
                   help="stop after freeing this much (e.g. 500M, 10G)")
    g.add_argument("--throttle", type=cliargs.seconds(maximum=cliargs.MAX_THROTTLE),
                   default=0.0, metavar="SECONDS",
                   help=f"pause between deletion batches, to spare the disk (at most "
                        f"{cliargs.MAX_THROTTLE:g})")
    g.add_argument("--yes", action="store_true",
                   help="delete without asking (required when not on a terminal)")
    g.set_defaults(handler=run)


def _human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _options(args) -> dict:
    return {"dry_run": args.dry_run, "max_freed": args.max_freed, "throttle": args.throttle}


def _request(args, opts: dict):
    """(summary, rows) or None after printing the error."""
    try:
        if args.standalone:
            from . import standalone
            answer = standalone.collect(args, opts)
        else:
            answer = conn.request(args.socket or conn.default_socket(), "gc", opts,
                                  on_progress=conn.progress_printer())
    except conn.DaemonError as e:
        print(f"gcroots-query: {e}", file=sys.stderr)
        return None
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if answer.status != Status.OK:
        print(f"gcroots-query gc: {answer.message}", file=sys.stderr)
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
    summary, rows = got
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
