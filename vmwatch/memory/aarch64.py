"""AArch64 stage-1 translation: 4/16/64 KiB granules, 39..52-bit VA, TTBR0/TTBR1 split.

Theory of operation (Arm ARM DDI 0487, chapter D8 "The AArch64 Virtual Memory System
Architecture": D8.1 address translation, D8.2 translation tables and granules, D8.3
descriptors, D8.4 memory access permissions): bit 55 of a virtual address selects the region,
TTBR0_EL1 (user, bit 55 clear) or TTBR1_EL1 (kernel, bit 55 set). Each region is
``64 - TnSZ`` bits wide (TCR_EL1.T0SZ bits 5:0, T1SZ bits 21:16); the address bits above it
must equal bit 55 unless TCR_EL1.TBI0/TBI1 (bits 37/38) say the top byte is a tag. A granule
of ``1 << g`` bytes (g = 12, 14, 16; TG0 bits 15:14 encode 4K=0, 64K=1, 16K=2 while TG1 bits
31:30 encode 16K=1, 4K=2, 64K=3) gives tables of ``1 << (g - 3)`` 8-byte descriptors, so a
level resolves ``g - 3`` bits and the top level whatever is left. Descriptor bits 1:0: x0 is
invalid, 01 is a block (only at levels where the granule allows one) and 11 is a table, or a
page at the last level. Output addresses are bits 47:g; with the 64 KiB granule bits 15:12
carry OA bits 51:48 (FEAT_LPA). FEAT_LPA2 (52-bit VA with 4/16 KiB, level -1) is not modelled.

Rights (D8.4): AP[2] (bit 7) makes a page read-only, AP[1] (bit 6) opens it to EL0, UXN
(54) and PXN (53) forbid execution at EL0/EL1; table descriptors restrict everything below
them with APTable (62:61), UXNTable (60) and PXNTable (59). The contiguous bit (52) is a TLB
hint only: translation is the same without it, so it is reported but not used.

``translate(vaddr, ttbr0)`` takes the user root as the x86 walker takes CR3 (a process's
page-table root); TTBR1 and TCR are fixed at construction, as they are for a running kernel.
A walk has at most four steps, so a hostile table cannot make it loop.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.errors import PageNotPresent, PhysicalReadError, TranslationError
from vmwatch.memory.paging import Mapping
from vmwatch.memory.physical import CachedPhysicalMemory

TG0 = {0: 12, 1: 16, 2: 14}
TG1 = {1: 14, 2: 12, 3: 16}
AP_RO = 1 << 7
AP_EL0 = 1 << 6
CONTIGUOUS = 1 << 52
PXN = 1 << 53
UXN = 1 << 54
PXNTABLE = 1 << 59
UXNTABLE = 1 << 60
APTABLE_NO_EL0 = 1 << 61
APTABLE_RO = 1 << 62
OA_MASK = 0x0000_FFFF_FFFF_F000
TTBR_BADDR = 0x0000_FFFF_FFFF_FFFE  # ASID in 63:48, CnP in bit 0
# Levels (0..3, 3 last) at which a block descriptor is allowed, per granule shift (no LPA2).
BLOCK_LEVELS = {12: frozenset((1, 2)), 14: frozenset((2,)), 16: frozenset((1, 2))}
_unpack = struct.Struct("<Q").unpack_from


@attrs.frozen
class Region:
    """One half of the translation regime: its granule and width."""

    granule: int
    """log2 of the granule (12, 14 or 16)."""
    va_bits: int
    """64 - TnSZ."""
    tbi: bool
    """Top byte ignored (a tag) for addresses in this half."""


@attrs.frozen
class ArmMapping(Mapping):
    """A Mapping with the AArch64 bits x86 has no names for (``nx``: not executable at the
    privilege that owns the page, EL0 for user pages, EL1 otherwise)."""

    pxn: bool
    uxn: bool
    contiguous: bool


def tcr_regions(tcr: int) -> tuple[Region, Region]:
    """TTBR0's and TTBR1's regions as TCR_EL1 describes them.

    Raises:
        TranslationError: a reserved granule encoding or a size outside 16..52 bits.
    """
    regions = []
    for sz_shift, tg_shift, table, tbi_bit in ((0, 14, TG0, 37), (16, 30, TG1, 38)):
        tg = (tcr >> tg_shift) & 3
        if tg not in table:
            raise TranslationError(0, tcr, f"TCR_EL1 {tcr:#x}: reserved granule encoding {tg} at bit {tg_shift}")
        bits = 64 - ((tcr >> sz_shift) & 0x3F)
        if not 16 <= bits <= 52 or (bits > 48 and table[tg] != 16):
            raise TranslationError(0, tcr, f"TCR_EL1 {tcr:#x}: {bits}-bit region is not supported")
        regions.append(Region(table[tg], bits, bool(tcr >> tbi_bit & 1)))
    return regions[0], regions[1]


def strip_pac(vaddr: int, va_bits: int) -> int:
    """``vaddr`` with the pointer-authentication and tag bits above ``va_bits`` set to bit 55."""
    low = vaddr & ((1 << va_bits) - 1)
    return low | (((1 << 64) - 1) ^ ((1 << va_bits) - 1)) if vaddr >> 55 & 1 else low


def plan(region: Region) -> tuple[tuple[int, int, int, bool], ...]:
    """The walk of ``region``, top level first: (shift, index mask, Arm level, block allowed)."""
    g, stride = region.granule, region.granule - 3
    count = -(-(region.va_bits - g) // stride)
    steps = []
    for i in range(count):
        shift = g + (count - 1 - i) * stride
        level = 4 - count + i
        steps.append((shift, (1 << min(stride, region.va_bits - shift)) - 1, level, level in BLOCK_LEVELS[g]))
    return tuple(steps)


class Aarch64Walker:
    """Walks AArch64 stage-1 tables for one TCR_EL1 and TTBR1_EL1.

    Args:
        tcr: TCR_EL1.
        ttbr1: TTBR1_EL1 (the kernel half's root).
        phys: the page cache the tables are read through.
    """

    def __init__(self, tcr: int, ttbr1: int, phys: CachedPhysicalMemory) -> None:
        self.tcr = tcr
        self.ttbr1 = ttbr1
        self.regions = tcr_regions(tcr)
        self._pages_get = phys._pages.get
        self._entry_miss = phys.entry
        self._steps = tuple(plan(r) for r in self.regions)

    def _select(self, vaddr: int, ttbr0: int) -> tuple[int, int, Region]:
        """Half, root and region of ``vaddr``; TranslationError when it is in neither half."""
        if vaddr < 0 or vaddr >> 64:
            raise TranslationError(vaddr, ttbr0, f"{vaddr:#x} is not a 64-bit address")
        half = vaddr >> 55 & 1
        region = self.regions[half]
        width = (56 if region.tbi else 64) - region.va_bits
        top = (vaddr >> region.va_bits) & ((1 << width) - 1)
        if top != (((1 << width) - 1) if half else 0):
            raise TranslationError(vaddr, ttbr0, f"{vaddr:#x} is outside the {region.va_bits}-bit TTBR{half} region")
        return half, (self.ttbr1 if half else ttbr0) & TTBR_BADDR, region

    def _walk(self, vaddr: int, ttbr0: int) -> tuple[int, int, int, int]:
        """(physical address, leaf descriptor, OR of the table descriptors, leaf size)."""
        half, base, region = self._select(vaddr, ttbr0)
        g = region.granule
        steps = self._steps[half]
        last = len(steps) - 1
        oa_mask = OA_MASK & ~((1 << g) - 1)
        table_bits = 0
        for depth, (shift, imask, level, block) in enumerate(steps):
            ea = (base & ~7) + ((vaddr >> shift) & imask) * 8
            try:
                table = self._pages_get(ea >> 12)
                if table is None:
                    table, off = self._entry_miss(ea, 8)
                else:
                    off = ea & 0xFFF
            except PhysicalReadError:
                raise TranslationError(
                    vaddr, ttbr0, f"cannot translate {vaddr:#x}: level {level} descriptor at physical "
                    f"{ea:#x} is outside physical memory", level=level,
                ) from None
            desc = _unpack(table, off)[0]
            if not desc & 1:
                raise PageNotPresent(vaddr, ttbr0, level=level, entry=desc, invalid_bits=shift)
            oa = desc & oa_mask
            if g == 16:
                oa |= (desc >> 12 & 0xF) << 48
            if depth == last or not desc & 2:
                if not desc & 2 and (depth == last or not block):
                    raise TranslationError(
                        vaddr, ttbr0, f"cannot translate {vaddr:#x}: reserved block descriptor {desc:#x} "
                        f"at level {level}", level=level, entry=desc,
                    )
                size = 1 << shift
                return (oa & ~(size - 1)) | (vaddr & (size - 1)), desc, table_bits, size
            table_bits |= desc
            base = oa
        raise AssertionError("a walk always ends at its last level")

    def translate(self, vaddr: int, ttbr0: int) -> int:
        """The physical address of ``vaddr`` (PageNotPresent / TranslationError otherwise)."""
        return self._walk(vaddr, ttbr0)[0]

    def lookup(self, vaddr: int, ttbr0: int) -> ArmMapping:
        """The leaf mapping holding ``vaddr`` and its effective rights."""
        paddr, desc, tables, size = self._walk(vaddr, ttbr0)
        user = bool(desc & AP_EL0) and not tables & APTABLE_NO_EL0
        pxn = bool(desc & PXN or tables & PXNTABLE)
        uxn = bool(desc & UXN or tables & UXNTABLE)
        start = vaddr & ~(size - 1)
        return ArmMapping(
            start, paddr - (vaddr - start), size,
            writable=not (desc & AP_RO or tables & APTABLE_RO), user=user, nx=uxn if user else pxn,
            pxn=pxn, uxn=uxn, contiguous=bool(desc & CONTIGUOUS),
        )
