"""Find an arm64 Linux kernel's page tables (``swapper_pg_dir``) in a dump that lacks TTBR1/TCR.

Why: QEMU's aarch64 ``dump-guest-memory`` writes only x0..x30, sp, pc and pstate per CPU, so the
translation regime is unknown. Strategy, for each layout Linux builds (granule x VA bits, the
Debian arm64 one first): a candidate top-level table is a physical page whose valid
descriptors are all table descriptors, few, with every output address inside RAM and no bits
outside the address and table-attribute fields set. Linux's kernel root maps all RAM twice:
once in the linear map (the lower half of the TTBR1 region) and once in the kernel image
mapping (the upper half, where KASLR puts the image). So a candidate is accepted when its own
page is a leaf in both halves of the region it describes. A process's top-level table (it maps
user pages only), the idmap and the trampoline tables fail this test; a stale early-boot
``init_pg_dir`` maps the image but no linear map, so it fails too.

The TCR_EL1 returned is the one Linux programs for that layout (TBI0 and TBI1 set, as the
Debian kernel runs with MTE), with the caveat that the granule of the user half is assumed
equal to the kernel half's.
"""

from __future__ import annotations

import struct
from typing import Iterable

import attrs

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import GuestDataError, PhysicalReadError, SymbolError, TranslationError
from vmwatch.memory.aarch64 import OA_MASK, Aarch64Walker, Region, output_address, plan
from vmwatch.memory.physical import CachedPhysicalMemory

LAYOUTS = ((12, 48), (12, 39), (16, 52), (16, 48), (16, 42), (14, 47), (14, 36))
"""(granule shift, VA bits) of the arm64 Linux configurations, the most common first."""
TG0 = {12: 0, 16: 1, 14: 2}
TG1 = {14: 1, 12: 2, 16: 3}
TBI_BOTH = 3 << 37
AF = 1 << 10
MAX_TOP_ENTRIES = 64
"""A kernel root uses a few top-level slots (linear map, vmalloc/image, vmemmap, fixmap)."""
_TABLE_BAD_BITS = ~(OA_MASK | 3 | 0xF8 << 56) & ((1 << 64) - 1)
"""Bits a Linux table descriptor leaves clear: 11:2 and 58:48 (APTable/XNTable/NSTable may be set)."""


@attrs.frozen
class KernelTables:
    """Where a scan found the kernel's page tables."""

    ttbr1: int
    """Physical address of the top-level table (TTBR1_EL1 without ASID)."""
    tcr: int
    """The TCR_EL1 Linux programs for the layout found."""
    granule: int
    va_bits: int
    vaddr: int
    """The table's own address in the kernel image mapping (``swapper_pg_dir``)."""

    def describe(self) -> str:
        """One line for ``info``: what was found and that it was found by scanning."""
        return (f"TTBR1 {self.ttbr1:#x} (swapper_pg_dir at {self.vaddr:#x}), {1 << (self.granule - 10)} KiB "
                f"granule, {self.va_bits}-bit VA: found by scanning (the dump has no TTBR1_EL1/TCR_EL1)")

    def registers(self, regs: Aarch64Registers) -> Aarch64Registers:
        """``regs`` with the found TTBR1_EL1 and TCR_EL1 filled in (fields the source gave are kept)."""
        return attrs.evolve(regs, ttbr1_el1=regs.ttbr1_el1 if regs.ttbr1_el1 is not None else self.ttbr1,
                            tcr_el1=regs.tcr_el1 if regs.tcr_el1 is not None else self.tcr)


def linux_tcr(granule: int, va_bits: int) -> int:
    """TCR_EL1 with ``va_bits`` and ``granule`` in both halves and TBI0/TBI1 set."""
    size = 64 - va_bits
    return size | size << 16 | TG0[granule] << 14 | TG1[granule] << 30 | TBI_BOTH


def find_kernel_tables(phys, *, layouts: Iterable[tuple[int, int]] = LAYOUTS) -> KernelTables:
    """Scan every RAM page of ``phys`` for an arm64 kernel root table (see the module comment).

    Raises:
        SymbolError: no page passes for any layout.
    """
    cache = phys if isinstance(phys, CachedPhysicalMemory) else CachedPhysicalMemory(phys)
    runs = [(r.start, r.start + r.size) for r in cache.runs]
    for granule, va_bits in layouts:
        steps = plan(Region(granule, va_bits, False))
        entries = steps[0][1] + 1
        for paddr in _candidates(cache, runs, entries):
            found = _check(cache, paddr, granule, va_bits)
            if found is not None:
                return found
    raise SymbolError("no arm64 kernel page tables (swapper_pg_dir) found by scanning physical memory")


def _candidates(cache: CachedPhysicalMemory, runs: list[tuple[int, int]], entries: int):
    """Page-aligned physical addresses whose first ``entries`` descriptors look like a kernel root."""
    size = entries * 8
    align = max(size, 0x1000)
    unpack = struct.Struct(f"<{entries}Q").unpack_from
    inner = cache.inner
    for start, end in runs:
        for chunk in range(start & ~0xFFF, end, 1 << 22):
            try:
                data = inner.read(chunk, min(1 << 22, end - chunk))
            except PhysicalReadError:
                continue
            # A top-level table is aligned to its size (Arm ARM D8.2.5); Linux's fill a page or more.
            for off in range(-chunk % align, len(data) - size + 1, align):
                # Most pages fail on a byte count (C speed) before any unpacking.
                zeros = data.count(0, off, off + size)
                if zeros < size - 8 * MAX_TOP_ENTRIES or zeros == size:
                    continue
                valid = [d for d in unpack(data, off) if d]
                if not valid or len(valid) > MAX_TOP_ENTRIES or len(valid) == entries:
                    continue
                if all(d & 3 == 3 and not d & _TABLE_BAD_BITS and _in(runs, d & OA_MASK) for d in valid):
                    yield chunk + off


def _in(runs: list[tuple[int, int]], paddr: int) -> bool:
    return any(start <= paddr < end for start, end in runs)


def _linux_path(cache: CachedPhysicalMemory, root: int, vaddr: int, granule: int, va_bits: int) -> bool:
    """Whether ``vaddr``'s walk looks like Linux built it: table descriptors with bits 11:2 clear,
    a leaf with the access flag (bit 10) set. A tree read with too many levels fails here: its
    real leaves would be taken for tables."""
    base = root
    for shift, imask, _level, _block in plan(Region(granule, va_bits, False)):
        ea = base + ((vaddr >> shift) & imask) * 8
        desc = struct.unpack_from("<Q", cache.page(ea >> 12), ea & 0xFFF)[0]
        if shift == granule or not desc & 2:
            return bool(desc & AF)
        if desc & 0xFFC:
            return False
        base = output_address(desc, granule)
    return False


def _check(cache: CachedPhysicalMemory, root: int, granule: int, va_bits: int) -> KernelTables | None:
    """The candidate ``root`` as KernelTables if it maps its own page in both halves of its region."""
    tcr = linux_tcr(granule, va_bits)
    try:
        walker = Aarch64Walker(tcr, root, cache)
    except TranslationError:
        return None
    bottom = (1 << 64) - (1 << va_bits)
    middle = bottom + (1 << (va_bits - 1))
    frame = root & ~0xFFF
    hits = []
    for lo, hi in ((bottom, middle), (middle, 1 << 64)):
        try:
            hit = next((m.vaddr + (frame - m.paddr) for m in walker.mappings(None, start=lo, end=hi, max_tables=4096)
                        if m.paddr <= frame < m.paddr + m.size and _linux_path(cache, root, m.vaddr, granule, va_bits)),
                       None)
        except GuestDataError:
            return None
        if hit is None:
            return None
        hits.append(hit)
    return KernelTables(ttbr1=root, tcr=tcr, granule=granule, va_bits=va_bits, vaddr=hits[1] + (root & 0xFFF))


def complete_registers(phys, registers: Iterable[object]) -> tuple[tuple[object, ...], KernelTables | None]:
    """``registers`` with TTBR1_EL1/TCR_EL1 filled in by a scan where an aarch64 vCPU lacks them.

    x86 registers, and aarch64 ones that have both (a live gdbstub), pass unchanged and no scan runs.

    Raises:
        SymbolError: an aarch64 vCPU lacks them and the scan finds no kernel tables.
    """
    registers = tuple(registers)
    if not any(getattr(r, "arch", None) == "aarch64" and (r.ttbr1_el1 is None or r.tcr_el1 is None)
               for r in registers):
        return registers, None
    found = find_kernel_tables(phys)
    return tuple(found.registers(r) if getattr(r, "arch", None) == "aarch64" else r for r in registers), found
