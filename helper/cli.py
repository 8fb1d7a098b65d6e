"""gcroots-helper: scan | serve | sandbox-check.

`gcroots-helper serve` runs as root for as long as the machine is up: it
parses its command line with serve_parser() below, its flags and nothing
else.  The full parser -- the other commands, every help text, --help and
--version -- is built by helper/commands.py, which `serve` does not load
(its --help does).  Nor does it bind its sockets or apply the sandbox
layers that survive execve: every start first runs helper/launch.py, which
binds them (unless systemd handed them over), prepares (helper/prepare.py)
and execs the same command line in place; the serving process verifies
what was prepared."""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import sys
from typing import TYPE_CHECKING, Any

from gcroots import argtypes, log
from gcroots.layout import StoreLayout
from gcroots.process import run_main, stop_on_signals, stopped_by
from gcroots.storepath import canon_path

# Set by the launcher for the process it execs: its pid, then the fd of
# what it hands over (launch._hand_over: the seccomp programs it compiled,
# and why every scan must fail, prepare.view_problems).
PREPARED = "GCROOTS_HELPER_PREPARED"

if TYPE_CHECKING:
    from .sandbox import Programs, Sandbox

def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"not an absolute path: {value!r}")
    return value


def _nonempty(value: str) -> str:
    if not value:   # '' would mean / (--root) or no socket at all
        raise argparse.ArgumentTypeError("must not be empty")
    return value


# Flags as (name, argparse keywords), in the order --help shows them; their
# help texts are commands.HELP's.  --root may be relative, like nix-store
# --store ./x; the logical dirs not.
Flags = tuple[tuple[str, dict[str, Any]], ...]
LAYOUT_FLAGS: Flags = (("--root", dict(type=_nonempty, metavar="DIR")),
                       ("--store-dir", dict(type=_absolute, metavar="DIR")),
                       ("--state-dir", dict(type=_absolute, metavar="DIR")))
SCAN_FLAGS: Flags = LAYOUT_FLAGS + (
    ("--no-runtime", dict(action="store_true")),
    ("--cmdline", dict(action="store_true")),
    ("--accept-unreadable", dict(action="append", default=[], metavar="PREFIX",
                                 type=lambda v: canon_path(os.fsencode(_absolute(v))))))
def _layers(value: str) -> list[str]:
    from .sandbox import LAYERS
    for layer in (wanted := [x for x in value.split(",") if x]):
        if layer not in LAYERS:
            raise argparse.ArgumentTypeError(f"unknown layer {layer!r} (layers: {', '.join(LAYERS)})")
    return wanted


SANDBOX_SKIP: Flags = (("--sandbox-skip", dict(action="extend", default=[], type=_layers,
                                               metavar="LAYER")),)
SERVE_FLAGS: Flags = SCAN_FLAGS + (
    ("--socket", dict(type=_nonempty, metavar="PATH")),
    ("--nix-roots-daemon-socket", dict(type=_nonempty, metavar="PATH")),
    ("--allow-user", dict(action="append", default=[], type=_nonempty, metavar="USER")),
    ("--allow-uid", dict(action="append", default=[], type=argtypes.uid, metavar="UID")),
    ("--socket-mode", dict(default="0600", type=argtypes.file_mode, metavar="MODE")),
    ("--log-level", dict(default="info", choices=log.LEVELS)),
    ("--require-sandbox", dict(action=argparse.BooleanOptionalAction, default=False))) + SANDBOX_SKIP


def add_flags(p: argparse.ArgumentParser, flags: Flags, help: dict[str, str] = {}) -> None:
    for name, kw in flags:
        p.add_argument(name, help=help.get(name), **kw)


class _FullHelp(argparse.Action):
    def __call__(self, *_: object) -> None:
        build_parser().parse_args(["serve", "--help"])


def serve_parser() -> argparse.ArgumentParser:
    """`serve`'s flags alone (the same usage errors as the full parser's)."""
    p = argparse.ArgumentParser(prog="gcroots-helper serve", add_help=False)
    p.add_argument("-h", "--help", action=_FullHelp, nargs=0)
    add_flags(p, SERVE_FLAGS)
    p.set_defaults(func=cmd_serve, parser=p, command="serve")
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import commands
    return commands.build_parser()


def apply_sandbox(args: argparse.Namespace, layout: StoreLayout, *, read_db: bool = False,
                  prepared: Programs | str | None = None) -> Sandbox:
    """Apply the sandbox (helper/sandbox.py); SystemExit if it must not run."""
    from . import sandbox
    try:
        return sandbox.apply_for_serving(layout, require=args.require_sandbox, log=log.get(
            "gcroots.helper.sandbox"), skip=args.sandbox_skip, runtime=not args.no_runtime,
            read_db=read_db, prepared=prepared)
    except sandbox.SandboxError as e:
        raise SystemExit(f"gcroots-helper {args.command}: {e}") from None


def layout_of(args: argparse.Namespace) -> StoreLayout:
    try:
        return StoreLayout.make(args.store_dir, args.state_dir, args.root)
    except ValueError as e:   # e.g. --store-dir /: a usage error (exit 2)
        args.parser.error(str(e))   # (exits)
        raise


def _uid_of(user: str) -> int:
    # At run time, not while parsing: a unit's command line is checked where
    # its user need not exist.
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise SystemExit(f"gcroots-helper: --allow-user {user}: no such user") from None


def cmd_serve(args: argparse.Namespace) -> int:
    log.configure("gcroots-helper", args.log_level, plain=True)
    uids = frozenset(args.allow_uid + [_uid_of(name) for name in args.allow_user])
    layout = layout_of(args)
    # Not prepared yet (by this very process, before an exec): bind the
    # sockets unless systemd handed them over, apply what survives exec,
    # exec this again (helper/launch.py).  Not a layer is taken on trust:
    # apply_sandbox(prepared=...) verifies each -- but for the seccomp
    # programs' content, which nothing here can check without compiling:
    # they are whatever the process that exec'd us in place (the same pid:
    # it ran as us, with our privileges, before any layer) sealed in the
    # memfd.  Review3 handed over an allow-all program that way, and it was
    # installed and logged as sandbox_applied; the environment alone, with
    # no such fd, cannot do it (tests/test_helper_prepared.py).
    pid, _, fd = os.environ.pop(PREPARED, "").partition(":")
    if pid != str(os.getpid()):
        from .launch import launch
        launch(args, uids, (layout.gcroots_dir, layout.profiles_dir))
    from gcroots.activation import listen_fds

    from . import serve
    from .sandbox import handed_over, lacking_caps
    programs, view = handed_over(fd)   # first: its fd closed before anything could inherit it
    # Sockets from systemd, or from our launcher: one named "nix-roots"
    # speaks the Nix compat format, any other ("gcroots") ours.  Path
    # options would bind over them, so they are ignored (they only name them
    # in the log).
    paths = {serve.ROOTS: args.socket, serve.NIX: args.nix_roots_daemon_socket}
    try:
        stop_on_signals()   # a launcher blocked these: one sent since is delivered here
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        if not (listeners := [(s, kind, os.fsencode(paths[kind] or s.getsockname())) for s, kind in
                              ((s, serve.NIX if name == serve.NIX else serve.ROOTS) for s, name in listen_fds())]):
            # (marked prepared, yet nothing handed over: it would serve nothing, forever)
            raise SystemExit("gcroots-helper serve: no socket (give --socket PATH or use socket activation)")
        box = apply_sandbox(args, layout, prepared=programs)   # sockets open, nothing read yet
        server = serve.HelperServer(layout, uids, listeners, runtime=not args.no_runtime,
                                    cmdline=args.cmdline, proc_reader=box.proc_reader,
                                    preflight=lambda: "; ".join(w for w in (lacking_caps(), view) if w),
                                    accept_unreadable=tuple(args.accept_unreadable))
        server.serve_forever()
    except KeyboardInterrupt as e:
        log.get("gcroots.helper").info("helper_stopped", signal=stopped_by(e))
    # Now: scans in other threads end cut (a failed scan for their peers);
    # finalizing the interpreter under them could abort on stderr's lock.
    os._exit(1 if log.Stderr.broken else 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = (serve_parser().parse_args(argv[1:]) if argv[:1] == ["serve"]
            else build_parser().parse_args(argv))
    from .sandbox import NO_SYSCALLS   # every command makes raw system calls by libseccomp's table
    if NO_SYSCALLS:
        sys.exit(f"gcroots-helper: {NO_SYSCALLS}")
    return run_main("gcroots-helper", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
