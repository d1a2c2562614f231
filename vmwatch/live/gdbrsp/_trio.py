"""Thin trio wrapper over the sans-IO gdb remote protocol core.

One task at a time talks on a connection (trio streams forbid concurrent receives); the QEMU
backend serialises callers. The loop is the h11 one: ``next_event``; on ``NEED_DATA``,
``receive_some``. End of stream and broken sockets become :class:`LinkClosedError`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import AsyncIterator

import trio

from vmwatch.errors import LinkClosedError, RemoteProtocolError
from vmwatch.live.gdbrsp import _proto as p


REPLY_DEADLINE = 30.0
"""Seconds a stub may take to answer a command before it is considered dead."""


class RemoteError(RemoteProtocolError):
    """The stub answered a command with ``Enn`` (``code``) or an empty (unsupported) reply."""

    def __init__(self, command: p.Command, payload: bytes) -> None:
        self.command = command
        self.code = int(payload[1:], 16) if payload[:1] == b"E" else None
        what = f"error {payload.decode('ascii', 'replace')}" if payload else "no support"
        super().__init__(f"gdbstub answered {command.payload[:40].decode('ascii', 'replace')!r} with {what}")


class GdbConnection:
    """A gdbstub connection over any ``trio.abc.Stream``."""

    def __init__(self, stream: trio.abc.Stream, *, state: p.State = p.State.STOPPED) -> None:
        self.stream = stream
        self.core = p.Client(state)
        self._receive_size = 65536
        self._closed_by: str | None = None
        """Why we closed the connection (:meth:`aclose`): what waiters' errors then say."""
        sock = getattr(stream, "socket", None)
        self._raw = socket.socket(fileno=os.dup(sock.fileno())) if sock is not None else None
        """A non-blocking duplicate of the socket for the direct send path (see :meth:`_send`)."""
        if self._raw is not None:
            self._raw.setblocking(False)

    @property
    def state(self) -> p.State:
        return self.core.state

    async def _send(self, data: bytes) -> None:
        """Write bytes the state machine already counts as sent: shielded, so a cancellation
        cannot leave the core believing in a packet that never left (a few bytes to a unix
        socket go out at once; a stub that stops reading for REPLY_DEADLINE is dead).

        A packet is tried on the socket directly first: it nearly always fits, and the trio
        path costs more than the stub's own turnaround (per round trip, 45 us measured).
        """
        if not data:
            return
        if self._raw is not None:
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._lost(exc.strerror or exc) from exc
            data = data[sent:]
            if not data:
                return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REPLY_DEADLINE) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._lost(exc) from exc
        if scope.cancelled_caught:
            raise LinkClosedError(f"gdbstub took no data for {REPLY_DEADLINE} s")

    async def _next_event(self) -> p.ClientEvent:
        core = self.core
        while True:
            event = core.next_event()
            out = core.data_to_send()
            if out:
                await self._send(out)
            if event is not p.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(self._receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._lost(exc) from exc
            if not data:
                raise LinkClosedError("gdbstub closed the connection (QEMU exited?)")
            core.receive_data(data)

    def _lost(self, why: object) -> LinkClosedError:
        """The error for a dead socket: why we closed it, or what the socket said."""
        return LinkClosedError(self._closed_by or f"gdbstub connection lost: {why or type(why).__name__}")

    async def _next_reply(self, want: type | tuple[type, ...] = object) -> p.ClientEvent:
        while True:
            event = await self._next_event()
            if isinstance(event, (p.Notification, p.ConsoleOutput)):
                continue
            if isinstance(event, want):
                return event
            if not isinstance(event, p.StopReply):
                raise RemoteProtocolError(f"gdbstub sent {event!r} instead of a reply")
            # an unsolicited stop reply on a fresh connection: the guest is stopped now

    async def _finish(self, want: type | tuple[type, ...]) -> p.ClientEvent:
        """Wait for an answer that is owed, shielded from cancellation: leaving halfway would
        desynchronise the state machine. QEMU answers at once or dies (closing the socket);
        a stub frozen for REPLY_DEADLINE seconds is treated as dead."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REPLY_DEADLINE):
            return await self._next_reply(want)
        with trio.CancelScope(shield=True):
            await self.aclose()
            raise LinkClosedError(f"gdbstub gave no answer in {REPLY_DEADLINE} s")

    async def request(self, command: p.Command, *, check: bool = True) -> bytes:
        """Send a plain command and return its reply payload.

        Raises:
            RemoteError: ``check`` and the reply is ``Enn`` or empty.
            LinkClosedError: the stub went away.
        """
        await self._send(self.core.send(command))
        reply = await self._finish(p.Reply)
        assert isinstance(reply, p.Reply), reply
        if check and (reply.is_error or reply.unsupported):
            raise RemoteError(command, reply.payload)
        return reply.payload

    async def batch(self, commands: list[p.Command], *, check: bool = True) -> list[bytes]:
        """Pipeline commands (the last may resume the target); replies of the plain ones.

        Raises:
            RemoteError: ``check`` and one of them failed (the resume, if any, was still sent).
        """
        await self._send(self.core.send_batch(commands))
        plain = [c for c in commands if c.reply is p.ReplyKind.PLAIN]
        replies = []
        for command in plain:
            reply = await self._finish(p.Reply)
            assert isinstance(reply, p.Reply), reply
            if check and (reply.is_error or reply.unsupported):
                raise RemoteError(command, reply.payload)
            replies.append(reply.payload)
        return replies

    async def query_stop(self) -> p.StopReply | p.Exited:
        await self._send(self.core.send(p.query_halt_reason()))
        event = await self._finish((p.StopReply, p.Exited))
        assert isinstance(event, (p.StopReply, p.Exited)), event
        return event

    async def resume(self, command: p.Command) -> None:
        """Send ``c``/``s``/``vCont``: the target runs until :meth:`wait_stop` returns."""
        await self._send(self.core.send(command))

    async def interrupt(self) -> None:
        await self._send(self.core.interrupt())

    async def wait_stop(self, *, soon: bool = False) -> p.StopReply | p.Exited:
        """Wait for the running target to stop (breakpoint, watchpoint, step, interrupt, exit).

        ``soon``: the stop is owed right away (after a single step or an interrupt), so the
        wait is shielded like a reply; otherwise it is cancellable (the guest may run forever).
        """
        if soon:
            event = await self._finish((p.StopReply, p.Exited))
        else:
            event = await self._next_reply((p.StopReply, p.Exited))
        assert isinstance(event, (p.StopReply, p.Exited)), event
        return event

    async def read_features(self, annex: str) -> bytes:
        """Fetch a whole ``qXfer:features:read`` annex."""
        data = bytearray()
        while True:
            payload = await self.request(p.read_features(annex, len(data)))
            chunk, last = p.parse_xfer(payload)
            data += chunk
            if last or not chunk:
                return bytes(data)
            if len(data) > p.MAX_PACKET:
                raise RemoteProtocolError(f"target description {annex!r} is absurdly long")

    async def aclose(self, reason: str | None = None) -> None:
        """Close the connection; a task waiting on it gets LinkClosedError(``reason``)."""
        self._closed_by = self._closed_by or reason
        if self._raw is not None:
            self._raw.close()
        await self.stream.aclose()


@contextlib.asynccontextmanager
async def open_gdb(path: str) -> AsyncIterator[GdbConnection]:
    """Connect to a gdbstub listening on a unix socket (connecting stops a QEMU guest).

    Negotiates multiprocess thread ids and syncs the state machine with ``?``.

    Raises:
        LinkClosedError: nobody listens at ``path``.
    """
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise LinkClosedError(f"cannot connect to gdbstub at {path}: {exc.strerror or exc}") from exc
    conn = GdbConnection(stream)
    try:
        await conn.request(p.query_supported())
        await conn.query_stop()
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()
