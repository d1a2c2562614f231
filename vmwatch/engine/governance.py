"""Overhead governance: no trap may freeze the guest.

Theory of operation: every trap (breakpoint or watchpoint) stops the guest each time it is hit,
and the handlers run while it is stopped. A trap gets a budget per window (default one second):
at most ``max_hits`` hits and at most ``max_cost`` of the window spent handling it. A trap over
budget is demoted:

* if the source can remove traps, it is unhooked for a cooldown (doubling on every repeat
  demotion, up to ``max_cooldown``), then re-armed;
* otherwise (a replay, a synthetic stream) it is sampled: only one hit in N is dispatched, N chosen
  so the dispatched rate fits the budget, until a window passes under budget.

Every demotion becomes a :class:`~vmwatch.events.Demotion` event; nothing is dropped silently.
Times come from the caller (``trio.current_time()``) so tests run on a fake clock.

Replays: the live verdicts depend on timing (hit rates, handling cost) that a replay cannot
reproduce, so they are recorded instead. A source with ``on_governed(decision)`` (a recorder) is
told every verdict other than "dispatch": ``None`` for a hit sampled out, else the demotion. A
source with ``governed()`` (a replay) answers, for the event it is replaying, with the recorded
verdict as ``(action, hits, seconds, sample_every)`` -- action ``"skip"``, ``"unhook"`` or
``"sample"`` -- or ``None``; :class:`ReplayedGovernor` then decides exactly as the live run did.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import attrs

from vmwatch.engine.dispatch import Trap


@attrs.frozen(kw_only=True)
class Budget:
    """The per-trap budget."""

    window: float = 1.0
    """Seconds over which hits and cost are counted."""
    max_hits: int = 2000
    """Hits per window before demotion."""
    max_cost: float = 0.25
    """Fraction of the window a trap's handlers may take."""
    cooldown: float = 5.0
    """Seconds a demoted trap stays unhooked the first time."""
    max_cooldown: float = 60.0


@attrs.define(eq=False)
class TrapState:
    window_start: float = 0.0
    hits: int = 0
    cost: float = 0.0
    total_hits: int = 0
    demotions: int = 0
    unhooked_until: float | None = None
    sample_every: int = 1
    sample_count: int = 0
    skipped: int = 0


@attrs.frozen
class Decision:
    """What to do with a trap that went over budget."""

    trap: Trap
    action: str
    """``"unhook"`` or ``"sample"``."""
    hits: int
    seconds: float
    """Cooldown (unhook) or 0."""
    sample_every: int

    def describe(self) -> str:
        if self.action == "unhook":
            return f"unhooked for {self.seconds:g}s"
        return f"sampled 1/{self.sample_every}"


class Governor:
    """Budget bookkeeping for every trap of a run."""

    def __init__(self, budget: Budget, *, can_unhook: bool,
                 on_governed: Callable[[Decision | None], Any] | None = None) -> None:
        self.budget = budget
        self.can_unhook = can_unhook
        self.states: dict[Trap, TrapState] = {}
        self.on_governed = on_governed
        """Told each hit sampled out (``None``) and each demotion (a recorder stores them)."""

    def state(self, trap: Trap) -> TrapState:
        st = self.states.get(trap)
        if st is None:
            st = self.states[trap] = TrapState()
        return st

    def admit(self, trap: Trap, now: float) -> bool:
        """Count a hit; False if sampling says this hit is not dispatched."""
        st = self.states.get(trap) or self.state(trap)
        if now - st.window_start >= self.budget.window:
            if (st.sample_every > 1 and st.hits <= self.budget.max_hits
                    and st.cost * st.sample_every <= self.budget.max_cost * self.budget.window):
                st.sample_every = 1  # a calm window ends sampling
            st.window_start = now
            st.hits = 0
            st.cost = 0.0
        st.hits += 1
        st.total_hits += 1
        if st.sample_every > 1:
            st.sample_count += 1
            if st.sample_count % st.sample_every:
                return self._skip(st)
        return True

    def _skip(self, st: TrapState) -> bool:
        """A hit sampled out: counted, told, not dispatched."""
        st.skipped += 1
        if self.on_governed is not None:
            self.on_governed(None)
        return False

    def _told(self, decision: Decision) -> Decision:
        if self.on_governed is not None:
            self.on_governed(decision)
        return decision

    def charge(self, trap: Trap, seconds: float, now: float) -> Decision | None:
        """Add handling cost; return a demotion if the trap is now over budget."""
        st = self.states[trap]
        st.cost += seconds
        b = self.budget
        budget_cost = b.max_cost * b.window
        dispatched = st.hits / st.sample_every
        if dispatched <= b.max_hits and st.cost <= budget_cost:
            return None
        st.demotions += 1
        hits, cost = st.hits, st.cost
        st.window_start = now
        st.hits = 0
        st.cost = 0.0
        if self.can_unhook:
            cooldown = min(b.cooldown * 2 ** (st.demotions - 1), b.max_cooldown)
            st.unhooked_until = now + cooldown
            return self._told(Decision(trap, "unhook", hits, cooldown, 1))
        # sample so that the dispatched hits and their cost fit the budget, with a 2x margin
        ratio = max(dispatched / b.max_hits, cost / budget_cost, 1.0)
        st.sample_every *= max(2, math.ceil(2 * ratio))
        return self._told(Decision(trap, "sample", hits, 0.0, st.sample_every))

    def due_rearm(self, now: float) -> list[Trap]:
        """Unhooked traps whose cooldown has passed (they are marked armed again)."""
        due = []
        for trap, st in self.states.items():
            if st.unhooked_until is not None and now >= st.unhooked_until:
                st.unhooked_until = None
                st.window_start = now
                st.hits = 0
                st.cost = 0.0
                due.append(trap)
        return due

    def skipped(self) -> int:
        return sum(st.skipped for st in self.states.values())


class ReplayedGovernor(Governor):
    """The verdicts of a recorded live run, handed back event by event: no clock, no cost.

    ``recorded()`` gives the verdict recorded for the event being handled (see the module
    docstring); a recording without verdicts (format 1.1 and older) dispatches every hit.
    """

    def __init__(self, budget: Budget, *, can_unhook: bool,
                 recorded: Callable[[], tuple[str, int, float, int] | None],
                 on_governed: Callable[[Decision | None], Any] | None = None) -> None:
        super().__init__(budget, can_unhook=can_unhook, on_governed=on_governed)
        self._recorded = recorded

    def admit(self, trap: Trap, now: float) -> bool:
        st = self.states.get(trap) or self.state(trap)
        st.total_hits += 1
        verdict = self._recorded()
        if verdict is not None and verdict[0] == "skip":
            return self._skip(st)
        return True

    def charge(self, trap: Trap, seconds: float, now: float) -> Decision | None:
        verdict = self._recorded()
        if verdict is None or verdict[0] == "skip":
            return None
        action, hits, cooldown, sample_every = verdict
        st = self.states[trap]
        st.demotions += 1
        if action == "unhook":
            st.unhooked_until = now + cooldown
        else:
            st.sample_every = sample_every
        return self._told(Decision(trap, action, hits, cooldown, sample_every))


def governor_for(source: Any, budget: Budget, *, can_unhook: bool) -> Governor:
    """The governor of a watch of ``source``: replayed for a replay, told to a recorder."""
    recorded = getattr(source, "governed", None)
    on_governed = getattr(source, "on_governed", None)
    if recorded is not None:
        return ReplayedGovernor(budget, can_unhook=can_unhook, recorded=recorded, on_governed=on_governed)
    return Governor(budget, can_unhook=can_unhook, on_governed=on_governed)
