"""The values the rule API and the engine share: what a rule listens to and how bad its alerts are.

They live below both so the engine never imports the rule API (``vmwatch.rules`` re-exports them).
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

import attrs


class Severity(enum.IntEnum):
    """How bad an alert is; values follow the ``logging`` levels."""

    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @classmethod
    def parse(cls, value: Severity | str | int) -> Severity:
        if isinstance(value, Severity):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown severity {value!r}") from None
        return cls(value)


class ListenerKind(enum.Enum):
    """What a listener waits for."""

    BREAKPOINT = "breakpoint"
    WRITE = "write"
    REGISTER = "register"
    INTERRUPT = "interrupt"
    EXCEPTION = "exception"
    MMIO = "mmio"
    EVERY = "every"
    EVENT = "event"
    START = "start"


@attrs.frozen
class Narrow:
    """Restricts a listener to one process: by pid, by name (``comm``) or by page-table root."""

    pid: int | None = None
    comm: str | None = None
    cr3: int | None = None
    address: tuple[int, int] | None = None
    """``[start, end)`` of a page fault's address (``cr2``): ``on_exception("page_fault", address=...)``."""

    @property
    def empty(self) -> bool:
        return self.pid is None and self.comm is None and self.cr3 is None and self.address is None


@attrs.frozen(kw_only=True)
class Listener:
    """One thing a rule listens to."""

    kind: ListenerKind
    target: Any = None
    """Symbol (``"name"`` or ``"name+0x10"``) or address; register name; vector; ``(vector, user)``
    of an exception (user None: either mode); ``(start, size, access)`` of an MMIO range; seconds;
    event class."""
    size: int = 0
    """Watched bytes (``on_write``); 0: up to the next symbol, or the end of a ``"a..b"`` range."""
    narrow: Narrow = Narrow()


class ActiveRules(Protocol):
    """What the engine asks of a run's rules (``vmwatch.rules.RuleSet``): the enabled ones, each
    with a ``name``, ``func`` and ``listeners``, and their settings."""

    def active(self) -> list[Any]: ...

    def config_of(self, r: Any) -> dict[str, Any]: ...
