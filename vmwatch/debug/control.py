"""Controlling a live guest from the debugger: step, step over, continue, breakpoints, watchpoints.

:class:`Control` is one part of :class:`vmwatch.debug.session.DebugSession` (a mixin): what needs
``target.live`` and raises :class:`UnsupportedOperation` on a memory image. Numbers are shared by
breakpoints and watchpoints, as in gdb; every stop counts the hit of the breakpoint it was.

Step over decodes the instruction at the pc with capstone: a call (x86 ``call``, AArch64 ``bl``/``blr``)
gets a temporary breakpoint right after it (pc + instruction length) and a continue until that
breakpoint is hit with the stack pointer of the call site (so another task passing there does not
count); anything else is a single step.
"""

from __future__ import annotations

from typing import Any

import attrs
import structlog

from vmwatch.errors import DebugError, UnsupportedOperation, VmwatchError
from vmwatch.events import Access, Breakpoint, Event, MemoryAccess

log = structlog.get_logger()


@attrs.frozen
class BreakpointInfo:
    """A numbered breakpoint and how often it stopped the guest."""

    number: int
    address: int
    label: str
    hits: int = 0


@attrs.frozen
class WatchpointInfo:
    """A numbered watchpoint: the watched range and access."""

    number: int
    address: int
    size: int
    access: Access


class Control:
    """The session's control of execution (its state: ``breakpoints``, ``watchpoints``, ``last_stop``)."""

    def _need_live(self, what: str) -> Any:
        if self.live is None:
            raise UnsupportedOperation(f"cannot {what}: the target is a memory image (read-only session)")
        if self.observe:
            raise UnsupportedOperation(f"cannot {what}: the watch runs this guest (look-only session)")
        return self.live

    async def step(self, count: int = 1) -> int:
        """Execute ``count`` instructions on the selected vCPU; return the new pc."""
        live = self._need_live("step")
        if count < 1:
            raise DebugError(f"step count must be >= 1, not {count}")
        rip = 0
        for _ in range(count):
            event = await live.step(self.vcpu)
            self.guest_ran()
            rip = event.rip if getattr(event, "rip", None) else (await self.registers()).pc
            self.last_stop = event
        return rip

    async def next(self) -> int:
        """Step over: a call runs to its return address; anything else is one step. Returns the pc."""
        live = self._need_live("step over")
        insn = await self.current_instruction()
        if not self.is_call(insn):
            return await self.step()
        after = insn.address + insn.size
        frame = (await self.registers()).sp  # back to this value once the call has returned
        vcpu = self.vcpu
        temporary = after not in {b.address for b in self.breakpoints.values()}
        if temporary:
            await live.add_breakpoint(after)
        try:
            while True:
                event = await self.cont()
                if not isinstance(event, Breakpoint):
                    break  # a watchpoint fired inside the call: stop there, as gdb does
                if event.address in {b.address for b in self.breakpoints.values()}:
                    break  # a user breakpoint inside the call
                if event.address == after and event.vcpu == vcpu and (await self.registers()).sp == frame:
                    break  # our return, not another task (or a recursion) passing the same address
                self.vcpu = vcpu
        finally:
            if temporary:
                await live.remove_breakpoint(after)
        return (await self.registers()).pc

    async def cont(self) -> Event:
        """Resume until a breakpoint or watchpoint stops the guest; return that event.

        The backend steps over a breakpoint at the current RIP by itself. Cancel with trio
        (Ctrl-C in the shell); the guest is then stopped again.
        """
        live = self._need_live("continue")
        events = live.events()
        try:
            await live.resume()
            self.guest_ran()
            async for event in events:
                if isinstance(event, (Breakpoint, MemoryAccess)):
                    self.guest_ran()
                    self.last_stop = event
                    self.vcpu = event.vcpu
                    self._count_hit(event)
                    return event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        raise VmwatchError("the guest's event stream ended (QEMU gone?)")

    def _count_hit(self, event: Event) -> None:
        if isinstance(event, Breakpoint):
            for number, bp in self.breakpoints.items():
                if bp.address == event.address:
                    self.breakpoints[number] = attrs.evolve(bp, hits=bp.hits + 1)

    async def add_breakpoint(self, expression: str) -> BreakpointInfo:
        live = self._need_live("set a breakpoint")
        address = await self.evaluate(expression)
        await live.add_breakpoint(address)
        bp = BreakpointInfo(self._next_number, address, self.symbolize(address) or f"{address:#x}")
        self.breakpoints[bp.number] = bp
        self._next_number += 1
        return bp

    async def delete_breakpoint(self, number: int) -> None:
        live = self._need_live("delete a breakpoint")
        if number in self.breakpoints:
            bp = self.breakpoints.pop(number)
            await live.remove_breakpoint(bp.address)
        elif number in self.watchpoints:
            wp = self.watchpoints.pop(number)
            await live.remove_watchpoint(wp.address, wp.size, wp.access)
        else:
            raise DebugError(f"no breakpoint or watchpoint number {number}")

    async def add_watchpoint(self, expression: str, size: int = 8, access: Access = Access.WRITE) -> WatchpointInfo:
        live = self._need_live("watch memory")
        if not 0 < size <= 1 << 20:
            raise DebugError(f"bad watch length {size}")
        address = await self.evaluate(expression)
        await live.add_watchpoint(address, size, access)
        wp = WatchpointInfo(self._next_number, address, size, access)
        self.watchpoints[wp.number] = wp
        self._next_number += 1
        return wp

    async def attach(self) -> None:
        """Stop a live guest, as a debugger attaching does (an image or an observed guest needs nothing).

        An AArch64 guest's registers are read at once: its kernel is found from TTBR1_EL1/TCR_EL1,
        and symbols may be asked for before anything else.
        """
        if self.live is not None and not self.observe:
            await self.live.pause()
            self.guest_ran()
        if self.live is not None and self.aarch64:
            await self.registers()

    async def detach(self) -> None:
        """Remove every breakpoint and watchpoint and let the guest run."""
        if self.live is None or self.observe:
            return
        for number in list(self.breakpoints) + list(self.watchpoints):
            try:
                await self.delete_breakpoint(number)
            except VmwatchError as exc:
                log.warning("cannot remove trap", number=number, error=str(exc))
        await self.live.resume()
        self.guest_ran()
