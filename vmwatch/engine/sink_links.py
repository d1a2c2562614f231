"""Sink links: each sink's channel, alert outbox and task, and what a failing sink costs.

Event records are sent with ``send_nowait`` (counted as dropped when a sink lags); alerts go
through the outbox, drained with ``await send``, and at shutdown each task delivers what is left
in it, so only a sink whose ``send`` raises loses alerts (counted in the summary, logged once).
"""

from __future__ import annotations

import collections

import structlog
import trio

from vmwatch.engine.alerts import Alert
from vmwatch.engine.sinks import Sink
from vmwatch.engine.watch_options import WatchSummary

log = structlog.get_logger()


class SinkLink:
    """One sink's channel and alert outbox; :meth:`serve` is its task (delivers, counts failures)."""

    __slots__ = ("sink", "send", "outbox", "dropped", "failures")

    def __init__(self, sink: Sink, send: trio.MemorySendChannel) -> None:
        self.sink = sink
        self.send = send
        self.outbox: collections.deque[Alert] = collections.deque()
        self.dropped = 0
        self.failures = 0

    async def drain(self) -> None:
        """Send the queued alerts, waiting for room (backpressure: alerts are never dropped)."""
        while self.outbox:
            await self.send.send(self.outbox[0])
            self.outbox.popleft()

    def failed(self, exc: Exception, alerts: list[Alert], summary: WatchSummary) -> None:
        self.failures += 1
        if alerts:
            lost = summary.lost_alerts
            lost[self.sink.name] = lost.get(self.sink.name, 0) + len(alerts)
        if self.failures == 1:
            log.error("sink failed", sink=self.sink.name, error=f"{type(exc).__name__}: {exc}")

    async def serve(self, recv: trio.MemoryReceiveChannel, summary: WatchSummary) -> None:
        """Deliver what arrives, then the outbox left at shutdown, then close the sink."""
        sink = self.sink
        flush = getattr(sink, "flush", None)
        async with recv:
            async for item in recv:
                batch = [item]
                while True:  # take what is queued in one go: one scheduling round per burst
                    try:
                        batch.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    for item in batch:
                        await sink.send(item)
                    if flush is not None:
                        await flush()
                except Exception as exc:  # a broken sink must not end the watch or starve others
                    self.failed(exc, [i for i in batch if isinstance(i, Alert)], summary)
        while self.outbox:
            alert = self.outbox.popleft()
            try:
                await sink.send(alert)
            except Exception as exc:
                self.failed(exc, [alert], summary)
        try:
            await sink.aclose()
        except Exception as exc:
            log.error("sink close failed", sink=sink.name, error=f"{type(exc).__name__}: {exc}")
