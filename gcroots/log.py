"""structlog set-up shared by the helper and the daemon: one event per line,
snake_case event names with keyword fields; JSON when stderr is not a TTY
(journald, tests), human-readable when it is."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _bytes_to_text(_logger, _name, event_dict):
    # Paths are bytes end to end; in a log line show them losslessly.
    for key, value in event_dict.items():
        if isinstance(value, (bytes, bytearray)):
            event_dict[key] = os.fsdecode(bytes(value)).encode("utf-8", "backslashreplace").decode()
    return event_dict


def _stderr_logger(*_args) -> structlog.PrintLogger:
    # sys.stderr as it is when the event is written, not when configured:
    # whoever replaces it later (a test capturing output) gets the events.
    return structlog.PrintLogger(sys.stderr)


def configure(component: str, level: str = "info", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _bytes_to_text,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)


def get(name: str | None = None):
    return structlog.get_logger(name)
