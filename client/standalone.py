"""--standalone: the daemon's queries, answered in this process (single-user
machines, scripts, tests).  The scan runs with the caller's rights."""

from __future__ import annotations

import os
import sqlite3

from gcroots.daemon import engine
from gcroots.daemon.nixconf import settings_from
from gcroots.daemon.store import StoreDB
from gcroots.layout import StoreLayout
from gcroots.nixdb import describe_error
from gcroots.protocol.admin import Progress, Status

from .conn import Answer, DaemonError

# Answers that feed deletion: an unprivileged scan cannot see other users'
# private roots, so these need root unless the caller accepts that.
NEEDS_FULL_SCAN = frozenset({"dead", "gc"})
# Answers made again when the DB changed under a lock-free read (StoreDB.changed).
ATTEMPTS = 3


def layout_of(args) -> StoreLayout:
    return StoreLayout.make(args.store_dir, args.state_dir, args.root)


def _refused(args, command: str, consequence: str) -> Answer | None:
    """Refuses an unprivileged scan to a command that would act on it,
    unless the caller accepts that (--allow-unprivileged-scan)."""
    if os.geteuid() == 0 or args.allow_unprivileged_scan:
        return None
    return Answer(Status.REFUSED, f"--standalone {command} needs root: an unprivileged scan "
                  "cannot read other users' indirect roots or processes, so it would "
                  f"{consequence} (use the daemon, or --allow-unprivileged-scan)")


def answer(args, command: str, options: dict, pargs: tuple[bytes, ...],
           progress=lambda p: None) -> Answer:
    if command in NEEDS_FULL_SCAN and (refusal := _refused(args, command, "call live paths dead")):
        return refusal
    try:  # before the scan
        engine.check_request(command, options, pargs)
    except engine.BadRequest as e:
        return Answer(Status.BAD_REQUEST, str(e))
    layout = layout_of(args)
    for _ in range(ATTEMPTS):
        try:
            # The twin: the valid paths are compared with the store's entries
            # on it while this connection walks the live closure.
            db = StoreDB.open(layout, create_files=False, twin=command in engine.NEEDS_DEAD)
            db.one_shot()
        except Exception as e:
            raise DaemonError(str(e)) from None
        try:
            # Read without locks (no -wal when opened) and changed meanwhile:
            # what we read may mix two states of the DB (and fail oddly).  Again.
            try:
                out = _answer(args, layout, db, command, options, pargs, progress)
            except Exception:
                if db.changed():
                    continue
                raise
            if not db.changed():
                return out
        finally:
            db.close()
    return Answer(Status.ERROR, _changed(layout, ATTEMPTS))


def _changed(layout: StoreLayout, times: int) -> str:
    return (f"the Nix database {os.fsdecode(layout.db_path)} changed while it was read without "
            f"locks (a Nix command started meanwhile){f', {times} times' if times > 1 else ''}; "
            "try again")


def _answer(args, layout: StoreLayout, db: StoreDB, command: str, options: dict,
            pargs: tuple[bytes, ...], progress) -> Answer:
    try:
        want_dead = command in engine.NEEDS_DEAD
        names = engine.listing_in_thread(layout) if want_dead else None  # beside the scan
        progress(Progress("scanning roots", "scan"))
        rootset = engine.scan_in_process(layout, runtime=not args.no_runtime)
        progress(Progress("computing the live set", "plan"))
        a = engine.analyze(layout, db, rootset, settings_from(args), want_dead=want_dead,
                           names=names)
        if command in ("live", "dead"):
            return Answer(Status.OK, "", paths=engine.path_chunks_unframed(a, command))
        rows = engine.query_rows(a, db, command, options, pargs, censor=False)
    except engine.IncompleteRoots as e:
        return Answer(Status.ERROR, f"no complete root set, refusing to answer: {e}")
    except engine.NotAlive as e:
        return Answer(Status.NEGATIVE, str(e))
    except engine.BadRequest as e:
        return Answer(Status.BAD_REQUEST, str(e))
    except sqlite3.Error as e:
        return Answer(Status.ERROR, describe_error(e, layout.db_path))
    return Answer(Status.OK, "", rows)


def collect(args, opts: dict, paths: tuple[bytes, ...] | None = None,
            progress=lambda p: None) -> Answer:
    """gc --standalone: the same collection, in this process; with `paths`,
    delete --standalone."""
    import json

    from gcroots.daemon.gc import Busy, Collection, GCError, GCOptions

    if refusal := _refused(args, args.command, "delete live paths"):
        return refusal
    layout = layout_of(args)
    options = GCOptions.from_request(opts)
    options.paths = paths
    c = Collection(layout, settings_from(args), options, progress=progress)
    try:
        db = StoreDB.open(layout, create_files=not options.dry_run)
    except Exception as e:
        raise DaemonError(str(e)) from None
    try:
        c.begin()
        c.start_deleters()
        progress(Progress("scanning roots", "scan"))
        rootset = engine.scan_in_process(layout, runtime=not args.no_runtime)
        c.plan(rootset, db)
        result = c.execute(layout.db_path)
        if db.changed():   # a dry run's plan, read without locks: see answer()
            return Answer(Status.ERROR, _changed(layout, 1))
        c.remove_stale_links(lambda: engine.scan_in_process(layout, runtime=False))
    except engine.IncompleteRoots as e:
        return Answer(Status.ERROR, f"no complete root set, refusing to collect: {e}")
    except Busy as e:
        return Answer(Status.BUSY, str(e))
    except GCError as e:
        return Answer(Status.ERROR, str(e))
    except sqlite3.Error as e:  # reading the DB (writing it is a GCError)
        return Answer(Status.ERROR, describe_error(e, layout.db_path))
    except Exception as e:  # e.g. the disk or the DB failing mid-way: stopped, said clearly
        return Answer(Status.ERROR, f"the collection stopped: {type(e).__name__}: {e} (paths are "
                      "invalidated in the DB before their files go, so the store stays "
                      "consistent; the next collection finishes the job)")
    finally:
        c.end()
        db.close()
    return Answer(Status.OK, json.dumps(result.summary()), [(p,) for p in result.deleted])
