"""A fleet watch: many guests in one process, one :class:`Engine` each, failures kept to their guest.

Theory of operation:

* One trio nursery runs a task per guest. Each task attaches to its target, names the guest
  (QMP ``query-name``, else the target spec; a name two guests share stays with the first, the
  second is known by its spec), builds an :class:`Engine` of its own -- its own governor, so
  overhead governance and trap demotions are per guest -- and runs it to its end.
* The sinks are shared: every engine feeds them through :class:`SharedSink`, which forwards
  ``send``/``flush`` and ignores ``aclose``, so one guest ending closes nothing; the fleet
  closes the real sinks once every guest ended.
* A guest that goes away (QEMU exits, is killed or stops answering), cannot be attached, or
  whose watch fails (hostile memory the engine cannot set up on, a bug) ends its own task only:
  the fleet stores a ``SourceEnded`` record when the engine could not, and raises an engine
  alert naming the guest and the reason. Rule exceptions never get this far: each engine
  isolates a failing rule itself.
* ``duration`` is one deadline for the whole fleet (a guest slow to attach watches less).
"""

from __future__ import annotations

import socket
import time
import traceback
from typing import Any, Iterable, Sequence

import attrs
import structlog
import trio

from vmwatch.engine.alerts import Alert
from vmwatch.engine.pump import Engine
from vmwatch.engine.sinks import EventRecord, Sink
from vmwatch.engine.sources import source_for
from vmwatch.engine.watch_options import WatchOptions, WatchSummary
from vmwatch.errors import VmwatchError
from vmwatch.ruletypes import ActiveRules, Severity

log = structlog.get_logger()

NAME_DEADLINE = 5.0
"""Seconds QMP has to answer ``query-name`` before the guest is known by its spec."""


@attrs.define
class GuestRun:
    """One guest of a fleet watch: what it was called and how its watch ended."""

    spec: str
    """The target as listed."""
    vm: str = ""
    """The name alerts and events carry (the spec until the guest is attached)."""
    live: bool = False
    attached: bool = False
    """The target was opened (a guest that never was is listed wrongly or already gone)."""
    summary: WatchSummary | None = None
    """The engine's summary; ``None`` if the guest was never watched or its watch failed."""
    failure: str = ""
    """Why the guest could not be attached, or how its watch failed ("" when it did not)."""

    @property
    def gone(self) -> bool:
        """The guest went away or could not be watched (not: the duration passed, Ctrl-C)."""
        if self.failure:
            return True
        return self.live and self.summary is not None and self.summary.source_ended

    @property
    def end_reason(self) -> str:
        return self.failure or (self.summary.end_reason if self.summary else "not started")


class SharedSink:
    """One sink fed by several engines: ``aclose`` is the fleet's, not an engine's."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name

    async def send(self, item: Alert | EventRecord) -> None:
        await self.sink.send(item)

    async def flush(self) -> None:
        flush = getattr(self.sink, "flush", None)
        if flush is not None:
            await flush()

    async def aclose(self) -> None:
        """An engine is done with the sink; others may not be."""


class Fleet:
    """Watch every target at once (see the module docstring); :meth:`run` returns one
    :class:`GuestRun` per target, in the order given."""

    def __init__(self, specs: Sequence[str], ruleset: ActiveRules, sinks: Iterable[Sink], *,
                 options: WatchOptions = WatchOptions(), stealth: bool = False, **engine_kwargs: Any) -> None:
        self.runs = [GuestRun(spec=spec, vm=spec) for spec in specs]
        self.ruleset = ruleset
        self.options = options
        self.stealth = stealth
        self.host = socket.gethostname()
        """What the fleet's own reports carry (each engine tags its alerts and events the same)."""
        self.engines: dict[str, Engine] = {}
        """Engines by guest name, once each guest is attached (tests reach a guest through it)."""
        self._sinks = list(sinks)
        self._shared = [SharedSink(s) for s in self._sinks]
        self._engine_kwargs = engine_kwargs
        self._names: set[str] = set()
        self._stop_requested = False
        self._scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """End every guest's watch gracefully (Ctrl-C): a guest still attaching stops once attached
        (all of them at once are cancelled when none is attached yet)."""
        self._stop_requested = True
        for engine in self.engines.values():
            engine.stop()
        if self._scope is not None and not self.engines:
            self._scope.cancel()

    async def run(self, *, duration: float | None = None,
                  task_status: trio.TaskStatus[Fleet] = trio.TASK_STATUS_IGNORED) -> list[GuestRun]:
        """Watch until every guest's watch ended (its source, ``duration``, or :meth:`stop`)."""
        deadline = None if duration is None else trio.current_time() + duration
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    for run in self.runs:
                        nursery.start_soon(self._watch_one, run, deadline)
                    task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                for sink in self._sinks:
                    try:
                        await sink.aclose()
                    except Exception as exc:
                        log.error("sink close failed", sink=sink.name, error=f"{type(exc).__name__}: {exc}")
        return self.runs

    async def _watch_one(self, run: GuestRun, deadline: float | None) -> None:
        from vmwatch.target import open_target

        try:
            async with open_target(run.spec) as target:
                run.live, run.attached = target.live is not None, True
                if self.stealth and run.live:
                    target.live.inline_hooks = False  # type: ignore[attr-defined]
                run.vm = self._claim(await guest_name(target), run.spec)
                engine = Engine(source_for(target, name=run.vm), self.ruleset, self._shared, options=self.options,
                                **self._engine_kwargs)
                self.engines[run.vm] = engine
                if self._stop_requested:
                    engine.stop()
                remaining = None if deadline is None else max(deadline - trio.current_time(), 0.001)
                run.summary = await engine.run(duration=remaining)
        except Exception as caught:  # this guest's watch ends, not the fleet's
            exc = _leaf(caught)
            if isinstance(exc, VmwatchError):
                if run.summary is not None and run.summary.source_ended:  # detaching from a QEMU already gone
                    log.info("detach failed", vm=run.vm, error=str(exc))
                else:
                    run.failure = f"{'watch failed' if run.attached else 'cannot attach'}: {exc}"
            else:  # a bug, or guest data nobody foresaw
                where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                log.error("guest watch crashed", vm=run.vm, error=f"{type(exc).__name__}: {exc}",
                          where=f"{where.filename}:{where.lineno}" if where else "?")
                run.failure = f"watch failed: internal error {type(exc).__name__}: {exc}"
        if run.gone:
            await self._report_gone(run, recorded=run.summary is not None)

    def _claim(self, name: str | None, spec: str) -> str:
        """The guest's name, unless another guest has it already (then its spec, unique in the list)."""
        if not name or name in self._names:
            name = spec
        self._names.add(name)
        return name

    async def _report_gone(self, run: GuestRun, *, recorded: bool) -> None:
        """Tell every sink this guest's watch is over: a SourceEnded record (if the engine stored
        none) and an engine alert naming the guest."""
        reason = run.end_reason
        now = time.time_ns()
        seq = run.summary.events if run.summary else 0
        log.warning("guest gone", vm=run.vm, reason=reason)
        items: list[Alert | EventRecord] = []
        if not recorded:
            items.append(EventRecord(vm=run.vm, host=self.host, time_ns=now, seq=seq, kind="SourceEnded",
                                     details={"reason": reason}))
        items.append(Alert(rule="engine", severity=Severity.ERROR, message=f"guest {run.vm} went away: {reason}",
                           vm=run.vm, host=self.host, time_ns=now, seq=seq,
                           details={"event": "SourceEnded", "reason": reason, "target": run.spec}))
        for sink in self._shared:
            try:
                for item in items:
                    await sink.send(item)
                await sink.flush()
            except Exception as exc:
                log.error("sink failed", sink=sink.name, error=f"{type(exc).__name__}: {exc}")


def _leaf(exc: Exception) -> Exception:
    """The one error a chain of single-error nursery groups carries (the group itself if several)."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def guest_name(target: Any) -> str | None:
    """The guest's QMP name (``-name``), or ``None`` for an image, an unnamed guest or a QEMU
    that does not say in time."""
    qmp = getattr(target.live, "qmp", None)
    if qmp is None:
        return None
    with trio.move_on_after(NAME_DEADLINE):
        try:
            reply = await qmp.execute("query-name")
        except VmwatchError:
            return None
        name = reply.get("name") if isinstance(reply, dict) else None
        return name if isinstance(name, str) and name else None
    return None
