"""Periodic rules: the ticker, engine ticks (live, recorded, replayed) and the start-up run.

:class:`Ticking` is one part of :class:`vmwatch.engine.pump.Engine` (a mixin). The ticker sleeps
to the next due period, stops the guest and runs the due ``@every`` listeners as one ``Tick``;
periods missed while the guest was busy are skipped, not burst. A recording source sees each tick
begin (``on_tick``) and a replay yields the recorded ticks back, run here in place of the timer.
"""

from __future__ import annotations

import math

import structlog
import trio

from vmwatch.engine.dispatch import Handler
from vmwatch.errors import LinkClosedError
from vmwatch.events import Tick

log = structlog.get_logger()


class Ticking:
    """The engine's ticks (the guest is stopped for each; rules run as for any event)."""

    async def _run_start_rules(self) -> None:
        if not self.dispatcher.start:
            return
        async with self.guest_stopped():
            await self._run_tick(Tick(seq=0, time_ns=self._clock()), self.dispatcher.start)

    async def _ticker(self) -> None:
        periodic = self.dispatcher.periodic
        now = trio.current_time()
        due = [now + period for period, _ in periodic]
        while True:
            next_due = min(due)
            await trio.sleep_until(next_due)
            now = trio.current_time()
            ready = []
            for i, (period, h) in enumerate(periodic):
                if due[i] <= now + 1e-9:
                    ready.append((period, h))
                    # skip missed periods instead of bursting to catch up
                    due[i] += period * max(1, math.floor((now - due[i]) / period) + 1)
            try:
                async with self.guest_stopped():
                    if self._pending_pull:  # the event handed out first is handled first (a recording's order)
                        self._deferred_ticks.append(ready)
                    else:
                        await self._periodic_tick(ready)
            except LinkClosedError as exc:  # the source's stream ends too, with SourceEnded: that ends the watch
                log.info("ticks end: source link closed", vm=self.vm, error=str(exc))
                return

    async def _periodic_tick(self, ready: list[tuple[float, Handler]]) -> None:
        """Run due periodic listeners (the guest is stopped); a recorder sees the tick begin."""
        if self._stream_done:
            return
        tick = Tick(seq=self._last_seq, time_ns=self._clock(),
                    periodic=tuple((h.rule.name, period) for period, h in ready))
        handlers = [h for _, h in ready]
        note = self._note_tick
        if note is None:
            await self._run_tick(tick, handlers)
            return
        # a recorded tick is replayed whole, so it must run whole (bounded: a dead source still ends the watch)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self.options.shutdown_grace), note(tick):
            await self._run_tick(tick, handlers)

    async def _replayed_tick(self, tick: Tick) -> None:
        """A recorded engine tick: the periodic listeners that ran at it live run now."""
        ran = set(tick.periodic or ())
        handlers = [h for period, h in self.dispatcher.periodic if (h.rule.name, period) in ran]
        self._held = True
        await self._run_tick(tick, handlers)
        self._held = False

    async def _run_tick(self, tick: Tick, handlers: list[Handler]) -> None:
        cpus: tuple = ()
        if self.has_registers:
            cpus = tuple(await self.source.all_registers())
        guest = self.guest
        guest.cpus = cpus
        guest.begin(tick, cpus[0] if cpus else None)
        self._run(tick, handlers)
        if guest._emitted:
            self._dispatch_derived(guest.take_emitted())
        await self._after_rules()
