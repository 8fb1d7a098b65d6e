"""structlog's set-up for gcrootsd and gcroots-query (gcroots/log.py hands
their lines over; the helper never loads this module): exceptions rendered
as data, JSON or console lines through log.py's stderr writer."""

from __future__ import annotations

import sys
from typing import Any

_pending: list[tuple[str, str, bool]] = []   # configure(lazy=True)'s, until a line is logged


def configure(component: str, level: str, json: bool, *, lazy: bool = False) -> None:
    _pending[:] = [(component, level, json)]
    if not lazy or "structlog" in sys.modules:
        _apply_pending()


def get_logger(name: str | None) -> Any:
    _apply_pending()
    import structlog
    return structlog.get_logger(name)


def _apply_pending() -> None:
    while _pending:
        _configure(*_pending.pop())


def _configure(component: str, level: str, json: bool) -> None:
    import logging

    import structlog

    from .log import Stderr, text

    def fields_as_text(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = text(value)
        return event_dict

    renderer: list[Any] = [structlog.dev.ConsoleRenderer(colors=False)]
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
            fields_as_text,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=Stderr()),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)
