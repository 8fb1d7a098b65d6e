"""gcroots-helper: scan | serve | sandbox-check."""

from __future__ import annotations

import argparse
import os
import pwd
import resource
import sys
from typing import TYPE_CHECKING

from gcroots import cliargs
from gcroots.layout import StoreLayout
from gcroots.process import run_main, stop_on_signals, stopped_by
from gcroots.storepath import canon_path

if TYPE_CHECKING:
    from .sandbox import Sandbox


LOG_LEVELS = ("debug", "info", "warning", "error")


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"not an absolute path: {value!r}")
    return value


def _layout_flags(p: argparse.ArgumentParser) -> None:
    # --root may be relative, like nix-store --store ./x; the logical dirs not.
    p.add_argument("--root", metavar="DIR",
                   help="physical root of a chroot store (like nix-store --store DIR)")
    p.add_argument("--store-dir", type=_absolute, metavar="DIR",
                   help="logical store dir (default /nix/store)")
    p.add_argument("--state-dir", type=_absolute, metavar="DIR",
                   help="logical state dir (default /nix/var/nix)")


def _layout_args(p: argparse.ArgumentParser) -> None:
    _layout_flags(p)
    p.add_argument("--no-runtime", action="store_true", help="skip /proc and kernel sysctls")
    p.add_argument("--cmdline", action="store_true",
                   help="also find store paths in /proc/PID/cmdline (Nix does not)")
    p.add_argument("--accept-unreadable", action="append", default=[], metavar="PREFIX",
                   type=lambda v: canon_path(os.fsencode(_absolute(v))),
                   help="skip (warn) instead of failing the scan on EACCES below PREFIX, e.g. "
                        "NFS homes with root_squash: roots there may be missed (repeatable)")


def _sandbox_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sandbox-skip", action="append", default=[], metavar="LAYER",
                   help="for testing: leave out a sandbox layer (netns, caps, no_new_privs, "
                        "landlock, seccomp; repeatable or comma-separated); it counts as missing")


def _skip(args: argparse.Namespace) -> set[str]:
    return {x for arg in args.sandbox_skip for x in arg.split(",") if x}


def _sandbox(args: argparse.Namespace, layout: StoreLayout, *,
             read_db: bool = False) -> Sandbox:
    """Apply the sandbox (helper/sandbox.py); SystemExit if it must not run."""
    from gcroots import log

    from . import sandbox
    log.configure("gcroots-helper", getattr(args, "log_level", "info"), plain=True)
    try:
        return sandbox.apply_for_serving(layout, require=args.require_sandbox, log=log.get(
            "gcroots.helper.sandbox"), skip=_skip(args), runtime=not args.no_runtime,
            read_db=read_db)
    except sandbox.SandboxError as e:
        raise SystemExit(f"gcroots-helper {args.command}: {e}") from None


def _layout(args: argparse.Namespace) -> StoreLayout:
    try:
        return StoreLayout.make(args.store_dir, args.state_dir, args.root)
    except ValueError as e:   # e.g. --store-dir /: a usage error (exit 2)
        args.parser.error(str(e))   # (exits)
        raise


def _raise_fd_limit() -> None:
    # A walk holds one fd per directory level, and may go ~2000 deep (PATH_MAX).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except OSError:
            pass  # seccomp'd (systemd ~@resources sets LimitNOFILE= instead)


def cmd_scan(args: argparse.Namespace) -> int:
    from . import print_roots   # its own module: `serve` does not load it
    return print_roots.main(args)


def _uids(args: argparse.Namespace) -> frozenset[int]:
    uids = set(args.allow_uid or [])
    for name in args.allow_user or []:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise SystemExit(f"gcroots-helper: --allow-user {name}: no such user") from None
    return frozenset(uids)


def cmd_serve(args: argparse.Namespace) -> int:
    from gcroots import log, sockets

    from . import serve
    from .sandbox import hidden_dirs, lacking_caps, preflight

    log.configure("gcroots-helper", args.log_level, plain=True)
    if why := lacking_caps():   # every scan would fail: say so now, in one line
        raise SystemExit(f"gcroots-helper serve: refusing to start: {why}")
    _raise_fd_limit()
    layout = _layout(args)
    uids = _uids(args)
    owner = min(uids) if uids else None
    # Under socket activation systemd owns the sockets (names "gcroots" and
    # "nix-roots"); path options would bind over them, so they are ignored.
    listeners, files = serve.systemd_listeners(), []
    if not listeners:
        for path, kind in ((args.socket, serve.ROOTS), (args.nix_roots_daemon_socket, serve.NIX)):
            if path:
                try:
                    sock, file = sockets.listen_unix(os.fsencode(path), args.socket_mode, owner)
                except OSError as e:
                    raise SystemExit(f"gcroots-helper serve: {e}") from None
                listeners.append((sock, kind))
                files.append(file)
    if not listeners:
        raise SystemExit("gcroots-helper serve: no socket (give --socket PATH or use socket activation)")
    sockets.remove_when_gone(files)   # the sandbox will not let us unlink them
    check = preflight(hidden_dirs(), runtime=not args.no_runtime)  # before the sandbox closes /proc/1
    if why := check():
        log.get("gcroots.helper").error("scans_will_fail", reason=why)
    stop_on_signals()
    box = _sandbox(args, layout)   # sockets open, nothing read yet
    server = serve.HelperServer(layout, uids, listeners, runtime=not args.no_runtime,
                                cmdline=args.cmdline, proc_reader=box.proc_reader,
                                preflight=check, accept_unreadable=tuple(args.accept_unreadable),
                                paths={s: f.path for (s, _), f in zip(listeners, files)})
    try:
        server.serve_forever()
    except KeyboardInterrupt as e:
        log.get("gcroots.helper").info("helper_stopped", signal=stopped_by(e))
    # Now: scans in other threads end cut (a failed scan for their peers);
    # finalizing the interpreter under them could abort on stderr's lock.
    os._exit(1 if log.output_broken() else 0)


def cmd_sandbox_check(args: argparse.Namespace) -> int:
    """Exit 0 iff every escape is blocked and every needed operation works."""
    from gcroots import log

    from . import sandbox_check
    log.configure("gcroots-helper", "info", plain=True)
    return sandbox_check.check(_layout(args), skip=_skip(args), log=log.get("gcroots.helper.sandbox"),
                         readlinks=[os.fsencode(p) for p in args.readlink])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gcroots-helper", formatter_class=cliargs.HelpFormatter,
        description=cliargs.describe(
            "Privileged, read-only Nix GC root scanner: finds every GC root (links in "
            "gcroots/ and profiles/, indirect roots in homes, running processes) with two "
            "read capabilities, inside a sandbox, and streams them to gcrootsd."),
        epilog="examples:\n  gcroots-helper scan --no-runtime\n"
               "  gcroots-helper sandbox-check --readlink /home/alice/result\n"
               "  gcroots-helper serve --socket /run/gcroots/helper.sock --allow-user gcroots")
    cliargs.add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str,
                examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=cliargs.describe(description),
                              epilog="examples:\n" + examples,
                              formatter_class=cliargs.HelpFormatter)

    s = command("scan", "scan once and print roots like nix-store --gc --print-roots",
                "Scan once, with this process's rights, and print the roots as `nix-store "
                "--gc --print-roots` does (LINK -> STORE PATH); stale links and warnings go to "
                "stderr.", "  gcroots-helper scan\n  gcroots-helper scan --root /mnt --no-runtime")
    _layout_args(s)
    s.add_argument("--all-candidates", action="store_true",
                   help="do not read the Nix DB; print every candidate, valid or not")
    s.add_argument("--sandbox", action="store_true",
                   help="apply the helper's sandbox before scanning (warn if incomplete)")
    s.add_argument("--require-sandbox", action="store_true",
                   help="apply the sandbox and refuse to scan if a layer is missing")
    _sandbox_args(s)
    s.set_defaults(func=cmd_scan, parser=s)

    v = command("serve", "serve scans on Unix sockets (or systemd socket activation)",
                "Serve complete root scans to gcrootsd (the root-stream protocol) and, "
                "optionally, Nix >= 2.34's roots-daemon format, to the allowed users only, "
                "from inside the sandbox.",
                "  gcroots-helper serve --socket /run/gcroots/helper.sock --allow-user gcroots "
                "--require-sandbox")
    _layout_args(v)
    v.add_argument("--socket", metavar="PATH",
                   help="listen here for gcrootsd (root-stream protocol)")
    v.add_argument("--nix-roots-daemon-socket", metavar="PATH",
                   help="also serve Nix >= 2.34's roots-daemon format here")
    v.add_argument("--allow-user", action="append", metavar="USER",
                   help="user allowed to connect (repeatable)")
    v.add_argument("--allow-uid", action="append", type=cliargs.uid, metavar="UID",
                   help="uid allowed to connect (repeatable)")
    v.add_argument("--socket-mode", default="0600", type=cliargs.file_mode, metavar="MODE",
                   help="mode of sockets we create (owner: the first allowed uid)")
    v.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="what to log")
    v.add_argument("--require-sandbox", action=argparse.BooleanOptionalAction, default=False,
                   help="refuse to serve unless every sandbox layer is active "
                        "(the systemd unit turns this on)")
    _sandbox_args(v)
    v.set_defaults(func=cmd_serve, parser=v)

    c = command("sandbox-check", "apply the sandbox, try to escape it, print one line per attempt",
                "Apply the helper's sandbox, try each way out (writes, exec, network, other "
                "processes, privileges) and each thing it must still do; one line per attempt; "
                "exit 0 only if every escape is blocked and every needed operation works.",
                "  gcroots-helper sandbox-check\n"
                "  gcroots-helper sandbox-check --readlink /home/alice/result")
    _layout_flags(c)
    c.add_argument("--readlink", action="append", default=[], metavar="PATH",
                   help="also check that this link (e.g. in a 0700 home) is readable")
    _sandbox_args(c)
    c.set_defaults(func=cmd_sandbox_check, parser=c)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sandbox import NO_SYSCALLS   # every command makes raw system calls by libseccomp's table
    if NO_SYSCALLS:
        sys.exit(f"gcroots-helper: {NO_SYSCALLS}")
    return run_main("gcroots-helper", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
