"""structlog set-up. Only the CLI configures structlog; the library just calls ``get_logger()``."""

from __future__ import annotations

import logging
from typing import IO

import structlog


def configure_cli(level: str, stream: IO[str]) -> None:
    """Human-readable diagnostics on ``stream`` at ``level`` and above."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
