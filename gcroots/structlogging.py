"""structlog's set-up for gcrootsd and gcroots-query (gcroots/log.py's
configure() calls it; the helper never loads it): exceptions rendered as
data, JSON or console lines through log.py's stderr writer."""

from __future__ import annotations

from typing import Any, Callable

import structlog


def configure(component: str, level: int, json: bool, file: Any,
              text: Callable[[Any], Any]) -> None:
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
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=file),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)
