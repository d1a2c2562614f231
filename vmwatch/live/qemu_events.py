"""Stop replies of a QEMU guest turned into events, and the stream that hands them out.

A stop is a user breakpoint, a watchpoint hit, an inline hook's trampoline read, the internal
stop of a hop (``qemu_stepping``) or our own interrupt; only the first three become events. A
mixin of :class:`vmwatch.live.qemu.QemuVM`.
"""

from __future__ import annotations

import trio

from vmwatch.errors import LinkClosedError, ProtocolError
from vmwatch.events import Access, Breakpoint, Event, MemoryAccess, SourceEnded
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import RemoteError
from vmwatch.live.qemu_points import BP
from vmwatch.live.qemu_stepping import SIGTRAP

SIGINT = 2
_WATCH_ACCESS = {"watch": Access.WRITE, "rwatch": Access.READ, "awatch": Access.READ_WRITE}


class EventDelivery:
    """The stop-to-event half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    async def _on_stop(self, stop: p.StopReply | p.Exited, *, may_continue: bool = False) -> bool:
        """Digest a stop reply (lock held, or the sole reader). Returns True when there is
        nothing for the consumer (our own interrupt, or the internal stop of a hop).

        ``may_continue``: the caller is the event loop, which may let the guest go on at once
        after a hop's internal stop; anyone who wanted the guest stopped passes False.
        """
        if isinstance(stop, p.Exited):
            self._closed = f"guest exited with status {stop.status}"
            self._pending.append(SourceEnded(reason=self._closed, **self._event_fields(0)))
            return False
        vcpu = self._vcpu_of(stop.thread)
        hop = self._hop
        if hop is not None:
            self._hop = None
            restore = [p.insert_point(BP, hop.addr), p.remove_point(BP, hop.next_addr)]
            if stop.signal == SIGTRAP and stop.watch is None and may_continue:
                # Optimistic: put the breakpoint back, read RIP and continue in one write. If
                # RIP is not the hop target but a user breakpoint B, the guest re-stops at B at
                # once (a plain continue at a breakpoint does), and B is reported then.
                await self._select(vcpu)
                for callback in self.on_resume:
                    callback()
                replies = await self.gdb.batch([*restore, p.read_register(self._layout[self._pc_name].regnum), p.cont()])
                rip = int.from_bytes(p.decode_hex(replies[-1]), "little")
                self.stats["internal_stops" if rip == hop.next_addr else "hops_interrupted"] += 1
                return True
            await self.gdb.batch(restore)
        if stop.watch is not None and stop.watch[1] in self._hook_at_slot and stop.watch[0] == "rwatch":
            hook = self._hook_at_slot[stop.watch[1]]
            self._regs_cache.pop(vcpu, None)
            regs = await self._read_g(vcpu)
            if regs.rip != hook.slot + hook.stop_offset:
                return True  # the guest read its own code there (not the trampoline's read)
            self._hook_stops[vcpu] = (hook, regs.rsp)
            self._regs_cache[vcpu] = await self._as_at_hook(regs, hook, regs.rsp)
            self._pending.append(Breakpoint(address=hook.address, **self._event_fields(vcpu)))
            return False
        if stop.watch is not None:
            kind, addr = stop.watch
            size = next((s for (a, s, _acc) in self._watchpoints if a == addr), 0)
            if self._a64 is not None:
                await self._step_past_access(vcpu, addr)
            value = None
            if 0 < size <= 64:
                try:
                    await self._select(vcpu)
                    await self._set_phys(False)
                    value = p.decode_hex(await self.gdb.request(p.read_memory(addr, size)))
                except RemoteError:
                    value = None
            self._pending.append(MemoryAccess(access=_WATCH_ACCESS[kind], address=addr, size=size,
                                              value=value, **self._event_fields(vcpu)))
            return False
        if stop.signal == SIGTRAP:
            regs = await self._read_g(vcpu)
            if regs.pc not in self._breakpoints:
                return True  # a breakpoint removed meanwhile, or a spurious trap
            self._resume_from = (vcpu, regs.pc)
            self._pending.append(Breakpoint(address=regs.pc, **self._event_fields(vcpu)))
            return False
        return True  # SIGINT (our interrupt) or another signal: nothing to report


    def events(self) -> EventStream:
        """Breakpoint / MemoryAccess / SingleStep events, one at a time, guest stopped meanwhile.

        The guest stays stopped while the consumer handles an event. Asking for the next event
        lets it run again, unless the consumer called :meth:`pause` (then only :meth:`resume`
        does); an explicit :meth:`resume` inside the loop body is fine too. The stream ends with
        one :class:`SourceEnded` when QEMU exits, the link drops or QEMU stops answering
        (``qemu_liveness``). Breaking out of the loop leaves the guest stopped at the last event
        (``resume()`` or detaching lets it go).
        """
        return EventStream(self)

    async def _next_event(self) -> Event:
        while True:
            while self._raw_stops and not self._pending:
                async with self._lock:
                    await self._on_stop(self._raw_stops.popleft())
            if self._pending:
                return self._pending.popleft()
            if self._closed is not None:
                raise StopAsyncIteration
            try:
                async with self._lock:
                    if self.gdb.state is p.State.STOPPED and not self._pending and not self._held:
                        await self._resume_locked()
                    self._waiting = self.gdb.state is p.State.RUNNING
                if not self._waiting:
                    await trio.sleep(0.01)  # held by pause(), or events queued meanwhile
                    continue
                try:
                    stop = await self.gdb.wait_stop()
                finally:
                    self._waiting = False
                    if self._stop_wanted and self.gdb.state is p.State.RUNNING:
                        self._stopped.set()  # cancelled: the requester reads the stop itself
                # From here the stop reply is consumed: digest it whatever cancellation says,
                # or a lifted breakpoint (hop) or an event would be lost.
                with trio.CancelScope(shield=True):
                    if self._stop_wanted:
                        self._stop_wanted = False
                        await self._on_stop(stop)
                        self._stopped.set()
                        continue
                    async with self._lock:
                        await self._on_stop(stop, may_continue=True)
            except (LinkClosedError, ProtocolError) as exc:
                self._stopped.set()
                if self._closed is not None:
                    continue  # the end is queued already (the liveness probe closed the link)
                self._closed = str(exc)
                return SourceEnded(reason=self._closed, **self._event_fields(0))


class EventStream:
    """Async iterator over a :class:`QemuVM`'s events (a class, not an async generator, so
    leaving the loop early needs no ``aclosing``)."""

    def __init__(self, vm: EventDelivery) -> None:
        self._vm = vm
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        event = await self._vm._next_event()
        if isinstance(event, SourceEnded):
            self._ended = True
        return event
