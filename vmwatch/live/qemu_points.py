"""Breakpoints and watchpoints of a QEMU guest: gdbstub ``Z``/``z`` points, or inline hooks.

A mixin of :class:`vmwatch.live.qemu.QemuVM`; every change holds the link with the guest stopped.
"""

from __future__ import annotations

from vmwatch.events import Access
from vmwatch.live.hook_guards import Guard
from vmwatch.live.gdbrsp import _proto as p

BP = p.WatchKind.SOFTWARE
WATCH_KIND = {Access.WRITE: p.WatchKind.WRITE, Access.READ: p.WatchKind.READ, Access.READ_WRITE: p.WatchKind.ACCESS}


class Points:
    """The breakpoint and watchpoint half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    async def add_breakpoint(self, vaddr: int, *, inline: bool = False, guard: Guard | None = None) -> bool:
        """Execution breakpoint at a guest virtual address. Returns True when it is inline.

        A gdbstub breakpoint is invisible to the guest but costs a TCG guest a flush of all its
        translated code per hit. ``inline=True`` is for callers that know ``vaddr`` is the
        entry of a kernel function: where it opens with the ftrace NOP (and the guest runs
        under TCG), the breakpoint is an inline hook instead (see ``inline_hooks``): no flush,
        about 10x more events per second, but the guest's own reads of its code see the patch
        (vmwatch's reads, through ``memory`` and :meth:`read_memory`, see the original bytes).

        ``guard`` (see ``hook_guards``): a guarded inline hook, which stops only when the guest's
        registers pass it. Nothing is armed, and False returned, when no such hook can be placed
        (a plain breakpoint there would stop at every call).
        """
        async with self._stopped_link():
            if vaddr in self._breakpoints:
                return vaddr in self._hooks
            if guard is not None:
                if not (self.inline_hooks and await self._add_hook(vaddr, guard)):
                    return False
                self._breakpoints.add(vaddr)
                return True
            if inline and self.inline_hooks and await self._add_hook(vaddr):
                self._breakpoints.add(vaddr)
                return True
            await self.gdb.request(p.insert_point(BP, vaddr))
            self._breakpoints.add(vaddr)
            return False

    async def remove_breakpoint(self, vaddr: int) -> None:
        async with self._stopped_link():
            if vaddr in self._breakpoints:
                self._breakpoints.discard(vaddr)
                self._next_insn.pop(vaddr, None)
                self._insns.pop(vaddr, None)
                hook = self._hooks.pop(vaddr, None)
                if hook is None:
                    await self.gdb.request(p.remove_point(BP, vaddr))
                    return
                await self._unhook(hook)

    async def add_watchpoint(self, vaddr: int, size: int, access: Access = Access.WRITE) -> None:
        """Watch ``size`` bytes at ``vaddr`` for reads, writes or both (any length).

        The event's ``address`` is the START of the watched range (what QEMU reports).
        """
        kind = WATCH_KIND.get(access)
        if kind is None:
            raise ValueError(f"access must be READ, WRITE or READ_WRITE, not {access!r}")
        if size <= 0:
            raise ValueError(f"size must be > 0, not {size!r}")
        async with self._stopped_link():
            await self.gdb.request(p.insert_point(kind, vaddr, size))
            self._watchpoints[(vaddr, size, access)] = None

    async def remove_watchpoint(self, vaddr: int, size: int, access: Access = Access.WRITE) -> None:
        async with self._stopped_link():
            if self._watchpoints.pop((vaddr, size, access), 0) is None:
                await self.gdb.request(p.remove_point(WATCH_KIND[access], vaddr, size))
