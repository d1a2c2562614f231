"""structlog set-up. Only the CLI configures structlog; the library just calls ``get_logger()``.

Start-up cost: ``import structlog`` imports every structlog module, and with them rich (its dev
console's pretty tracebacks) and asyncio (its async logging methods): about two thirds of the
import, on every command, for features the CLI never uses (it renders plain lines, and vmwatch
is trio only). :func:`load_structlog` imports structlog with rich hidden and asyncio deferred to
first use; called before anything else imports structlog, every command pays for structlog alone.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import IO, Any


class _OnFirstUse(types.ModuleType):
    """Stands in for a module until an attribute is read, then imports the real one."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # introspection (copy, inspect, pickle) must not import it
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def load_structlog() -> types.ModuleType:
    """``import structlog`` without loading rich, and asyncio only if an async log method runs.

    structlog looks for rich once, at import (``import rich`` raising ImportError makes it use
    plain tracebacks); rich stays importable afterwards for the commands that draw with it.
    A no-op if structlog is loaded already.
    """
    if "structlog" in sys.modules:
        return sys.modules["structlog"]
    stand_ins: dict[str, Any] = {}
    if "rich" not in sys.modules:
        stand_ins["rich"] = None  # a None entry makes ``import rich`` raise ImportError
    if "asyncio" not in sys.modules:
        stand_ins["asyncio"] = _OnFirstUse("asyncio")
    sys.modules.update(stand_ins)
    try:
        import structlog
    finally:
        for name, stand_in in stand_ins.items():
            if name in sys.modules and sys.modules[name] is stand_in:
                del sys.modules[name]
    return structlog


def escape_strings(_logger: Any, _method: str, event_dict: dict) -> dict:
    """A structlog processor: every string value escaped for a terminal (it may be a guest's).

    Only strings need it: the console renderer shows other values by ``repr()``, which escapes
    control characters already. The JSON-lines sink skips this and keeps the exact text.
    """
    from vmwatch.text import shown

    return {key: shown(value) if isinstance(value, str) else value for key, value in event_dict.items()}


def configure_cli(level: str, stream: IO[str]) -> None:
    """Human-readable diagnostics on ``stream`` at ``level`` and above, strings escaped."""
    import logging

    structlog = load_structlog()
    structlog.configure(
        processors=[
            escape_strings,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
