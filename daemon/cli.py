"""gcrootsd: the unprivileged daemon."""

from __future__ import annotations

import argparse
import grp
import os
import sys

import trio

from gcroots import log
from gcroots.layout import StoreLayout

from .nixconf import GCSettings, NixConfError, load_gc_settings

DEFAULT_SOCKET = "/run/gcroots/gcrootsd.sock"
DEFAULT_HELPER_SOCKET = "/run/gcroots/helper.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gcrootsd", description="Unprivileged Nix GC daemon.")
    p.add_argument("--helper-socket", default=DEFAULT_HELPER_SOCKET,
                   help=f"gcroots-helper's socket (default {DEFAULT_HELPER_SOCKET})")
    p.add_argument("--socket", default=None,
                   help=f"admin socket to create (default {DEFAULT_SOCKET}; "
                        "ignored under socket activation)")
    p.add_argument("--socket-mode", default="0666",
                   help="mode of the admin socket (authorization is per peer); default 0666")
    p.add_argument("--root", help="physical root of a chroot store")
    p.add_argument("--store-dir")
    p.add_argument("--state-dir")
    p.add_argument("--admin-group", help="members get full answers and may collect garbage")
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="override nix.conf's keep-outputs")
    p.add_argument("--keep-derivations", action=argparse.BooleanOptionalAction, default=None,
                   help="override nix.conf's keep-derivations")
    g = p.add_argument_group("automatic collection")
    g.add_argument("--min-free", metavar="SIZE",
                   help="collect when the store's file system has less free space than this")
    g.add_argument("--max-free", metavar="SIZE",
                   help="...until this much is free (default: --min-free)")
    g.add_argument("--gc-interval", metavar="DURATION",
                   help="also collect on this schedule (e.g. 1d, 12h; the systemd timer is the "
                        "usual way)")
    g.add_argument("--free-check-interval", metavar="DURATION", default="5m",
                   help="how often to look at free space (default 5m)")
    m = p.add_argument_group("metrics (Prometheus)")
    m.add_argument("--metrics-file", metavar="PATH",
                   help="write metrics here for node_exporter's textfile collector")
    m.add_argument("--metrics-address", metavar="[HOST:]PORT",
                   help="serve metrics over HTTP here (default host 127.0.0.1)")
    m.add_argument("--metrics-interval", metavar="DURATION", default="5m",
                   help="refresh them this often even without queries (default 5m)")
    p.add_argument("--log-level", default="info")
    return p


def parse_duration(text: str) -> float:
    """`90`, `30s`, `5m`, `12h`, `7d`, `2w` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 5m, 12h, 7d)") from None
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value


def auto_gc_from(args):
    from .gc import parse_size
    from .server import AutoGC
    if not (args.min_free or args.max_free or args.gc_interval):
        return None
    try:
        return AutoGC(min_free=parse_size(args.min_free) if args.min_free else None,
                      max_free=parse_size(args.max_free) if args.max_free else None,
                      interval=parse_duration(args.gc_interval) if args.gc_interval else None,
                      check_interval=parse_duration(args.free_check_interval))
    except ValueError as e:
        raise SystemExit(f"gcrootsd: {e}") from None


def settings_from(args) -> GCSettings:
    try:
        base = load_gc_settings()
    except NixConfError as e:
        raise SystemExit(f"gcrootsd: {e}") from None
    return GCSettings(
        keep_derivations=base.keep_derivations if args.keep_derivations is None else args.keep_derivations,
        keep_outputs=base.keep_outputs if args.keep_outputs is None else args.keep_outputs,
        ca_derivations=base.ca_derivations)


def main(argv: list[str] | None = None) -> int:
    from .server import Daemon, activated_listeners, unix_listener

    args = build_parser().parse_args(argv)
    log.configure("gcrootsd", args.log_level)
    layout = StoreLayout.make(args.store_dir, args.state_dir, args.root)
    admin_gid = None
    if args.admin_group:
        try:
            admin_gid = grp.getgrnam(args.admin_group).gr_gid
        except KeyError:
            raise SystemExit(f"gcrootsd: --admin-group {args.admin_group}: no such group") from None
    daemon = Daemon(layout, os.fsencode(args.helper_socket), settings_from(args), admin_gid,
                    auto_gc=auto_gc_from(args))
    if args.metrics_file or args.metrics_address:
        try:
            from .metrics import Metrics
        except ImportError:
            raise SystemExit("gcrootsd: metrics need the prometheus-client package") from None
        try:
            daemon.metrics_interval = parse_duration(args.metrics_interval)
            daemon.metrics = Metrics(args.metrics_file, args.metrics_address)
        except (ValueError, OSError) as e:
            raise SystemExit(f"gcrootsd: metrics: {e}") from None
    try:
        daemon.open_db()
    except Exception as e:  # a clear message, not a traceback
        raise SystemExit(f"gcrootsd: {e}") from None

    async def run() -> None:
        # Under socket activation systemd owns the socket: --socket is ignored
        # (binding it again would replace systemd's socket file).
        listeners = activated_listeners()
        if not listeners:
            listeners.append(unix_listener(os.fsencode(args.socket or DEFAULT_SOCKET),
                                           int(args.socket_mode, 8)))
        elif args.socket:
            log.get("gcroots.daemon").info("socket_option_ignored", socket=args.socket,
                                           reason="socket activation")
        await daemon.serve(listeners)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
