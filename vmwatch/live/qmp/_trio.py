"""Thin trio wrapper over the sans-IO QMP core: one reader task, id-matched waiters, an event channel.

If QEMU dies or closes the socket, every waiting ``execute`` raises LinkClosedError and the event
channel ends: nothing hangs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator, Mapping

import structlog
import trio

from vmwatch.errors import LinkClosedError, LinkError, ProtocolError, RemoteProtocolError, bare_exception
from vmwatch.live.qmp._proto import (
    NEED_DATA, Closed, Error, Event, Greeting, QmpConnection, QmpError, Return,
)

log = structlog.get_logger()

EVENT_BUFFER = 1024
"""Events kept for a consumer that does not read them; older ones are dropped (and counted)."""
NEGOTIATE_DEADLINE = 10.0
"""Seconds for the greeting and ``qmp_capabilities``: a stopped QEMU accepts the connection
(the kernel does) but says nothing."""


class _Waiter:
    __slots__ = ("done", "message", "command")

    def __init__(self, command: str) -> None:
        self.done = trio.Event()
        self.message: Return | Error | BaseException | None = None
        self.command = command


class TrioQmp:
    """A negotiated QMP client. Get one from :func:`open_qmp` or :func:`qmp_over_stream`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._conn = QmpConnection()
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._greeted = trio.Event()
        self._failure: BaseException | None = None
        self._events_in, self.events = trio.open_memory_channel[Event](EVENT_BUFFER)
        """Asynchronous QMP events (STOP, RESUME, SHUTDOWN...); ends when the connection closes."""
        self.greeting: Greeting | None = None
        self.dropped_events = 0

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run a command and return its ``return`` value; keyword names get ``_`` -> ``-``.

        Raises:
            QmpError: QEMU answered with an error.
            LinkClosedError: the connection closed (or QEMU died) before the answer.
            RemoteProtocolError: QEMU broke the protocol.
        """
        self._raise_if_failed()
        args = dict(arguments or {})
        args.update({key.replace("_", "-"): value for key, value in kwargs.items()})
        ident, data = self._conn.send_command(command, args)
        waiter = self._waiters[ident] = _Waiter(command)
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._conn.send_failed()
                    self._fail(LinkClosedError(f"QMP connection lost sending {command}: {exc}"))
                except trio.Cancelled:
                    # Part of the line may be on the wire: nothing after it can be framed.
                    self._conn.send_failed()
                    self._fail(LinkClosedError(f"QMP send of {command} was cancelled"))
                    raise
            await waiter.done.wait()
        finally:
            self._waiters.pop(ident, None)
        result = waiter.message
        if isinstance(result, Return):
            return result.value
        if isinstance(result, Error):
            raise QmpError(command, result.error_class, result.desc)
        raise _copy(result)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise _copy(self._failure)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        for waiter in self._waiters.values():
            if not waiter.done.is_set():
                waiter.message = self._failure
                waiter.done.set()
        self._greeted.set()
        self._events_in.close()

    async def _reader(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                message = self._conn.next_event()
                if message is NEED_DATA:
                    try:
                        data = await self._stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        data = b""
                    self._conn.receive_data(data)
                elif isinstance(message, Closed):
                    self._fail(LinkClosedError("QEMU closed the QMP connection"))
                    return
                else:
                    self._dispatch(message)
        except ProtocolError as exc:
            self._fail(exc)

    def _dispatch(self, message: Greeting | Return | Error | Event) -> None:
        if isinstance(message, Greeting):
            self.greeting = message
            self._greeted.set()
        elif isinstance(message, Event):
            try:
                self._events_in.send_nowait(message)
            except trio.WouldBlock:
                self.dropped_events += 1
                if self.dropped_events == 1:
                    log.warning("qmp.events_dropped", reason="nobody reads qmp.events", buffer=EVENT_BUFFER)
            except trio.ClosedResourceError:
                pass
        else:
            waiter = self._waiters.get(message.id)
            if waiter is None:
                # A cancelled execute, or an id-less error about a line QEMU could not parse.
                log.debug("qmp.unclaimed_reply", id=message.id)
                return
            waiter.message = message
            waiter.done.set()

    async def _negotiate(self) -> None:
        await self._greeted.wait()
        self._raise_if_failed()
        await self.execute("qmp_capabilities")

    async def aclose(self) -> None:
        self._fail(LinkClosedError("QMP connection closed by us"))
        await self._stream.aclose()


@contextlib.asynccontextmanager
async def qmp_over_stream(stream: trio.abc.Stream) -> AsyncIterator[TrioQmp]:
    """A negotiated client on any trio stream (tests use ``trio.testing.memory_stream_pair``)."""
    with bare_exception():  # the reader task never raises
        async with trio.open_nursery() as nursery:
            qmp = TrioQmp(stream)
            await nursery.start(qmp._reader)
            try:
                with trio.move_on_after(NEGOTIATE_DEADLINE) as scope:
                    await qmp._negotiate()
                if scope.cancelled_caught:
                    raise LinkClosedError(f"QEMU sent no QMP greeting in {NEGOTIATE_DEADLINE:g} s (is it stopped?)")
                yield qmp
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await qmp.aclose()


@contextlib.asynccontextmanager
async def open_qmp(path: str | os.PathLike[str]) -> AsyncIterator[TrioQmp]:
    """Connect to QEMU's QMP unix socket and negotiate capabilities.

    Raises:
        LinkError: nothing listens at ``path``.
    """
    try:
        stream = await trio.open_unix_socket(os.fspath(path))
    except OSError as exc:
        raise LinkError(f"cannot connect to QMP socket {path}: {exc}") from exc
    async with qmp_over_stream(stream) as qmp:
        yield qmp


def _copy(exc: BaseException | None) -> BaseException:
    """A fresh exception per waiter: one instance raised in many tasks would share tracebacks."""
    if exc is None:
        return LinkClosedError("QMP connection closed")
    if isinstance(exc, RemoteProtocolError):
        return RemoteProtocolError(str(exc))
    if isinstance(exc, LinkClosedError):
        return LinkClosedError(str(exc))
    return LinkError(str(exc))
