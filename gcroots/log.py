"""Logging shared by the helper, the daemon and the client: one event per
line, snake_case event names with keyword fields; JSON when stderr is not a
TTY (journald, tests), human-readable when it is.

The daemon and the client render through structlog (exceptions as data;
gcroots/structlogging.py).  The privileged helper does not load structlog
(7,500 lines run as root for what it needs of it): configure(...,
plain=True) writes the same lines with _plain_line below; the helper logs
no exceptions.
"""

from __future__ import annotations

import json as jsonlib
import os
import signal
import sys
import threading
import time
from functools import partialmethod
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
# Of one field of one line: paths, commands, messages may be any user's
# choice, of any length (a client's 60 KB command made 120 KB lines).
MAX_FIELD = 2000


def text(value: Any) -> Any:
    # Paths are bytes end to end; in a log line show them losslessly (up to
    # MAX_FIELD characters, as every text field).
    if isinstance(value, (bytes, bytearray)):
        value = os.fsdecode(bytes(value)).encode("utf-8", "backslashreplace").decode()
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return f"{value[:MAX_FIELD]}... ({len(value)} characters)"
    return value


class Stderr:
    """Where log lines go.  When that pipe is closed (EPIPE: `2>&1 | head`,
    a log reader gone), logging must not raise in whatever code logged: the
    main thread is sent SIGTERM (see process.stop_on_signals) and later
    lines are dropped."""
    broken = False

    def write(self, line: str) -> None:
        if not Stderr.broken:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except BrokenPipeError:
                Stderr.broken = True
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)

    def flush(self) -> None:
        pass


_plain: dict[str, Any] = {}   # the helper's: {"component", "level", "json"}


def configure(component: str, level: str = "info", json: bool | None = None,
              plain: bool = False, *, lazy: bool = False) -> None:
    """lazy=True (gcroots-query): set structlog up when the first line is
    logged -- importing it costs ~50 ms, and such a run usually logs nothing."""
    json = not sys.stderr.isatty() if json is None else json
    if plain:
        _plain.update(component=component, level=LEVELS.index(level), json=json)
    else:
        from . import structlogging
        structlogging.configure(component, level, json, lazy=lazy)


class Logger:
    """log.get()'s: structlog's logger, or after configure(plain=True) the
    helper's plain line writer."""

    def __init__(self, name: str | None = None) -> None:
        self._name, self._structlog = name, None

    def _log(self, level: str, event: str, **fields: Any) -> None:
        if not _plain:
            from . import structlogging
            self._structlog = self._structlog or structlogging.get_logger(self._name)
            getattr(self._structlog, level)(event, **fields)
        elif LEVELS.index(level := level.replace("exception", "error")) >= _plain["level"]:
            Stderr().write(_plain_line(level, event, fields) + "\n")

    # (exception: the daemon's and the client's, with the traceback as data)
    debug = partialmethod(_log, "debug")
    info = partialmethod(_log, "info")
    warning = partialmethod(_log, "warning")
    error = partialmethod(_log, "error")
    exception = partialmethod(_log, "exception")


def _plain_line(level: str, event: str, fields: dict[str, Any]) -> str:
    # (time, built in, not datetime: gcroots-query starts without it, and the
    # helper may write its first line only inside its sandbox)
    now = "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (*time.gmtime((t := time.time_ns()) // 10**9)[:6], t // 1000 % 10**6)
    fields = {k: text(v) for k, v in fields.items()}
    if not _plain["json"]:
        return f"{now} [{level:<9}] {event:<30} " + " ".join(
            f"{k}={v}" for k, v in {**fields, "component": _plain["component"]}.items())
    return jsonlib.dumps({**fields, "event": event, "component": _plain["component"],
                          "level": level, "timestamp": now},
                         default=lambda v: text(v) if isinstance(v, bytes) else repr(v))


get = Logger   # log.get(name): a module's logger
