"""gcroots-helper scan: one scan with this process's rights, printed as
`LINK -> STOREPATH` like nix-store --gc --print-roots (only the roots the
Nix DB calls valid, unless --all-candidates).  Not loaded by `serve`."""

from __future__ import annotations

import argparse
import os
import sys

from gcroots import log
from gcroots.nixdb import NixDBError, connect_ro, valid_subset
from gcroots.protocol.rootstream import Root, ScanWarning, StaleLink

from .cli import apply_sandbox, layout_of
from .prepare import hidden_dirs, preflight, raise_fd_limit
from .scan import ScanError, Scanner


def main(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    raise_fd_limit()
    # Before the sandbox closes /proc/1.
    check = preflight(hidden_dirs(scanned=(layout.gcroots_dir, layout.profiles_dir)), runtime=not args.no_runtime)
    box = None
    if args.sandbox or args.require_sandbox:
        log.configure("gcroots-helper", "info", plain=True)
        box = apply_sandbox(args, layout, read_db=not args.all_candidates)
    err = sys.stderr
    roots: set[tuple[bytes, bytes]] = set()
    try:
        for rec in Scanner(layout, runtime=not args.no_runtime, cmdline=args.cmdline,
                           proc_reader=box.proc_reader if box else None, preflight=check,
                           accept_unreadable=tuple(args.accept_unreadable)).scan():
            if isinstance(rec, Root):
                roots.add((rec.label, rec.store_path))
            elif isinstance(rec, StaleLink):
                err.write(f"stale link: {os.fsdecode(rec.link)} -> {os.fsdecode(rec.target)}\n")
            elif isinstance(rec, ScanWarning):
                err.write(f"warning: {os.fsdecode(rec.path)}: {rec.message}\n")
    except ScanError as e:
        err.write(f"gcroots-helper: scan failed: {e}\n")
        return 1
    if not args.all_candidates:
        try:
            conn = connect_ro(layout.db_path, create_files=False)
            valid = valid_subset(conn, {sp for _, sp in roots})
        except NixDBError as e:
            err.write(f"gcroots-helper: {e} (use --all-candidates to skip the validity check)\n")
            return 1
        for label, sp in sorted(roots):
            if sp not in valid:
                err.write(f"skipping invalid root from '{os.fsdecode(label)}' to '{os.fsdecode(sp)}'\n")
        roots = {r for r in roots if r[1] in valid}
    out = sys.stdout.buffer
    for label, sp in sorted(roots):
        out.write(label + b" -> " + sp + b"\n")
    out.flush()
    return 0
