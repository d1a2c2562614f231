"""Ending a QEMU guest's event stream when QEMU stops answering (SIGSTOP, a wedged main loop).

A QEMU that dies closes its sockets, and the stream ends at once (``qemu_events``). One that
is alive but frozen closes nothing: the event wait on the gdbstub (cancellable, because a
guest may rightly run for hours without a stop) would wait forever. So while attached, QMP
is asked ``query-status`` every :data:`PROBE_INTERVAL` seconds; QEMU answers it from its main
loop, also while the guest is paused by the gdbstub (~0.5 ms measured). No answer within
:data:`PROBE_TIMEOUT` seconds means QEMU is gone: both links are closed, which fails every
waiting call with :class:`~vmwatch.errors.LinkClosedError`, and the stream ends with one
:class:`~vmwatch.events.SourceEnded` naming what stopped answering. The bound from the freeze
to the end is therefore at most ``PROBE_INTERVAL + PROBE_TIMEOUT`` seconds. A mixin of
:class:`vmwatch.live.qemu.QemuVM`.
"""

from __future__ import annotations

import structlog
import trio

from vmwatch.errors import LinkError
from vmwatch.events import SourceEnded
from vmwatch.live.qmp import QmpError

log = structlog.get_logger()

PROBE_INTERVAL = 1.0
"""Seconds between two QMP ``query-status`` probes."""
PROBE_TIMEOUT = 4.0
"""Seconds QEMU may take to answer one before it is taken as gone (generous: a loaded 2-core
host answered within milliseconds; a false alarm would end a watch)."""


class Liveness:
    """The liveness half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    probe_interval = PROBE_INTERVAL
    probe_timeout = PROBE_TIMEOUT

    async def _probe_liveness(self) -> None:
        """Probe QMP until the link closes; end the stream when QEMU does not answer."""
        while self._closed is None:
            await trio.sleep(self.probe_interval)
            try:
                with trio.fail_after(self.probe_timeout):
                    await self.qmp.execute("query-status")
            except QmpError:
                continue  # an answer, even an error, is a live QEMU
            except trio.TooSlowError:
                await self._lose(f"QEMU stopped answering: no reply to QMP query-status in {self.probe_timeout:g} s")
            except LinkError as exc:
                await self._lose(f"QMP link lost: {exc}")

    async def _lose(self, reason: str) -> None:
        """Take QEMU as gone: queue the stream's end and fail everyone waiting on either link."""
        if self._closed is not None:
            return
        log.warning("qemu.lost", reason=reason)
        self._closed = reason
        self._pending.append(SourceEnded(reason=reason, **self._event_fields(0)))
        self._stopped.set()  # a pause() waiting for the event loop's stop
        with trio.CancelScope(shield=True):
            await self.gdb.aclose(reason)
            await self.qmp.aclose()
