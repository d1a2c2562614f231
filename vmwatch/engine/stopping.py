"""Stopping: the guest held stopped for a consistent look, and the end of a watch.

:class:`Stopping` is one part of :class:`vmwatch.engine.pump.Engine` (a mixin): ``stop()`` ends
the watch gracefully, ``guest_stopped()`` stops the guest while a tick, a trap change, a debugger
or a test looks at it, and the teardown removes traps, lets the guest run and closes the sinks'
channels, within ``WatchOptions.shutdown_grace``, whatever ended the watch.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from vmwatch.errors import VmwatchError

log = structlog.get_logger()


class Stopping:
    """The engine's ``stop``, ``guest_stopped`` and teardown."""

    def stop(self) -> None:
        """End the watch gracefully (what Ctrl-C does): alerts already raised still reach every sink."""
        self._stop_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def guest_stopped(self) -> Any:
        """``async with engine.guest_stopped():`` the guest is stopped and no rule runs meanwhile.

        For anything that must see or change the guest consistently while a watch runs: ticks,
        trap changes, a debugger, a test's tamper. It takes the engine lock (so it waits for the
        event being handled) and pauses the guest unless an event holds it stopped already; a
        live source interrupts the guest even while the consumer waits in ``events()`` (the stop
        goes to the waiter, which keeps it as the event it hands out next if it was a trap).
        Leaving the block resumes the guest, but never past an event the source has handed out
        and the consumer not yet handled (the source's ``resume()`` contract).
        """
        engine = self

        class _Stopped:
            async def __aenter__(self) -> None:
                self.paused = False
                await engine._lock.acquire()
                if engine.pausable and not engine._held:
                    try:
                        await engine.source.pause()
                    except BaseException:
                        engine._lock.release()
                        raise
                    self.paused = True

            async def __aexit__(self, *exc: object) -> None:
                try:
                    if self.paused:
                        with trio.CancelScope(shield=True):
                            await engine.source.resume()
                        if not hasattr(engine.source, "on_resume"):
                            engine.guest.on_resume()
                finally:
                    engine._lock.release()

        return _Stopped()

    async def _teardown(self) -> None:
        for run, event, exc in self._rule_failures:
            self._rule_failed(run, event, exc)
        self._rule_failures.clear()
        self.publish(self.guest.take_alerts())
        with trio.move_on_after(self.options.shutdown_grace):
            # the guest must not stay frozen: remove traps, then let it run
            for trap in list(self._armed):
                try:
                    await self._disarm(trap)
                except VmwatchError as exc:
                    log.warning("cannot remove trap", trap=trap.name, error=str(exc))
                    break
            if self.pausable:
                try:
                    await self.source.resume()
                except VmwatchError as exc:
                    log.warning("cannot resume guest", error=str(exc))
        for link in self._sinks:
            # the sink task delivers what is left in the outbox after the channel: no alert is
            # abandoned because a sink is slow, only if it fails
            await link.send.aclose()
