"""gcroots-query: ask gcrootsd (or, with --standalone, this process) about the
store's roots and garbage, and collect it.

Exit codes:
  0  success
  1  error: daemon or helper unreachable, no complete root set, bad answer
  2  usage error (a bad argument, a path that is not in the store)
  3  refused: this command needs root or the admin group
  4  busy: a garbage collection is running, or too many connections of yours
  5  negative answer: `why` -- the path is not alive
  130 interrupted (^C)

With --json every answer, and every error, is one JSON document on stdout
(an error: {"error": MESSAGE, "exit": CODE}); logs, prompts and progress go
to stderr or the terminal.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import os
import select
import stat
import sys
from typing import Iterator

from gcroots import cliargs, log
from gcroots.protocol.admin import Status

from . import conn
from .format import FORMATTERS, error, write_json
from .term import ProgressBar

EXIT = {Status.OK: 0, Status.ERROR: 1, Status.BAD_REQUEST: 2, Status.REFUSED: 3,
        Status.BUSY: 4, Status.NEGATIVE: 5}
# Commands answered by gcrootsd (or --standalone): they work on the store
# gcrootsd serves, so the chroot/layout flags make sense only standalone.
# (`clean` and `roots prune` also work on the store --root names, client-side.)
DAEMON_COMMANDS = frozenset({"roots", "live", "dead", "why", "cost", "stats", "gc", "delete"})
# Commands whose parsers need nothing from gc_cmd, clean_cmd, profiles_cmd
# (`roots` gets its `prune` there): argv naming one of them and no other
# command nor --help builds the parser without those (~20 ms of imports of
# a `dead` answer's ~0.1 s in the client).
LEAN_COMMANDS = frozenset({"live", "dead", "why", "cost", "stats"})
NOT_LEAN = frozenset({"roots", "gc", "delete", "clean", "profiles", "-h", "--help"})
STANDALONE_ONLY = ("root", "store_dir", "state_dir", "no_runtime", "keep_outputs",
                   "keep_derivations", "allow_unprivileged_scan")


class LeanParseError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """Usage errors exit 2, as one line; with --json as a JSON object on
    stdout (the subcommands' parsers are of this class too)."""
    json_errors = False
    lean = False   # built without some commands: an error means parse again with all (main)

    def error(self, message: str):
        if Parser.lean:
            raise LeanParseError
        if Parser.json_errors:
            write_json({"error": f"{self.prog}: {message}", "exit": 2})
            sys.exit(2)
        super().error(message)


def path_arg(layout_field: str | None = None):
    """An argparse type for a path flag: never empty (`--root "$MNT"` with
    MNT unset must not mean the host's /nix); with `layout_field`, one that
    StoreLayout takes there (absolute store and state dirs, a store dir
    that is not /)."""
    def parse(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError("an empty path (an unset variable?); leave the "
                                             "flag out for its default")
        if layout_field in ("store_dir", "state_dir") and not value.startswith("/"):
            raise argparse.ArgumentTypeError(f"{value!r} is not an absolute path")
        if layout_field is not None:
            # (here: a query through gcrootsd never loads layout, nor the
            # dataclasses it needs: ~9 ms of every start)
            from gcroots.layout import StoreLayout
            try:
                StoreLayout.make(**{layout_field: value})
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
        return value
    return parse


def subcommand(sub, name: str, help: str, description: str, examples: str = "",
               **kwargs) -> argparse.ArgumentParser:
    """A subcommand with a one-line help (in the list of commands), a
    description and examples (in its own --help)."""
    return sub.add_parser(name, help=help, description=cliargs.describe(description),
                          epilog=("examples:\n" + examples) if examples else None,
                          formatter_class=cliargs.HelpFormatter, **kwargs)


def build_parser(lean: bool = False) -> argparse.ArgumentParser:
    # allow_abbrev=False: argparse (3.11) matches every argument, also those
    # after the subcommand, against the top-level options' prefixes, so
    # `profiles prune --keep 1` would be "ambiguous" with --keep-outputs.
    p = Parser(prog="gcroots-query", description=__doc__, allow_abbrev=False,
               formatter_class=cliargs.HelpFormatter, epilog="""examples:
  gcroots-query dead | wc -l               how many store paths are garbage
  gcroots-query why ./result               which root keeps this alive
  gcroots-query clean --keep 5 --roots-older-than 30d --dry-run
  gcroots-query gc --ask --print-deleted > deleted.txt
  gcroots-query --standalone --root /mnt stats     a store of another system, no daemons""")
    cliargs.add_version(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None, metavar="PATH", type=path_arg(),
                       help="gcrootsd's socket (default $GCROOTS_SOCKET or /run/gcroots/gcrootsd.sock)")
    where.add_argument("--standalone", action="store_true",
                       help="no daemons: scan and analyse in this process, with your own rights")
    p.add_argument("--root", metavar="DIR", type=path_arg("root"),
                   help="--standalone: physical root of a chroot store (like nix-store --store DIR)")
    p.add_argument("--store-dir", metavar="DIR", type=path_arg("store_dir"),
                   help="--standalone: logical store dir (default /nix/store)")
    p.add_argument("--state-dir", metavar="DIR", type=path_arg("state_dir"),
                   help="--standalone: logical state dir (default /nix/var/nix)")
    p.add_argument("--no-runtime", action="store_true",
                   help="--standalone: skip /proc (running processes are no roots then)")
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="--standalone: override nix.conf's keep-outputs")
    p.add_argument("--keep-derivations", action=argparse.BooleanOptionalAction, default=None,
                   help="--standalone: override nix.conf's keep-derivations")
    p.add_argument("--allow-unprivileged-scan", action="store_true",
                   help="--standalone: answer dead/gc even when not root (other users' "
                        "private roots are then invisible to the scan)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: one JSON document on stdout (errors too)")
    common = argparse.ArgumentParser(add_help=False, formatter_class=cliargs.HelpFormatter)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output: one JSON document on stdout (errors too)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)
    subcommand(sub, "roots", "GC roots, like nix-store --gc --print-roots",
               "The GC roots, one `LINK -> STORE PATH` line each, as `nix-store --gc "
               "--print-roots` prints them. Runtime and temporary roots' labels are "
               "{censored} unless you are root or in the admin group.",
               "  gcroots-query roots\n  gcroots-query roots --json | jq '.[].kind'\n"
               "  gcroots-query roots prune --older-than 30d --dry-run", parents=[common])
    subcommand(sub, "live", "live store paths, like --print-live",
               "Every store path a root keeps alive, one per line (nix-store --gc --print-live).",
               "  gcroots-query live | grep firefox", parents=[common])
    subcommand(sub, "dead", "garbage, like --print-dead",
               "Every store entry a collection would delete now, one per line "
               "(nix-store --gc --print-dead). Deletes nothing.",
               "  gcroots-query dead | wc -l", parents=[common])
    w = subcommand(sub, "why", "a shortest chain from a root to PATH",
                   "Why PATH is alive: a shortest chain root -> ... -> PATH. PATH may be a "
                   "store path, a link into the store (a `result`, followed as nix-store -q "
                   "--roots does), any file or directory inside a store path, or a bare "
                   "<hash>-<name>. Exit 5 when nothing keeps it alive, 2 when it is not in "
                   "the store.",
                   "  gcroots-query why ./result\n"
                   "  gcroots-query why /nix/store/...-openssl-3.0.8/lib/libssl.so\n"
                   "  gcroots-query why 0a1b...-hello-2.12 --all", parents=[common])
    w.add_argument("path", metavar="PATH",
                   help="a store path, a link to one, a file inside one, or <hash>-<name>")
    w.add_argument("--all", action="store_true", help="one chain per root that keeps PATH alive")
    c = subcommand(sub, "cost", "per root: bytes freed if only that root went away",
                   "Per root, what removing only that root would free: the NAR bytes and the "
                   "number of paths only it keeps alive, biggest first.",
                   "  gcroots-query cost --top 10\n  gcroots-query cost --top 0 --json",
                   parents=[common])
    c.add_argument("--top", type=cliargs.count(), default=20, metavar="N",
                   help="show the N biggest (0: all)")
    subcommand(sub, "stats", "counts, sizes, timings",
               "Counts and sizes of the store, its roots, live and dead paths (NAR bytes: "
               "the sizes the Nix DB records), and how long the analysis took.",
               "  gcroots-query stats\n  gcroots-query stats --json | jq .dead_nar_bytes",
               parents=[common])
    for extra in () if lean else _extra_commands():
        extra.register(sub, common)
    return p


def _extra_commands():
    from . import clean_cmd, gc_cmd, profiles_cmd
    return [gc_cmd, clean_cmd, profiles_cmd]


def request_spec(args) -> tuple[dict, tuple[bytes, ...]]:
    if args.command == "why":
        from .gc_cmd import store_path_argument
        return {"all": args.all}, (store_path_argument(args, args.path),)
    if args.command == "cost":
        return {"top": args.top}, ()
    return {}, ()


def run_standalone(args, options: dict, pargs: tuple[bytes, ...], progress) -> conn.Answer:
    from . import standalone
    return standalone.answer(args, args.command, options, pargs, progress)


def check_standalone_flags(parser: argparse.ArgumentParser, args) -> None:
    """The chroot and scan flags describe the store --standalone works on;
    gcrootsd answers about the store it serves, so there they are an error
    (not silently ignored)."""
    if args.standalone or args.command not in DAEMON_COMMANDS:
        return
    if args.command == "roots" and getattr(args, "roots_action", None) == "prune":
        return  # client-side: runs on the store --root names
    for name in STANDALONE_ONLY:
        if getattr(args, name, None) not in (None, False):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} needs --standalone: gcrootsd answers about the store it serves")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    Parser.json_errors = "--json" in argv
    words = set(argv)
    Parser.lean = bool(words & LEAN_COMMANDS) and not words & NOT_LEAN
    try:
        parser = build_parser(lean=Parser.lean)
        args = parser.parse_args(argv)
    except LeanParseError:  # its message (choices, usage) from the whole parser
        Parser.lean = False
        parser = build_parser()
        args = parser.parse_args(argv)
    Parser.lean = False
    check_standalone_flags(parser, args)
    # stdout carries only the answer: what the in-process work (--standalone)
    # logs goes to stderr, never to structlog's default, stdout.
    log.configure("gcroots-query", lazy=True)
    handler = getattr(args, "handler", None)
    if handler is not None:  # client-side commands (profiles) and gc's own flow
        return handler(args)
    try:
        options, pargs = request_spec(args)
    except ValueError as e:
        return error(args, f"{args.command}: {e}", 2)
    with ProgressBar() as progress:
        try:
            if args.standalone:
                answer = run_standalone(args, options, pargs, progress)
            else:
                answer = conn.request(args.socket or conn.default_socket(), args.command,
                                      options, pargs, on_progress=progress)
        except conn.DaemonError as e:
            progress.close()
            return error(args, str(e), 1)
    if answer.status != Status.OK:
        return error(args, answer.message or answer.status.name.lower(), EXIT.get(answer.status, 1))
    out = sys.stdout.buffer
    if answer.paths is not None and not args.json:  # one path a line, as nix-store
        _bigger_pipe(out, sum(map(len, answer.paths)))
        # A MiB or so a write: the pieces are frames of 64 KiB (--standalone's
        # dead set: 4,096 paths each).
        for chunk in _joined(answer.paths, 1 << 20):
            out.write(chunk.replace(b"\0", b"\n"))
    elif args.json:
        out.write(json.dumps(FORMATTERS[args.command].json(answer.all_rows(), args), indent=1,
                             ensure_ascii=True).encode() + b"\n")
    else:
        FORMATTERS[args.command].text(answer.rows, args, out)
    out.flush()
    return 0


def _joined(chunks: list[bytes], size: int) -> Iterator[bytes]:
    """`chunks`, consecutive ones joined up to about `size` bytes."""
    group: list[bytes] = []
    used = 0
    for c in chunks:
        if group and used + len(c) > size:
            yield b"".join(group)
            group, used = [], 0
        group.append(c)
        used += len(c)
    if group:
        yield b"".join(group)


def _bigger_pipe(out, total: int) -> None:
    """A pipe on stdout takes up to a MiB at once (F_SETPIPE_SZ; 64 KiB by
    default) when the answer is bigger: a 1M-path answer (~65 MB) then goes
    through in ~65 wake-ups of its reader instead of ~1,000.  Where the
    kernel refuses (over the user's pipe quota), it stays as it was."""
    if total <= 1 << 16:
        return
    try:
        fd = out.fileno()
        want = min(total, 1 << 20)
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < want:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)  # (never made smaller)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


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
    except OSError as e:
        # Writing the answer failed (`> report.txt` on a full disk): a write
        # to stdout names no file; anything else is a bug, with its traceback.
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO,
                                                     errno.EFBIG):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no retry at exit
        print(f"gcroots-query: cannot write the answer to stdout: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # ^C at a question or while waiting: one line and the status a shell
        # gives SIGINT, never a traceback (the ^C echo ends the prompt's line).
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        return error(argparse.Namespace(json=Parser.json_errors), "interrupted", 130)


if __name__ == "__main__":
    sys.exit(entry())
