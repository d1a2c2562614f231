"""CR3 writes of Linux address-space switches, from one inline hook instead of a breakpoint per writer.

Theory of operation: the generic register sensor (engine/registers.py) breaks after every
``mov cr3`` of kernel text; those are gdbstub breakpoints, each hit a flush of TCG's translated
code, and CR3 changes at every switch to another process. On x86-64 Linux every switch of
address space goes through ``switch_mm_irqs_off`` -> ``load_new_mm_cr3(pgd_t *pgdir, u16
new_asid, [unsigned long lam,] bool need_flush)`` (arch/x86/mm/tlb.c; ``lam`` from 6.4), a
traceable function: its ftrace NOP takes an inline hook, whose stop flushes nothing. At its
entry the value about to be written is computed as the kernel's ``build_cr3`` does: the physical
address of ``pgdir``, and when CR4.PCIDE is set, the kernel PCID ``new_asid + 1`` and, for a
switch that keeps the TLB, bit 63 (CR3_NOFLUSH). With ``lam``, its CR3 bits are or'ed in.

Not seen here: CR3 rewrites with the same value to flush the TLB (``native_flush_tlb_local``),
and the PTI entry code's switches between a process's kernel and user halves.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import structlog

from vmwatch.cpu import CR4_PCIDE
from vmwatch.errors import VmwatchError
from vmwatch.events import Breakpoint, RegisterWrite

if TYPE_CHECKING:
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

HOOKED = "load_new_mm_cr3"
CR3_NOFLUSH = 1 << 63
LAM_SINCE = (6, 4)


def new_cr3(pgd_paddr: int, asid: int, need_flush: bool, pcide: bool, lam: int = 0) -> int:
    """The CR3 value ``load_new_mm_cr3`` writes (the kernel's ``build_cr3`` / ``build_cr3_noflush``)."""
    value = pgd_paddr | lam
    if pcide:
        value |= (asid & 0xFFFF) + 1  # kern_pcid(): PCID 0 is left to the boot-time mappings
        if not need_flush:
            value |= CR3_NOFLUSH
    return value


def release_tuple(release: str) -> tuple[int, int]:
    """``"6.1.0-57-amd64"`` -> ``(6, 1)``; ``(0, 0)`` when unreadable."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class AddressSpaceSensor:
    """Stop at ``load_new_mm_cr3`` -> :class:`RegisterWrite` of ``cr3`` with the value it writes."""

    def __init__(self, address: int, initial: int | None, with_lam: bool) -> None:
        self.address = address
        self._initial = initial
        self._with_lam = with_lam
        self._last: dict[int, int] = {}

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        regs = guest.registers
        if event.address != self.address or regs is None or regs.rdi is None:
            return
        lam, flag = (regs.rdx or 0, regs.rcx or 0) if self._with_lam else (0, regs.rdx or 0)
        new = new_cr3(guest.linux.memory.translate(regs.rdi), regs.rsi or 0, bool(flag & 0xFF),
                      bool((regs.cr4 or 0) & CR4_PCIDE), lam)
        old = self._last.get(event.vcpu, self._initial)
        self._last[event.vcpu] = new
        guest.emit(RegisterWrite(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, register="cr3",
                                 old=old, new=new, rip=self.address))


async def plan(engine: SensorHost, initial: int | None) -> bool:
    """Hook ``load_new_mm_cr3`` for CR3 listeners; False when this kernel has none to hook."""
    from vmwatch.engine.dispatch import Handler, Trap

    try:
        linux = engine.guest.linux
        if linux.memory.pointer_size != 8:
            return False
        address = linux.symbols.get(HOOKED)
        if address is None or linux.symbols.type_of(HOOKED) not in ("t", "T"):
            return False
        with_lam = release_tuple(linux.kernel.release) >= LAM_SINCE
    except (VmwatchError, KeyError, AttributeError):
        return False
    run = engine.sensor_run("sensor.address_spaces")
    run.func = AddressSpaceSensor(int(address), initial, with_lam)
    await engine.add_trap(Trap("breakpoint", int(address), 1, HOOKED, entry=True), Handler(run, None))
    log.info("address-space sensor armed", hooked=HOOKED)
    return True
