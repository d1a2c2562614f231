"""Builds AArch64 stage-1 page tables in a bytearray, for tests of the AArch64 walker."""

from __future__ import annotations

import struct

from vmwatch.memory.aarch64 import Region, plan

TG0_ENCODING = {12: 0, 16: 1, 14: 2}
TG1_ENCODING = {14: 1, 12: 2, 16: 3}


def tcr_for(granule: int, va_bits: int, *, tbi: bool = False) -> int:
    """A TCR_EL1 with the same granule and width in both halves."""
    sz = 64 - va_bits
    return sz | sz << 16 | TG0_ENCODING[granule] << 14 | TG1_ENCODING[granule] << 30 | (tbi * 3) << 37


class Aarch64Tables:
    """Page tables for one granule and VA width, allocated one granule at a time from ``ram``."""

    def __init__(self, granule: int, va_bits: int, ram_size: int = 1 << 22) -> None:
        self.granule, self.va_bits = granule, va_bits
        self.ram = bytearray(ram_size)
        self._next = 0
        self.ttbr0 = self.alloc()
        self.ttbr1 = self.alloc()
        self.tcr = tcr_for(granule, va_bits)
        self.levels = plan(Region(granule, va_bits, False))

    def alloc(self) -> int:
        """A zeroed table (or data page) of one granule."""
        addr = self._next
        self._next += 1 << self.granule
        if self._next > len(self.ram):
            raise MemoryError("fake RAM is full")
        return addr

    def set(self, paddr: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, paddr, value)

    def get(self, paddr: int) -> int:
        return struct.unpack_from("<Q", self.ram, paddr)[0]

    def descriptor_address(self, vaddr: int, level: int) -> int:
        """Physical address of the level-``level`` descriptor on ``vaddr``'s walk (tables must exist)."""
        base = self.ttbr1 if vaddr >> 55 & 1 else self.ttbr0
        for shift, imask, lvl, _block in self.levels:
            ea = base + ((vaddr >> shift) & imask) * 8
            if lvl == level:
                return ea
            base = self.get(ea) & 0x0000_FFFF_FFFF_F000 & ~((1 << self.granule) - 1)
        raise ValueError(f"level {level} is not in this layout")

    def map(self, vaddr: int, paddr: int, *, level: int = 3, attrs: int = 0, tables: int = 0) -> None:
        """Map ``vaddr`` to ``paddr`` with a page (level 3) or a block at ``level``.

        ``attrs`` are ORed into the leaf, ``tables`` into every table descriptor created.
        """
        base = self.ttbr1 if vaddr >> 55 & 1 else self.ttbr0
        for shift, imask, lvl, _block in self.levels:
            ea = base + ((vaddr >> shift) & imask) * 8
            if lvl == level:
                self.set(ea, paddr | attrs | (3 if lvl == 3 else 1) | 1 << 10)
                return
            desc = self.get(ea)
            if not desc & 1:
                desc = self.alloc() | 3 | tables
                self.set(ea, desc)
            base = desc & 0x0000_FFFF_FFFF_F000 & ~((1 << self.granule) - 1)
        raise ValueError(f"level {level} is not in this layout")

