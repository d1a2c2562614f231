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
"""

from __future__ import annotations

import math

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

    def __init__(self, budget: Budget, *, can_unhook: bool) -> None:
        self.budget = budget
        self.can_unhook = can_unhook
        self.states: dict[Trap, TrapState] = {}

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
                st.skipped += 1
                return False
        return True

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
            return Decision(trap, "unhook", hits, cooldown, 1)
        # sample so that the dispatched hits and their cost fit the budget, with a 2x margin
        ratio = max(dispatched / b.max_hits, cost / budget_cost, 1.0)
        st.sample_every *= max(2, math.ceil(2 * ratio))
        return Decision(trap, "sample", hits, 0.0, st.sample_every)

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
