"""structlog set-up shared by the helper and the daemon: one event per line,
snake_case event names with keyword fields; JSON when stderr is not a TTY
(journald, tests), human-readable when it is.

configure(lazy=True) (gcroots-query) imports structlog when the first line
is logged, not before: it costs ~50 ms, a sixth of what a one-shot
`gcroots-query --standalone dead` takes, and such a run usually logs
nothing.  The helper and gcrootsd import it at once (the helper's sandbox
allows reading only the code it has loaded before it closes)."""

from __future__ import annotations

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


def _bytes_to_text(_logger, _name, event_dict):
    # Paths are bytes end to end; in a log line show them losslessly (up to
    # MAX_FIELD characters, as every text field).
    for key, value in event_dict.items():
        if isinstance(value, (bytes, bytearray)):
            value = event_dict[key] = os.fsdecode(bytes(value)).encode(
                "utf-8", "backslashreplace").decode()
        if isinstance(value, str) and len(value) > MAX_FIELD:
            event_dict[key] = f"{value[:MAX_FIELD]}... ({len(value)} characters)"
    return event_dict


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


_config: tuple[str, str, bool | None] | None = None


def configure(component: str, level: str = "info", json: bool | None = None, *,
              lazy: bool = False) -> None:
    global _config
    _config = (component, level, json)
    if not lazy or "structlog" in sys.modules:
        _apply()


def _apply() -> None:
    import structlog
    if _config is None:
        return
    component, level, json = _config
    if json is None:
        json = not sys.stderr.isatty()
    renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    if json:  # exceptions as data (type, message, frames), not just "exc_info": true;
        # no local variables (the helper's hold other users' paths and environments)
        exceptions = structlog.tracebacks.ExceptionDictTransformer(show_locals=False,
                                                                   use_rich=False)
        renderer = [structlog.processors.ExceptionRenderer(exceptions),
                    structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _bytes_to_text,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)


class _Logger:
    """structlog's logger for `name`, made when first used."""

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._logger = None

    def __getattr__(self, attr: str):
        if self._logger is None:
            if "structlog" not in sys.modules:
                _apply()
            import structlog
            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attr)


def get(name: str | None = None) -> _Logger:
    return _Logger(name)
