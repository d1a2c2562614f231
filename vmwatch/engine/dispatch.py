"""The dispatch index: which handlers listen to an event, found in O(1).

Theory of operation: every listener is bound, once per run, to a key built from the event class
and the one field that selects it -- the address of a breakpoint or watched range, the register
name, the interrupt vector -- or the event class alone for OS-level events. Dispatch then is
``type(event)`` -> key field -> one dict lookup, whatever the number of rules. Periodic and start
listeners live in their own lists (the pump's ticker and start-up call them).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from vmwatch.events import Access, Breakpoint, Event, Fault, Interrupt, MemoryAccess, MmioAccess, RegisterWrite
from vmwatch.live.hook_guards import Guard
from vmwatch.ruletypes import Listener, Narrow

# event class -> name of the field that selects its listeners
KEY_FIELD: dict[type, str] = {
    Breakpoint: "address",
    MemoryAccess: "address",
    RegisterWrite: "register",
    Interrupt: "vector",
    Fault: "selector",
    MmioAccess: "watched",
}


@attrs.define(eq=False)
class RuleRun:
    """A rule during one run: its function, private state, settings and health."""

    name: str
    func: Callable[[Event, Any], object]
    config: dict[str, Any] = attrs.Factory(dict)
    state: dict[str, Any] = attrs.Factory(dict)
    internal: bool = False
    """An engine sensor (derives OS events), not a user rule."""
    calls: int = 0
    errors: int = 0
    alerts: int = 0
    seconds: float = 0.0
    active: bool = True
    """False once isolated after too many exceptions."""


@attrs.frozen(eq=False)
class Trap:
    """A breakpoint or watchpoint armed in the source, shared by every handler on it."""

    kind: str
    """``"breakpoint"`` or ``"watchpoint"``."""
    address: int
    size: int = 1
    label: str = ""
    """What the user wrote (symbol) for messages."""
    access: Access = Access.WRITE
    """What a watchpoint stops on."""
    entry: bool = False
    """The address is a kernel function's first instruction: a live source may hook it inline
    (much cheaper per hit under TCG, see vmwatch/live/inline_hooks.py)."""
    guard: Guard | None = None
    """A guarded inline hook's filter (vmwatch/live/hook_guards.py): the guest stops only when it holds."""

    @property
    def name(self) -> str:
        where = f"{self.label} ({self.address:#x})" if self.label else f"{self.address:#x}"
        return f"{self.kind} {where}"


@attrs.define(eq=False)
class Handler:
    """A listener bound to its rule for this run."""

    rule: RuleRun
    listener: Listener | None
    narrow: Narrow | None = None
    """``None`` when the listener is not narrowed (the common, fast case)."""


def key_of(event: Event) -> object:
    cls = type(event)
    field = KEY_FIELD.get(cls)
    return (cls, getattr(event, field)) if field else cls


class Dispatcher:
    """Handlers indexed by event key; periodic and start handlers apart."""

    def __init__(self) -> None:
        self.index: dict[object, list[Handler]] = {}
        self.periodic: list[tuple[float, Handler]] = []
        self.start: list[Handler] = []
        self.traps: dict[object, Trap] = {}
        """Event key -> the trap that produces events with that key."""

    def add(self, key: object, handler: Handler) -> None:
        self.index.setdefault(key, []).append(handler)
