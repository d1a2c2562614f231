"""What a watch is asked to do (:class:`WatchOptions`) and what it did (:class:`WatchSummary`)."""

from __future__ import annotations

import attrs

from vmwatch.engine.governance import Budget
from vmwatch.events import Demotion, Exec, Fault, MmioAccess, ModuleLoad, ProcessExit, ProcessStart, RegisterWrite, SourceEnded

RECORDED_EVENTS = frozenset({ProcessStart, ProcessExit, Exec, ModuleLoad, RegisterWrite, Fault, MmioAccess,
                             Demotion, SourceEnded})
"""Event classes stored in sinks by default (traps are too many; their rules' alerts say what matters;
a Fault or MmioAccess exists only when a rule listens to its vector or range)."""


@attrs.frozen(kw_only=True)
class WatchOptions:
    budget: Budget = Budget()
    sink_queue: int = 1024
    """Items per sink channel."""
    intake_queue: int = 64
    """Batches buffered from a realtime source."""
    max_rule_errors: int = 5
    """A rule raising this many times is isolated (deactivated) for the rest of the run."""
    recorded: frozenset[type] = RECORDED_EVENTS
    shutdown_grace: float = 10.0
    """Seconds at shutdown to remove traps and resume the guest."""
    sensors: bool = True
    """Derive register, interrupt and Linux events from breakpoints when rules want them."""


@attrs.define
class WatchSummary:
    """What a run did; the CLI prints it, tests check it."""

    vm: str
    events: int = 0
    seconds: float = 0.0
    alerts: dict[str, int] = attrs.Factory(dict)
    """Alerts per severity name."""
    dropped_events: int = 0
    """Events of a realtime source dropped because the pump lagged."""
    dropped_records: dict[str, int] = attrs.Factory(dict)
    """Event records per sink dropped because the sink lagged."""
    lost_alerts: dict[str, int] = attrs.Factory(dict)
    """Alerts a sink failed to store (its ``send`` raised); should stay empty."""
    sampled_out: int = 0
    demotions: list[Demotion] = attrs.Factory(list)
    rule_errors: dict[str, int] = attrs.Factory(dict)
    isolated: list[str] = attrs.Factory(list)
    inactive: list[str] = attrs.Factory(list)
    """Listeners that could not be armed, with the reason."""
    traps: int = 0
    end_reason: str = ""
    source_ended: bool = False
    """The source ended the watch (QEMU went away, an image or recording ran out), not
    ``duration`` or :meth:`Engine.stop`."""

    @property
    def total_alerts(self) -> int:
        return sum(self.alerts.values())
