"""The pump: a source's events -> dispatcher -> rules -> alerts -> sinks, under trio.

Theory of operation:

* One consumer task reads the source's stream (in batches when the source offers them) and
  handles each event synchronously: look up the handlers (one dict lookup), ask the governor
  whether the trap is within budget, run the rules, dispatch the events they derive (sensors),
  then -- only when there is something to await -- fetch registers, publish alerts, apply
  demotions, and resume the guest. The fast path (no registers, no alerts) never awaits.
* A live (``pause``-capable) source holds the guest paused for every event it yields; the pump
  resumes it after the rules ran. The ticker (periodic rules) and trap re-arming pause the guest
  themselves and take the guest lock so they never interleave with an event being handled.
  Each engine tick is a ``Tick`` naming the listeners it ran: a recording source sees it begin
  (``on_tick``), and a replay (``replays_ticks``) yields it back in place of the timer.
* Each sink has its own task and bounded channel (``engine/sink_links.py``). Event records are
  sent with ``send_nowait`` and counted as dropped when a sink lags; alerts go through a per-sink
  outbox drained with ``await send`` (backpressure: a slow sink slows the pump, it never loses
  alerts). At shutdown the channels close and each sink task delivers what is left in its
  outbox, so every alert raised reaches every sink; only a sink whose ``send`` raises loses
  alerts (counted, logged).
* A realtime source (events at their own pace, e.g. a storm) is read by a producer task into a
  bounded intake channel; batches that do not fit are dropped and counted.
* Ending: the source ends (or dies: a ``VmwatchError`` from the stream becomes ``SourceEnded``),
  the duration passes, or :meth:`Engine.stop` is called (Ctrl-C). Traps are removed, the guest
  resumed, outboxes flushed, sinks closed, and a :class:`WatchSummary` returned.
"""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from typing import Any, Callable, Iterable

import structlog
import trio

from vmwatch.engine import sources as caps
from vmwatch.engine.alerts import Alert
from vmwatch.engine.arming import Arming
from vmwatch.engine.dispatch import KEY_FIELD, Dispatcher, Handler, RuleRun, Trap, key_of
from vmwatch.engine.governance import Decision, governor_for
from vmwatch.engine.guest import Current, Guest, cr3_root, default_os_factory
from vmwatch.engine.sink_links import SinkLink
from vmwatch.engine.sinks import EventRecord, Sink
from vmwatch.engine.stopping import Stopping
from vmwatch.engine.ticks import Ticking
from vmwatch.engine.watch_options import WatchOptions, WatchSummary
from vmwatch.errors import UnsupportedOperation, VmwatchError
from vmwatch.events import Demotion, Event, SourceEnded, Tick
from vmwatch.ruletypes import ActiveRules, Severity

log = structlog.get_logger()


class Engine(Arming, Ticking, Stopping):
    """One watch: a source, the rules of a run, the sinks.

    Its parts by job: arming.py (listeners, traps, sensors), ticks.py (periodic rules), stopping.py
    (``guest_stopped``, ``stop``, teardown); here, the consumer: events -> rules -> alerts, records.
    """

    def __init__(
        self,
        source: Any,
        ruleset: ActiveRules,
        sinks: Iterable[Sink],
        *,
        options: WatchOptions = WatchOptions(),
        os_factory: Callable[[Guest], Any] | None = None,
        current_resolver: Callable[[Guest], Current | None] | None = None,
    ) -> None:
        self.source = source
        self.ruleset = ruleset
        self.options = options
        self.vm = getattr(source, "name", "guest")
        self.host: str = getattr(source, "host", None) or socket.gethostname()
        """Stored with every alert and event, so timelines of many hosts can share a database."""
        self.capabilities: frozenset[str] = frozenset(getattr(source, "capabilities", ()))
        self.pausable = caps.PAUSE in self.capabilities
        self.has_registers = caps.REGISTERS in self.capabilities
        can_unhook = caps.BREAKPOINTS in self.capabilities or caps.WATCHPOINTS in self.capabilities
        self.governor = governor_for(source, options.budget, can_unhook=can_unhook)
        self.dispatcher = Dispatcher()
        if os_factory is None and getattr(source, "memory", None) is not None:
            os_factory = default_os_factory
        if current_resolver is None and os_factory is not None:
            from vmwatch.engine.linux_sensors import current_task

            current_resolver = current_task
        self.guest = Guest(vm=self.vm, host=self.host, phys=getattr(source, "memory", None),
                           capabilities=self.capabilities,
                           os_factory=os_factory, current_resolver=current_resolver)
        hooks = getattr(source, "on_resume", None)
        if hooks is not None:  # the source tells us when the guest ran: caches may be stale
            hooks.append(self.guest.on_resume)
        self.summary = WatchSummary(vm=self.vm)
        self.runs: dict[str, RuleRun] = {}
        self._sinks = [SinkLink(s, None) for s in sinks]  # type: ignore[arg-type]
        self._scope: trio.CancelScope | None = None
        self._lock = trio.Lock()
        self._held = False
        self._armed: set[Trap] = set()
        self._decisions: list[Decision] = []
        self._last_seq = 0
        self._rule_failures: list[tuple[RuleRun, Event, BaseException]] = []
        self._stop_requested = False
        self._ended = False
        self._replays_ticks = bool(getattr(source, "replays_ticks", False))
        """The stream carries the recorded engine ticks: no timer, periodic rules run at them."""
        self._note_tick: Callable[[Tick], Any] | None = getattr(source, "on_tick", None)
        """A recorder: each engine tick runs inside ``on_tick(tick)``, a context of its own."""
        self._note_handled: Callable[[], None] | None = getattr(source, "on_handled", None)
        """A recorder learns which events had their rules run (the last one may be cut by the end)."""
        self._pending_pull = False
        """An event was handed out and waits for the lock (a recorder opened its context)."""
        self._deferred_ticks: list[list[tuple[float, Handler]]] = []
        """Ticks due while an event waited: the consumer runs them right after it, in recording order."""
        self._stream_done = False
        """The consumer stopped: a tick begun now would be cut short by the shutdown."""
        self._clock: Callable[[], int] = getattr(source, "clock_ns", None) or time.time_ns
        """Timestamps of the engine's own events: the source's clock if it has one (replays)."""
        overhead: float = getattr(source, "trap_overhead", 0.0)
        self._overhead_of: Callable[[Event], float] = getattr(source, "overhead_of", None) or (lambda event: overhead)
        """Seconds a stop and resume for an event cost the guest beyond our handling (live sources
        declare it, per event or as one figure)."""

    # -- public ----------------------------------------------------------------------------

    async def run(self, *, duration: float | None = None,
                  task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED) -> WatchSummary:
        """Watch until the source ends, ``duration`` seconds pass, or :meth:`stop`."""
        started = time.perf_counter()
        async with trio.open_nursery() as sink_nursery:
            for link in self._sinks:
                send, recv = trio.open_memory_channel[Any](self.options.sink_queue)
                link.send = send
                sink_nursery.start_soon(link.serve, recv, self.summary)
            try:
                async with trio.open_nursery() as work:
                    self._work = work
                    with trio.CancelScope() as scope:
                        self._scope = scope
                        if self._stop_requested:
                            scope.cancel()
                        if duration is not None:
                            scope.deadline = trio.current_time() + duration
                        task_status.started(self)
                        await self._setup()
                        await self._run_start_rules()
                        if self.dispatcher.periodic and not self._replays_ticks:
                            work.start_soon(self._ticker)
                        await self._consume()
                    if not self.summary.end_reason:
                        self.summary.end_reason = "stopped" if self._stop_requested else "duration elapsed"
                    work.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown()
        self.summary.seconds = time.perf_counter() - started
        self.summary.sampled_out = self.governor.skipped()
        for name, run in self.runs.items():
            if run.errors:
                self.summary.rule_errors[name] = run.errors
        return self.summary

    # -- consuming -------------------------------------------------------------------------

    async def _consume(self) -> None:
        src = self.source
        try:
            if getattr(src, "realtime", False):
                await self._consume_realtime()
            elif hasattr(src, "event_batches") and not self.pausable:
                async with _closing(src.event_batches()) as batches:
                    async for batch in batches:
                        await self._handle_batch(batch)
                        if self._ended:
                            return
                        await trio.lowlevel.checkpoint()
            else:
                async with _closing(src.events()) as events:
                    async for event in events:
                        self._pending_pull = self._note_tick is not None
                        async with self._lock:
                            self._pending_pull = False
                            await self._handle_batch((event,))
                            while self._deferred_ticks:
                                await self._periodic_tick(self._deferred_ticks.pop(0))
                        if self._ended:
                            return
        except VmwatchError as exc:  # the source died (QEMU gone, recording truncated)
            log.warning("source failed", vm=self.vm, error=str(exc))
            await self._handle_batch((SourceEnded(seq=self._last_seq, time_ns=self._clock(),
                                                  reason=f"source failed: {exc}"),))
            return
        finally:
            self._stream_done = True
        if not self._ended:
            self.summary.end_reason = self.summary.end_reason or "source ended"
            self.summary.source_ended = True

    async def _consume_realtime(self) -> None:
        send, recv = trio.open_memory_channel[list](self.options.intake_queue)

        async def produce() -> None:
            last_report = trio.current_time()
            async with send, _closing(self.source.event_batches()) as batches:
                async for batch in batches:
                    if batch and type(batch[-1]) is SourceEnded:
                        await send.send(batch)  # the end is never dropped
                        return
                    try:
                        send.send_nowait(batch)
                    except trio.WouldBlock:
                        self.summary.dropped_events += len(batch)
                        now = trio.current_time()
                        if now - last_report >= 1.0:
                            last_report = now
                            self._report_drops()

        async with trio.open_nursery() as n:
            n.start_soon(produce)
            async with recv:
                async for batch in recv:
                    await self._handle_batch(batch)
                    if self._ended:
                        break
                    await trio.lowlevel.checkpoint()
            n.cancel_scope.cancel()
        if self.summary.dropped_events:
            self._report_drops()

    def _report_drops(self) -> None:
        log.warning("events dropped", vm=self.vm, dropped=self.summary.dropped_events)
        self._record(EventRecord(vm=self.vm, host=self.host, time_ns=self._clock(), seq=self._last_seq,
                                 kind="Dropped",
                                 details={"dropped_total": self.summary.dropped_events}))

    async def _handle_batch(self, batch: Iterable[Event]) -> None:
        index = self.dispatcher.index
        traps = self.dispatcher.traps
        recorded = self.options.recorded
        governor = self.governor
        guest = self.guest
        summary = self.summary
        for event in batch:
            cls = type(event)
            if cls is Tick and self._replays_ticks and event.periodic is not None:  # type: ignore[attr-defined]
                await self._replayed_tick(event)  # type: ignore[arg-type]
                continue
            summary.events += 1
            field = KEY_FIELD.get(cls)
            key = (cls, getattr(event, field)) if field else cls
            handlers = index.get(key)
            trap = None
            now = 0.0
            if handlers is not None and field is not None:
                trap = traps.get(key)
                if trap is not None:
                    now = trio.current_time()
                    if not governor.admit(trap, now):
                        handlers = None
            self._held = True
            if handlers is not None:
                t0 = time.perf_counter() if trap is not None else 0.0
                regs = None
                if self.has_registers and field is not None:
                    regs = await self.source.registers(event.vcpu)
                guest.begin(event, regs)
                self._run(event, handlers)
                if guest._emitted:
                    self._dispatch_derived(guest.take_emitted())
                if trap is not None:
                    # what the guest paid: our handling (register reads included) plus the
                    # source's own cost of a stop and a resume
                    cost = time.perf_counter() - t0 + self._overhead_of(event)
                    decision = governor.charge(trap, cost, now)
                    if decision is not None:
                        self._decisions.append(decision)
            if self._note_handled is not None:
                self._note_handled()
            if cls in recorded:
                self._record(EventRecord.from_event(event, self.vm, self.host))
            self._last_seq = event.seq
            if guest._alerts or self._decisions or self._rule_failures:
                await self._after_rules()
            self._held = False  # a live source lets the guest run when asked for the next event
            if cls is SourceEnded:
                self.summary.end_reason = event.reason  # type: ignore[attr-defined]
                self.summary.source_ended = self._ended = True
                return

    def _run(self, event: Event, handlers: list[Handler]) -> None:
        guest = self.guest
        for h in handlers:
            run = h.rule
            if not run.active:
                continue
            if h.narrow is not None and not self._narrow_ok(h):
                continue
            guest.rule = run
            run.calls += 1
            try:
                run.func(event, guest)
            except UnsupportedOperation as exc:  # a Linux rule on a Windows guest, no IDTR...: not a failure
                run.active = False
                self.inactive(f"rule {run.name}", str(exc))
            except Exception as exc:  # a rule is user code: report and isolate, never die
                self._rule_failures.append((run, event, exc))
        guest.rule = None

    def _narrow_ok(self, h: Handler) -> bool:
        n = h.narrow
        if n.address is not None:  # type: ignore[union-attr]
            cr2 = getattr(self.guest.event, "cr2", None)
            if cr2 is None or not n.address[0] <= cr2 < n.address[1]:  # type: ignore[union-attr]
                return False
            if n.pid is None and n.comm is None and n.cr3 is None:  # type: ignore[union-attr]
                return True
        try:
            cur = self.guest.current
        except Exception as exc:
            self._rule_failures.append((h.rule, self.guest.event, exc))  # type: ignore[arg-type]
            return False
        if cur is None:
            return False
        if n.pid is not None and cur.pid != n.pid:  # type: ignore[union-attr]
            return False
        if n.comm is not None and cur.comm != n.comm:  # type: ignore[union-attr]
            return False
        if n.cr3 is not None and cur.cr3 != cr3_root(n.cr3):  # type: ignore[union-attr]
            return False
        return True

    def _dispatch_derived(self, events: list[Event], depth: int = 0) -> None:
        guest = self.guest
        parent_regs = guest.registers
        for event in events:
            handlers = self.dispatcher.index.get(key_of(event))
            if handlers:
                guest.begin(event, parent_regs)
                self._run(event, handlers)
            if type(event) in self.options.recorded:
                self._record(EventRecord.from_event(event, self.vm, self.host))
            more = guest.take_emitted()
            if more and depth < 3:
                self._dispatch_derived(more, depth + 1)

    # -- after the rules ran ---------------------------------------------------------------

    async def _after_rules(self) -> None:
        for run, event, exc in self._rule_failures:
            self._rule_failed(run, event, exc)
        self._rule_failures.clear()
        alerts = self.guest.take_alerts()
        if alerts:
            self.publish(alerts)
        decisions, self._decisions = self._decisions, []
        for decision in decisions:
            await self._demote(decision)
        for link in self._sinks:
            if link.outbox:
                await link.drain()

    def publish(self, alerts: Iterable[Alert]) -> None:
        """Queue alerts for every sink (never dropped)."""
        counts = self.summary.alerts
        for alert in alerts:
            counts[alert.severity.name.lower()] = counts.get(alert.severity.name.lower(), 0) + 1
            for link in self._sinks:
                link.outbox.append(alert)

    def _record(self, record: EventRecord) -> None:
        for link in self._sinks:
            try:
                link.send.send_nowait(record)
            except trio.WouldBlock:
                link.dropped += 1
                self.summary.dropped_records[link.sink.name] = link.dropped
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _rule_failed(self, run: RuleRun, event: Event, exc: BaseException) -> None:
        run.errors += 1
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
        log.warning("rule raised", rule=run.name, error=f"{type(exc).__name__}: {exc}", where=where)
        details = {"error": f"{type(exc).__name__}: {exc}", "where": where, "event": type(event).__name__,
                   "errors": run.errors}
        self._record(EventRecord(vm=self.vm, host=self.host, time_ns=event.time_ns, seq=event.seq,
                                 kind="RuleFailure",
                                 details={"rule": run.name, **details}))
        isolate = run.errors >= self.options.max_rule_errors and run.active
        if run.errors == 1 or isolate:
            msg = f"rule {run.name} raised {type(exc).__name__}: {exc}"
            if isolate:
                run.active = False
                self.summary.isolated.append(run.name)
                msg = f"rule {run.name} isolated after {run.errors} errors (last: {type(exc).__name__}: {exc})"
            self.publish([Alert(rule="engine", severity=Severity.ERROR, message=msg, vm=self.vm, host=self.host,
                                time_ns=event.time_ns, seq=event.seq, details={"rule": run.name, **details})])

    async def _demote(self, decision: Decision) -> None:
        trap = decision.trap
        event = Demotion(seq=self._last_seq, time_ns=self._clock(), trap=trap.name, hits=decision.hits,
                         action=decision.describe())
        self.summary.demotions.append(event)
        log.warning("trap demoted", trap=trap.name, hits=decision.hits, action=event.action)
        if decision.action == "unhook" and trap in self._armed:
            await self._disarm(trap)
            self._work.start_soon(self._rearm_later, trap, decision.seconds)
        handlers = self.dispatcher.index.get(Demotion)
        if handlers:
            self.guest.begin(event, None)
            self._run(event, handlers)
            self.publish(self.guest.take_alerts())
        self._record(EventRecord.from_event(event, self.vm, self.host))

def _closing(stream: Any) -> Any:
    """Close an async generator when done with it (early exits included); other iterators as is."""
    if hasattr(stream, "aclose"):
        return contextlib.aclosing(stream)
    return contextlib.nullcontext(stream)


async def watch(source: Any, ruleset: ActiveRules, sinks: Iterable[Sink], *, duration: float | None = None,
                options: WatchOptions = WatchOptions(), **kwargs: Any) -> WatchSummary:
    """Run one watch to its end and return the summary (see :class:`Engine`)."""
    return await Engine(source, ruleset, sinks, options=options, **kwargs).run(duration=duration)
