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
    p.add_argument("--log-level", default="info")
    return p


def settings_from(args) -> GCSettings:
    try:
        base = load_gc_settings()
    except NixConfError as e:
        raise SystemExit(f"gcrootsd: {e}") from None
    return GCSettings(
        keep_derivations=base.keep_derivations if args.keep_derivations is None else args.keep_derivations,
        keep_outputs=base.keep_outputs if args.keep_outputs is None else args.keep_outputs)


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
    daemon = Daemon(layout, os.fsencode(args.helper_socket), settings_from(args), admin_gid)
    try:
        daemon.open_db()
    except Exception as e:  # a clear message, not a traceback
        raise SystemExit(f"gcrootsd: {e}") from None

    async def run() -> None:
        listeners = activated_listeners()
        if not listeners or args.socket:
            listeners.append(unix_listener(os.fsencode(args.socket or DEFAULT_SOCKET),
                                           int(args.socket_mode, 8)))
        await daemon.serve(listeners)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
