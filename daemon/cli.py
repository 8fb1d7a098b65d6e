"""gcrootsd: the unprivileged daemon."""

from __future__ import annotations

import argparse
import grp
import os
import signal
import sys

import trio

# numpy asks for transparent huge pages for every array of 4 MB or more; on
# a machine whose memory is fragmented (a builder, after hours of page
# cache) a fault in one may compact memory first.  gcrootsd makes arrays of
# that size for every answer: `dead` after 1,000 new paths at a million
# took 0.52-0.66 s with huge pages, 0.40-0.44 s without (bench/dead.py).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from gcroots import argtypes, cliargs, log
from gcroots.layout import StoreLayout
from gcroots.process import run_main, stop_on_signals, stopped_by

from .nixconf import settings_from

DEFAULT_SOCKET = "/run/gcroots/gcrootsd.sock"
DEFAULT_HELPER_SOCKET = "/run/gcroots/helper.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gcrootsd", formatter_class=cliargs.HelpFormatter,
        description=cliargs.describe(
            "Unprivileged Nix GC daemon: takes complete root sets from gcroots-helper, reads "
            "the Nix DB, answers gcroots-query (roots, live, dead, why, cost, stats) and "
            "collects garbage with Nix's locking protocol, as the store's owner."),
        epilog="examples:\n"
               "  gcrootsd --helper-socket /run/gcroots/helper.sock --admin-group gcroots-admin\n"
               "  gcrootsd --min-free 5% --max-free 15%      collect by itself on a full disk\n"
               "  gcrootsd --metrics-address 127.0.0.1:9847")
    cliargs.add_version(p)
    p.add_argument("--helper-socket", default=DEFAULT_HELPER_SOCKET, metavar="PATH",
                   help="gcroots-helper's socket")
    p.add_argument("--socket", default=None, metavar="PATH",
                   help=f"admin socket to create (default {DEFAULT_SOCKET}; "
                        "ignored under socket activation)")
    p.add_argument("--socket-mode", default="0666", type=argtypes.file_mode, metavar="MODE",
                   help="mode of the admin socket (authorization is per peer)")
    p.add_argument("--root", metavar="DIR", help="physical root of a chroot store")
    p.add_argument("--store-dir", metavar="DIR", help="logical store dir (default /nix/store)")
    p.add_argument("--state-dir", metavar="DIR", help="logical state dir (default /nix/var/nix)")
    p.add_argument("--admin-group", metavar="GROUP",
                   help="members get full answers and may collect garbage")
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="override nix.conf's keep-outputs")
    p.add_argument("--keep-derivations", action=argparse.BooleanOptionalAction, default=None,
                   help="override nix.conf's keep-derivations")
    g = p.add_argument_group("automatic collection")
    g.add_argument("--min-free", metavar="SIZE|N%", type=cliargs.size(minimum=1, percent=True),
                   help="collect when the store's file system has less free space than this "
                        "(e.g. 10G, or 5%% of its size)")
    g.add_argument("--max-free", metavar="SIZE|N%", type=cliargs.size(minimum=1, percent=True),
                   help="...until this much is free (default: --min-free; not below it; "
                        "bytes or a percentage, as --min-free)")
    g.add_argument("--gc-interval", metavar="DURATION", type=cliargs.duration(),
                   help="also collect on this schedule (e.g. 1d, 12h; the systemd timer is the "
                        "usual way)")
    g.add_argument("--free-check-interval", metavar="DURATION", default="5min",
                   type=cliargs.duration(), help="how often to look at free space")
    m = p.add_argument_group("metrics (Prometheus)")
    m.add_argument("--metrics-file", metavar="PATH",
                   help="write metrics here for node_exporter's textfile collector")
    m.add_argument("--metrics-address", metavar="[HOST:]PORT", type=cliargs.host_port,
                   help="serve metrics over HTTP here (default host 127.0.0.1)")
    m.add_argument("--metrics-interval", metavar="DURATION", default="5min",
                   type=cliargs.duration(),
                   help="refresh them this often even without queries")
    p.add_argument("--log-level", default="info", choices=log.LEVELS,
                   help="what to log (JSON lines on stderr, the journal)")
    return p


def parse_args(argv: list[str] | None = None):
    p = build_parser()
    args = p.parse_args(argv)
    lo, hi = args.min_free, args.max_free
    if hi is None:
        return args
    if lo is None:
        p.error("argument --max-free: needs --min-free (collection starts below --min-free "
                "and stops once --max-free is free)")
    if isinstance(lo, cliargs.Percent) != isinstance(hi, cliargs.Percent):
        p.error("argument --max-free: give it as --min-free is given (both sizes, or both "
                "percentages of the file system)")
    shown = (lambda v: f"{v.value:g}%") if isinstance(lo, cliargs.Percent) else (
        lambda v: f"{v} bytes")
    if (hi.value < lo.value) if isinstance(lo, cliargs.Percent) else hi < lo:
        p.error(f"argument --max-free: must not be below --min-free ({shown(hi)} < "
                f"{shown(lo)}): collection starts below --min-free and stops once "
                "--max-free is free")
    return args


def auto_gc_from(args):
    from .server import AutoGC
    if not (args.min_free or args.gc_interval):
        return None
    return AutoGC(min_free=args.min_free, max_free=args.max_free, interval=args.gc_interval,
                  check_interval=args.free_check_interval)


def main(argv: list[str] | None = None) -> int:
    return run_main("gcrootsd", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from .server import Daemon, activated_listeners, unix_listener
    from .store import one_malloc_arena

    args = parse_args(argv)
    log.configure("gcrootsd", args.log_level)
    stop_on_signals()
    _log = log.get("gcroots.daemon")
    layout = StoreLayout.make(args.store_dir, args.state_dir, args.root)
    admin_gid = None
    if args.admin_group:
        try:
            admin_gid = grp.getgrnam(args.admin_group).gr_gid
        except KeyError:
            raise SystemExit(f"gcrootsd: --admin-group {args.admin_group}: no such group") from None
    one_malloc_arena()  # before a thread starts: see there
    daemon = Daemon(layout, os.fsencode(args.helper_socket), settings_from(args), admin_gid,
                    auto_gc=auto_gc_from(args))
    if args.metrics_file or args.metrics_address:
        try:
            from .metrics import Metrics
        except ImportError:
            raise SystemExit("gcrootsd: metrics need the prometheus-client package") from None
        try:
            daemon.metrics_interval = args.metrics_interval
            daemon.metrics = Metrics(args.metrics_file, args.metrics_address)
        except OSError as e:
            raise SystemExit(f"gcrootsd: metrics: {e}") from None
    try:
        daemon.open_db()
    except Exception as e:  # a clear message, not a traceback
        raise SystemExit(f"gcrootsd: {e}") from None
    from .gc import GCLock
    GCLock(layout).create()  # before a Nix process run by another user makes it theirs
    # Under socket activation systemd owns the socket: --socket is ignored
    # (binding it again would replace systemd's socket file).
    listeners, socket_file = activated_listeners(), None
    if not listeners:
        try:
            listener, socket_file = unix_listener(os.fsencode(args.socket or DEFAULT_SOCKET),
                                          args.socket_mode)
        except OSError as e:
            raise SystemExit(f"gcrootsd: {e}") from None
        listeners.append(listener)
    elif args.socket:
        _log.info("socket_option_ignored", socket=args.socket, reason="socket activation")
    stopped = []

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.serve, listeners)
                async for signum in signals:
                    stopped.append(signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except KeyboardInterrupt as e:  # before trio took the signals over
        stopped.append(stopped_by(e))
    finally:
        if socket_file is not None:
            socket_file.remove()
    _log.info("daemon_stopped", signal=stopped[0] if stopped else None,
              log_closed=log.Stderr.broken or None)
    return 1 if log.Stderr.broken else 0


if __name__ == "__main__":
    sys.exit(main())
