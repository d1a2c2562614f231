"""Serve one gdb over a trio stream, answering from a :class:`~vmwatch.debug.DebugSession`.

What gdb sees: one thread per vCPU (thread id = vCPU index + 1), the registers each vCPU has
(a dump's saved state, a live vCPU's current one), virtual memory through vmwatch's cached
translation layer (kernel addresses through the kernel's page tables, user addresses through the
thread's CR3 or TTBR0), and on a live guest continue, step, breakpoints and watchpoints, forwarded to
QEMU's gdbstub by vmwatch, which stays its one owner. A dump is read-only: resuming it stops at
once where it was, with a console line saying why; writes are refused (``E01``). A guest that a
``vmwatch watch --gdb`` runs is looked at, never stopped: registers are read in a brief stop the
watch's link takes anyway, breakpoints are refused, and each continue or step answers at once with
the guest as it is now (a fresh snapshot).

While the target runs, the stream is read for the interrupt byte (gdb's Ctrl-C), which cancels
the continue: the debug session leaves the guest stopped and the stop reply says SIGINT.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from vmwatch.debug.session import DebugSession
from vmwatch.errors import UnsupportedOperation, VmwatchError
from vmwatch.events import Access, Breakpoint, MemoryAccess
from vmwatch.gdbserver import _proto as p
from vmwatch.gdbserver import aarch64, amd64

log = structlog.get_logger()

SUPPORTED = b"PacketSize=4000;qXfer:features:read+;QStartNoAckMode+"
MAX_READ = 0x4000
"""Largest ``m`` read answered (gdb never asks for more than its PacketSize allows)."""
_SIGTRAP, _SIGINT = 5, 2
_WATCH_ACCESS = {2: Access.WRITE, 3: Access.READ, 4: Access.READ | Access.WRITE}
_WATCH_LABEL = {Access.WRITE: "watch", Access.READ: "rwatch"}


class GdbServer:
    """The request handlers; :func:`serve` feeds them from the stream.

    Args:
        session: the debug session on the target (live or image).
        vcpus: how many vCPUs the target has.
    """

    def __init__(self, session: DebugSession, vcpus: int) -> None:
        self.session = session
        self.vcpus = max(vcpus, 1)
        self.stop_signal = _SIGTRAP
        self.detached = False
        self.registers = aarch64.FILE if session.aarch64 else amd64.FILE
        self._xml = self.registers.target_xml()

    # -- answers that need no running target ---------------------------------------------------

    async def answer(self, request: Any) -> bytes:
        """The reply to one request other than a resume (whose reply is the stop reply)."""
        handler = _HANDLERS.get(type(request))
        if handler is None:
            return b""
        try:
            return await handler(self, request)
        except UnsupportedOperation as exc:
            log.info("gdb request refused", request=repr(request), reason=str(exc))
            return b"E01"

    async def _query(self, q: p.Query) -> bytes:
        if q.name == "qSupported":
            return SUPPORTED
        if q.name == "QStartNoAckMode":
            return b"OK"
        if q.name == "qXfer":
            return self._xfer(q.args)
        if q.name == "qfThreadInfo":
            return b"m" + ",".join(f"{t:x}" for t in range(1, self.vcpus + 1)).encode()
        if q.name == "qsThreadInfo":
            return b"l"
        if q.name == "qC":
            return b"QC%x" % (self.session.vcpu + 1)
        if q.name == "qAttached":
            return b"1"  # gdb detaches (never kills) when it quits
        return b""

    def _xfer(self, args: str) -> bytes:
        fields = args.split(":")
        if len(fields) != 4 or fields[:2] != ["features", "read"] or fields[2] != "target.xml":
            return b"E00"
        offset, length = (int(x, 16) for x in fields[3].split(","))
        chunk = self._xml[offset:offset + length]
        return (b"l" if offset + length >= len(self._xml) else b"m") + chunk

    async def _registers(self, _request: p.ReadRegisters) -> bytes:
        return self.registers.encode_registers(await self.session.registers())

    async def _register(self, request: p.ReadRegister) -> bytes:
        if not 0 <= request.regnum < len(self.registers.layout):
            return b"E00"
        return self.registers.encode_register(await self.session.registers(), request.regnum)

    async def _memory(self, request: p.ReadMemory) -> bytes:
        length = min(request.length, MAX_READ)
        vaddr = request.vaddr & 0xFFFFFFFFFFFFFFFF
        try:
            return (await self.session.read(vaddr, length)).hex().encode()
        except VmwatchError:
            pass
        # Part of the range is unmapped: answer the readable prefix, page by page (gdb accepts
        # a short reply), or an error when not even the first byte is there.
        data = bytearray()
        while len(data) < length:
            at = vaddr + len(data)
            size = min(length - len(data), 0x1000 - (at & 0xFFF))
            try:
                data += await self.session.read(at, size)
            except VmwatchError:
                break
        return data.hex().encode() if data else b"E14"

    async def _write(self, _request: p.Write) -> bytes:
        return b"E01"  # read-only: vmwatch changes a guest only when asked, and gdb cannot ask here

    async def _set_thread(self, request: p.SetThread) -> bytes:
        if request.thread > 0:
            if request.thread > self.vcpus:
                return b"E02"
            self.session.select_vcpu(request.thread - 1)
        return b"OK"

    async def _thread_alive(self, request: p.ThreadAlive) -> bytes:
        return b"OK" if 0 < request.thread <= self.vcpus else b"E01"

    async def _point(self, request: p.Point) -> bytes:
        session = self.session
        if session.read_only:
            return b"E01"
        if request.kind in (0, 1):
            if request.insert:
                await session.add_breakpoint(f"{request.vaddr:#x}")
            else:
                number = next((n for n, b in session.breakpoints.items() if b.address == request.vaddr), None)
                if number is not None:
                    await session.delete_breakpoint(number)
            return b"OK"
        access = _WATCH_ACCESS.get(request.kind)
        if access is None:
            return b""
        if request.insert:
            await session.add_watchpoint(f"{request.vaddr:#x}", request.length, access)
        else:
            number = next((n for n, w in session.watchpoints.items()
                           if (w.address, w.size, w.access) == (request.vaddr, request.length, access)), None)
            if number is not None:
                await session.delete_breakpoint(number)
        return b"OK"

    async def _halt_reason(self, _request: p.HaltReason) -> bytes:
        return self.stop_reply()

    async def _detach(self, _request: p.Detach) -> bytes:
        await self.session.detach()
        self.detached = True
        return b"OK"

    def stop_reply(self, event: Any = None) -> bytes:
        """``T`` stop reply for the selected thread (and the watchpoint that fired, if one did)."""
        extra = b""
        if isinstance(event, MemoryAccess):
            label = _WATCH_LABEL.get(event.access, "awatch")
            extra = b"%s:%x;" % (label.encode(), event.address)
        return b"T%02x%sthread:%x;" % (self.stop_signal, extra, self.session.vcpu + 1)

    # -- resuming --------------------------------------------------------------------------------

    async def resume(self, request: p.Resume) -> tuple[bytes, bytes]:
        """Run or step; return (console text for gdb, the stop reply) once the target stops."""
        session = self.session
        if session.read_only:
            self.stop_signal = _SIGTRAP
            if session.live is None:
                return b"vmwatch: this target is a memory image: it cannot run\n", self.stop_reply()
            session.guest_ran()
            return b"vmwatch: the watch runs this guest; gdb now sees it as it is\n", self.stop_reply()
        if request.thread is not None and 0 < request.thread <= self.vcpus:
            session.select_vcpu(request.thread - 1)
        self.stop_signal = _SIGTRAP
        if request.step:
            await session.step()
            return b"", self.stop_reply()
        event = await session.cont()
        return b"", self.stop_reply(event if isinstance(event, (Breakpoint, MemoryAccess)) else None)


_HANDLERS = {
    p.Query: GdbServer._query,
    p.ReadRegisters: GdbServer._registers,
    p.ReadRegister: GdbServer._register,
    p.ReadMemory: GdbServer._memory,
    p.Write: GdbServer._write,
    p.SetThread: GdbServer._set_thread,
    p.ThreadAlive: GdbServer._thread_alive,
    p.Point: GdbServer._point,
    p.HaltReason: GdbServer._halt_reason,
    p.Detach: GdbServer._detach,
}


async def serve(stream: trio.abc.Stream, session: DebugSession, vcpus: int) -> None:
    """Answer one gdb on ``stream`` until it detaches or hangs up; a live guest is left running.

    Raises:
        RemoteProtocolError: gdb sent bytes that are not packets.
    """
    link = _Link(stream, GdbServer(session, vcpus))
    try:
        await link.answer_all()
    finally:
        if not link.server.detached:
            with trio.CancelScope(shield=True):
                await session.detach()  # gdb hung up: take vmwatch's traps out, let the guest run


class _Link:
    """The stream, the protocol core and requests read early (while the target ran)."""

    def __init__(self, stream: trio.abc.Stream, server: GdbServer) -> None:
        self.stream = stream
        self.server = server
        self.core = p.ServerCore()
        self.queued: list[Any] = []

    async def answer_all(self) -> None:
        core, server = self.core, self.server
        while (request := await self.next_request()) is not None:
            if isinstance(request, p.Interrupt):
                continue  # the target is already stopped
            if isinstance(request, p.Resume):
                console, reply = await self.run_until_stop(request)
                if console:
                    core.reply(b"O" + console.hex().encode())
                core.reply(reply)
            else:
                core.reply(await server.answer(request))
            await self.flush()
            if server.detached:
                return

    async def next_request(self) -> Any:
        """The next request, or ``None`` when gdb hung up."""
        if self.queued:
            return self.queued.pop(0)
        while (request := self.core.next_request()) is p.NEED_DATA:
            await self.flush()
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.core.receive_data(data)
        return request

    async def flush(self) -> None:
        data = self.core.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def run_until_stop(self, request: p.Resume) -> tuple[bytes, bytes]:
        """Resume, and meanwhile read gdb's stream: an interrupt byte stops the target (SIGINT)."""
        result: list[tuple[bytes, bytes]] = []
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                result.append(await self.server.resume(request))
                nursery.cancel_scope.cancel()

            async def listen() -> None:
                while True:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        nursery.cancel_scope.cancel()  # gdb went away: stop the target where it is
                        return
                    self.core.receive_data(data)
                    while (got := self.core.next_request()) is not p.NEED_DATA:
                        if isinstance(got, p.Interrupt):
                            nursery.cancel_scope.cancel()
                            return
                        self.queued.append(got)

            nursery.start_soon(run)
            nursery.start_soon(listen)
        if result:
            return result[0]
        self.server.stop_signal = _SIGINT
        return b"", self.server.stop_reply()
