"""gcroots-helper's full command line: every command's parser with its help
texts, --help and --version, and the commands other than `serve` (scan,
sandbox-check).  `serve` never loads this module: it parses with
cli.serve_parser(), whose flags (cli.SERVE_FLAGS) are documented here."""

from __future__ import annotations

import argparse
import os

from gcroots import cliargs

from .cli import (LAYOUT_FLAGS, SANDBOX_SKIP, SCAN_FLAGS, SERVE_FLAGS, add_flags, cmd_serve,
                  layout_of)

HELP = {
    "--root": "physical root of a chroot store (like nix-store --store DIR)",
    "--store-dir": "logical store dir (default /nix/store)",
    "--state-dir": "logical state dir (default /nix/var/nix)",
    "--no-runtime": "skip /proc and kernel sysctls",
    "--cmdline": "also find store paths in /proc/PID/cmdline (Nix does not)",
    "--accept-unreadable": "skip (warn) instead of failing the scan on EACCES below PREFIX, e.g. "
                           "NFS homes with root_squash: roots there may be missed (repeatable)",
    "--sandbox-skip": "for testing: leave out a sandbox layer (netns, caps, no_new_privs, "
                      "landlock, seccomp; repeatable or comma-separated); it counts as missing",
    "--socket": "listen here for gcrootsd (root-stream protocol)",
    "--nix-roots-daemon-socket": "also serve Nix >= 2.34's roots-daemon format here",
    "--allow-user": "user allowed to connect (repeatable)",
    "--allow-uid": "uid allowed to connect (repeatable)",
    "--socket-mode": "mode of sockets we create (owner: the first allowed uid)",
    "--log-level": "what to log",
    "--require-sandbox": "refuse to serve unless every sandbox layer is active "
                         "(the systemd unit turns this on)",
}


def cmd_scan(args: argparse.Namespace) -> int:
    from . import print_roots
    return print_roots.main(args)


def cmd_sandbox_check(args: argparse.Namespace) -> int:
    """Exit 0 iff every escape is blocked and every needed operation works."""
    from gcroots import log

    from . import sandbox_check
    log.configure("gcroots-helper", "info", plain=True)
    return sandbox_check.check(layout_of(args), skip=args.sandbox_skip,
                               log=log.get("gcroots.helper.sandbox"),
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
    add_flags(s, SCAN_FLAGS, HELP)
    s.add_argument("--all-candidates", action="store_true",
                   help="do not read the Nix DB; print every candidate, valid or not")
    s.add_argument("--sandbox", action="store_true",
                   help="apply the helper's sandbox before scanning (warn if incomplete)")
    s.add_argument("--require-sandbox", action="store_true",
                   help="apply the sandbox and refuse to scan if a layer is missing")
    add_flags(s, SANDBOX_SKIP, HELP)
    s.set_defaults(func=cmd_scan, parser=s)

    v = command("serve", "serve scans on Unix sockets (or systemd socket activation)",
                "Serve complete root scans to gcrootsd (the root-stream protocol) and, "
                "optionally, Nix >= 2.34's roots-daemon format, to the allowed users only, "
                "from inside the sandbox.",
                "  gcroots-helper serve --socket /run/gcroots/helper.sock --allow-user gcroots "
                "--require-sandbox")
    add_flags(v, SERVE_FLAGS, HELP)
    v.set_defaults(func=cmd_serve, parser=v)

    c = command("sandbox-check", "apply the sandbox, try to escape it, print one line per attempt",
                "Apply the helper's sandbox, try each way out (writes, exec, network, other "
                "processes, privileges) and each thing it must still do; one line per attempt; "
                "exit 0 only if every escape is blocked and every needed operation works.",
                "  gcroots-helper sandbox-check\n"
                "  gcroots-helper sandbox-check --readlink /home/alice/result")
    add_flags(c, LAYOUT_FLAGS, HELP)
    c.add_argument("--readlink", action="append", default=[], metavar="PATH",
                   help="also check that this link (e.g. in a 0700 home) is readable")
    add_flags(c, SANDBOX_SKIP, HELP)
    c.set_defaults(func=cmd_sandbox_check, parser=c)
    return p
