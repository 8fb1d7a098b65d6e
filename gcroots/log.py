"""Logging shared by the helper, the daemon and the client: one event per
line, snake_case event names with keyword fields; JSON when stderr is not a
TTY (journald, tests), human-readable when it is.

The daemon and the client render through structlog (exceptions as data).
The privileged helper does not import structlog (7,500 lines run as root
for what it needs of it): configure(..., plain=True) writes the same lines
with Logger._plain_line below; the helper logs no exceptions.

configure(lazy=True) (gcroots-query) sets structlog up when the first line
is logged, not before: importing it costs ~50 ms, a sixth of what a
one-shot `gcroots-query --standalone dead` takes, and such a run usually
logs nothing.
"""

from __future__ import annotations

import datetime
import json as jsonlib
import logging
import os
import signal
import sys
import threading

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


# Of one field of one line: paths, commands, messages may be any user's
# choice, of any length (a client's 60 KB command made 120 KB lines).
MAX_FIELD = 2000


def _text(value):
    # Paths are bytes end to end; in a log line show them losslessly (up to
    # MAX_FIELD characters, as every text field).
    if isinstance(value, (bytes, bytearray)):
        value = os.fsdecode(bytes(value)).encode("utf-8", "backslashreplace").decode()
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return f"{value[:MAX_FIELD]}... ({len(value)} characters)"
    return value


class _Stderr:
    """Where log lines go.  When that pipe is closed (EPIPE: `2>&1 | head`,
    a log reader gone), logging must not raise in whatever code logged: the
    main thread is sent SIGTERM (see process.stop_on_signals) and later
    lines are dropped."""
    broken = False

    def write(self, text: str) -> None:
        if not self.broken:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except BrokenPipeError:
                _Stderr.broken = True
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def flush(self) -> None:
        pass


def output_broken() -> bool:
    return _Stderr.broken


_plain: dict = {}   # the helper's: {"component", "level", "json"}
_pending: list[tuple[str, int, bool]] = []   # configure(lazy=True)'s, until a line is logged


def configure(component: str, level: str = "info", json: bool | None = None,
              plain: bool = False, *, lazy: bool = False) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    if plain:
        _plain.update(component=component, level=_LEVELS.get(level, logging.INFO), json=json)
        return
    _pending[:] = [(component, _LEVELS.get(level, logging.INFO), json)]
    if not lazy or "structlog" in sys.modules:
        _apply_pending()


def _apply_pending() -> None:
    while _pending:
        from . import structlogging   # gcrootsd's and gcroots-query's, not the helper's
        structlogging.configure(*_pending.pop(), _Stderr(), _text)


class Logger:
    """log.get()'s: structlog's logger, or after configure(plain=True) the
    helper's plain line writer."""

    def __init__(self, name: str | None) -> None:
        self._name, self._structlog = name, None

    def _log(self, level: str, event: str, **fields) -> None:
        if not _plain:
            if self._structlog is None:
                _apply_pending()
                import structlog
                self._structlog = structlog.get_logger(self._name)
            getattr(self._structlog, level)(event, **fields)
        elif _LEVELS.get(level, logging.ERROR) >= _plain["level"]:
            _Stderr().write(self._plain_line(level, event, fields) + "\n")

    @staticmethod
    def _plain_line(level: str, event: str, fields: dict) -> str:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        fields = {k: _text(v) for k, v in fields.items()}
        if not _plain["json"]:
            return f"{now} [{level:<9}] {event:<30} " + " ".join(
                f"{k}={v}" for k, v in {**fields, "component": _plain["component"]}.items())
        line = {**fields, "event": event, "component": _plain["component"], "level": level,
                "timestamp": now}
        return jsonlib.dumps(line, default=lambda v: _text(v) if isinstance(v, bytes) else repr(v))

    def debug(self, event: str, **fields) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields) -> None:
        self._log("error", event, **fields)

    def exception(self, event: str, **fields) -> None:
        self._log("exception" if not _plain else "error", event, **fields)


def get(name: str | None = None) -> Logger:
    return Logger(name)
