"""gcroots-query: ask gcrootsd (or, with --standalone, this process) about the
store's roots and garbage.

Exit codes:
  0  success
  1  error: daemon or helper unreachable, no complete root set, bad answer
  2  usage error
  3  refused: this command needs root or the admin group
  4  busy: a garbage collection is running, or too many connections of yours
  5  negative answer: `why` -- the path is not alive
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys

from gcroots import cliargs, log
from gcroots.protocol.admin import Status

from . import conn
from .format import FORMATTERS

EXIT = {Status.OK: 0, Status.ERROR: 1, Status.BAD_REQUEST: 2, Status.REFUSED: 3,
        Status.BUSY: 4, Status.NEGATIVE: 5}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: argparse (3.11) matches every argument, also those
    # after the subcommand, against the top-level options' prefixes, so
    # `profiles prune --keep 1` would be "ambiguous" with --keep-outputs.
    p = argparse.ArgumentParser(prog="gcroots-query", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None,
                       help="gcrootsd's socket (default $GCROOTS_SOCKET or /run/gcroots/gcrootsd.sock)")
    where.add_argument("--standalone", action="store_true",
                       help="no daemons: scan and analyse in this process, with your own rights")
    p.add_argument("--root", help="--standalone: physical root of a chroot store")
    p.add_argument("--store-dir", help="--standalone: logical store dir")
    p.add_argument("--state-dir", help="--standalone: logical state dir")
    p.add_argument("--no-runtime", action="store_true", help="--standalone: skip /proc")
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="--standalone: override nix.conf")
    p.add_argument("--keep-derivations", action=argparse.BooleanOptionalAction, default=None,
                   help="--standalone: override nix.conf")
    p.add_argument("--allow-unprivileged-scan", action="store_true",
                   help="--standalone: answer dead/gc even when not root (other users' "
                        "private roots are then invisible to the scan)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("roots", parents=[common], help="GC roots, like nix-store --gc --print-roots")
    sub.add_parser("live", parents=[common], help="live store paths, like --print-live")
    sub.add_parser("dead", parents=[common], help="garbage, like --print-dead")
    w = sub.add_parser("why", parents=[common], help="a shortest chain from a root to PATH")
    w.add_argument("path")
    w.add_argument("--all", action="store_true", help="one chain per root that keeps PATH alive")
    c = sub.add_parser("cost", parents=[common],
                       help="per root: bytes freed if only that root went away")
    c.add_argument("--top", type=cliargs.count(), default=20, help="show the N biggest (0: all)")
    sub.add_parser("stats", parents=[common], help="counts, sizes, timings")
    for extra in _extra_commands():
        extra.register(sub, common)
    return p


def _extra_commands():
    from . import gc_cmd, profiles_cmd
    return [gc_cmd, profiles_cmd]


def request_spec(args) -> tuple[dict, tuple[bytes, ...]]:
    if args.command == "why":
        return {"all": args.all}, (os.fsencode(args.path),)
    if args.command == "cost":
        return {"top": args.top}, ()
    return {}, ()


def run_standalone(args, options: dict, pargs: tuple[bytes, ...]) -> conn.Answer:
    from . import standalone
    return standalone.answer(args, args.command, options, pargs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout carries only the answer: what the in-process work (--standalone)
    # logs goes to stderr, never to structlog's default, stdout.
    log.configure("gcroots-query", lazy=True)
    handler = getattr(args, "handler", None)
    if handler is not None:  # client-side commands (profiles) and gc's own flow
        return handler(args)
    options, pargs = request_spec(args)
    try:
        if args.standalone:
            answer = run_standalone(args, options, pargs)
        else:
            answer = conn.request(args.socket or conn.default_socket(), args.command, options,
                                  pargs, on_progress=conn.progress_printer())
    except conn.DaemonError as e:
        print(f"gcroots-query: {e}", file=sys.stderr)
        return 1
    if sys.stderr.isatty() and not args.standalone:
        sys.stderr.write("\r\033[K")
    if answer.status != Status.OK:
        print(f"gcroots-query: {answer.message or answer.status.name.lower()}", file=sys.stderr)
        return EXIT.get(answer.status, 1)
    out = sys.stdout.buffer
    if answer.paths is not None and not args.json:  # one path a line, as nix-store
        for chunk in answer.paths:
            out.write(chunk.replace(b"\0", b"\n"))
    elif args.json:
        out.write(json.dumps(FORMATTERS[args.command].json(answer.all_rows(), args), indent=1,
                             ensure_ascii=True).encode() + b"\n")
    else:
        FORMATTERS[args.command].text(answer.rows, args, out)
    out.flush()
    return 0


def stdout_reader_gone() -> bool:
    """Whether our stdout is a pipe or socket nobody reads any more."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def entry() -> int:
    try:
        return main()
    except BrokenPipeError as e:
        if stdout_reader_gone():
            # `gcroots-query dead | head`: the reader left; not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        # Anything else (a socket) is a failure: never exit 0 for it (for
        # `why` 0 means "alive", for `gc --yes` "collected").
        try:
            print(f"gcroots-query: broken pipe: {e}", file=sys.stderr)
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(entry())
