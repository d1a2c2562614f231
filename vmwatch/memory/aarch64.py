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
As x86's, ``translate`` is generated straight-line code (one block per level, constants as
literals); ``lookup`` and ``mappings`` walk the same plan in loops. A walk has at most four
steps, so a hostile table cannot make it loop; ``mappings`` skips tables already on the path
and caps the tables it reads.
"""

from __future__ import annotations

import struct
from typing import Iterator

import attrs

from vmwatch.errors import GuestDataError, PageNotPresent, PhysicalReadError, TranslationError
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

    Raises:
        TranslationError: TCR_EL1 has a reserved granule or an unsupported region size.
    """

    def __init__(self, tcr: int, ttbr1: int, phys: CachedPhysicalMemory) -> None:
        self.tcr = tcr
        self.ttbr1 = ttbr1
        self.regions = tcr_regions(tcr)
        self._page = phys.page
        self._pages_get = phys._pages.get
        self._entry_miss = phys.entry
        self._steps = tuple(plan(r) for r in self.regions)
        self.source = self._compile()
        namespace = {
            "pages_get": self._pages_get, "entry_miss": self._entry_miss, "unpack": _unpack,
            "PageNotPresent": PageNotPresent, "PhysicalReadError": PhysicalReadError,
            "region_error": self._region_error, "reserved_error": _reserved, "outside_error": _outside,
        }
        exec(compile(self.source, f"<vmwatch aarch64 walk: tcr {tcr:#x}>", "exec"), namespace)
        self.translate = namespace["translate"]

    def _top_test(self, half: int) -> str:
        """A Python condition true when ``vaddr`` (whose bit 55 is ``half``) is outside the region."""
        region = self.regions[half]
        bits = region.va_bits
        if region.tbi:
            mask = (1 << (56 - bits)) - 1
            return f"(vaddr >> {bits}) & {mask:#x} != {mask if half else 0:#x} or vaddr >> 64 or vaddr < 0"
        return f"vaddr >> {bits} != {(1 << (64 - bits)) - 1 if half else 0:#x}"

    def _region_error(self, vaddr: int, ttbr0: int) -> TranslationError:
        if vaddr < 0 or vaddr >> 64:
            return TranslationError(vaddr, ttbr0, f"{vaddr:#x} is not a 64-bit address")
        half = vaddr >> 55 & 1
        bits = self.regions[half].va_bits
        return TranslationError(vaddr, ttbr0, f"{vaddr:#x} is outside the {bits}-bit TTBR{half} region")

    def _compile(self) -> str:
        """Generate the walk of both halves as straight-line code, every shift and mask a literal."""
        lines = ["def translate(vaddr, ttbr0):", "    level = 0", "    root = ttbr0", "    try:"]
        for half in (1, 0):
            g = self.regions[half].granule
            oa = OA_MASK & ~((1 << g) - 1)
            high = " | (desc >> 12 & 0xF) << 48" if g == 16 else ""
            lines += [
                "        if vaddr >> 55 & 1:" if half else "        else:",
                f"            if {self._top_test(half)}:",
                "                raise region_error(vaddr, ttbr0)",
                # Errors name the root walked: TTBR1 for the kernel half, whatever TTBR0 was given.
                f"            root = {self.ttbr1:#x}" if half else "            root = ttbr0",
                f"            base = root & {TTBR_BADDR & ~7:#x}",
            ]
            steps = self._steps[half]
            for depth, (shift, imask, level, block) in enumerate(steps):
                last = depth == len(steps) - 1
                lines += [
                    f"            level = {level}",
                    f"            ea = base + ((vaddr >> {shift - 3}) & {imask << 3:#x})",
                    "            table = pages_get(ea >> 12)",
                    "            if table is None:",
                    "                table, off = entry_miss(ea, 8)",
                    "            else:",
                    "                off = ea & 0xFFF",
                    "            desc = unpack(table, off)[0]",
                    "            if not desc & 1:",
                    f"                raise PageNotPresent(vaddr, root, level={level}, entry=desc, invalid_bits={shift})",
                    "            if not desc & 2:",
                ]
                if block and not last:
                    size = 1 << shift
                    lines.append(f"                return (desc & {oa & ~(size - 1):#x}){high} | (vaddr & {size - 1:#x})")
                else:
                    lines.append(f"                raise reserved_error(vaddr, root, {level}, desc)")
                if last:
                    lines.append(f"            return (desc & {oa:#x}){high} | (vaddr & {(1 << g) - 1:#x})")
                else:
                    lines.append(f"            base = (desc & {oa:#x}){high}")
        lines += ["    except PhysicalReadError:", "        raise outside_error(vaddr, root, level, ea) from None"]
        return "\n".join(lines) + "\n"

    def _walk(self, vaddr: int, ttbr0: int) -> tuple[int, int, int, int]:
        """(physical address, leaf descriptor, OR of the table descriptors, leaf size).

        Only called after ``translate`` succeeded, so every descriptor on the way is valid.
        """
        paddr = self.translate(vaddr, ttbr0)
        half = vaddr >> 55 & 1
        g = self.regions[half].granule
        base = (self.ttbr1 if half else ttbr0) & TTBR_BADDR & ~7
        table_bits = 0
        for shift, imask, _level, _block in self._steps[half]:
            ea = base + ((vaddr >> shift) & imask) * 8
            desc = _unpack(self._page(ea >> 12), ea & 0xFFF)[0]
            if shift == g or not desc & 2:
                return paddr, desc, table_bits, 1 << shift
            table_bits |= desc
            base = output_address(desc, g)
        raise AssertionError("a walk always ends at its last level")

    def lookup(self, vaddr: int, ttbr0: int) -> ArmMapping:
        """The leaf mapping holding ``vaddr`` and its effective rights (slower than translate)."""
        paddr, desc, tables, size = self._walk(vaddr, ttbr0)
        start = vaddr & ~(size - 1)
        return _mapping(start, paddr - (vaddr - start), size, desc, tables)

    def mappings(
        self, ttbr0: int | None, *, start: int = 0, end: int | None = None, max_tables: int = 1 << 16
    ) -> Iterator[ArmMapping]:
        """Every valid leaf with ``start <= vaddr < end``, in address order: the TTBR0 half (if
        ``ttbr0`` is given), then the TTBR1 half.

        Descriptors pointing at a table on the current path and tables outside physical memory
        are skipped; reserved descriptors are skipped.

        Raises:
            GuestDataError: more than ``max_tables`` tables would have to be read.
        """
        hi_end = 1 << 64 if end is None else min(end, 1 << 64)
        budget = [max_tables]

        def expand(steps, depth, base, va_base, tables, path, g):
            budget[0] -= 1
            if budget[0] < 0:
                raise GuestDataError(f"page tables at ttbr {base:#x} need more than {max_tables} tables to "
                                     "enumerate (aliased or looping tables)")
            shift, imask, _level, block = steps[depth]
            span = 1 << shift
            try:
                raw = self._read_table(base, (imask + 1) * 8)
            except PhysicalReadError:
                return
            first = (start - va_base) >> shift if start > va_base else 0
            last = min(imask + 1, -(-(hi_end - va_base) // span))
            for index in range(max(first, 0), last):
                desc = _unpack(raw, index * 8)[0]
                if not desc & 1:
                    continue
                va = va_base + index * span
                if depth == len(steps) - 1 or not desc & 2:
                    if desc & 2 or (block and depth < len(steps) - 1):
                        yield _mapping(va, output_address(desc, g) & ~(span - 1), span, desc, tables)
                    continue
                child = output_address(desc, g)
                if child not in path:
                    yield from expand(steps, depth + 1, child, va, tables | desc, path | {child}, g)

        for half, root in ((0, ttbr0), (1, self.ttbr1)):
            if root is None:
                continue
            region = self.regions[half]
            va_base = (1 << 64) - (1 << region.va_bits) if half else 0
            if va_base + (1 << region.va_bits) <= start or va_base >= hi_end:
                continue
            base = root & TTBR_BADDR & ~7
            yield from expand(self._steps[half], 0, base, va_base, 0, frozenset((base,)), region.granule)

    def _read_table(self, base: int, size: int) -> bytes:
        """``size`` bytes of table at physical ``base``, page by page through the page cache."""
        out = bytearray()
        pos = base
        while len(out) < size:
            off = pos & 0xFFF
            step = min(size - len(out), 0x1000 - off)
            out += self._page(pos >> 12)[off : off + step]
            pos += step
        return bytes(out)


def output_address(desc: int, granule: int) -> int:
    """The output address of a table or page descriptor (bits 47:granule, 51:48 for 64 KiB)."""
    oa = desc & OA_MASK & ~((1 << granule) - 1)
    return oa | (desc >> 12 & 0xF) << 48 if granule == 16 else oa


def _mapping(vaddr: int, paddr: int, size: int, desc: int, tables: int) -> ArmMapping:
    """The leaf ``desc`` under table descriptors ORed into ``tables``, with its effective rights."""
    user = bool(desc & AP_EL0) and not tables & APTABLE_NO_EL0
    pxn = bool(desc & PXN or tables & PXNTABLE)
    uxn = bool(desc & UXN or tables & UXNTABLE)
    return ArmMapping(
        vaddr, paddr, size, writable=not (desc & AP_RO or tables & APTABLE_RO), user=user,
        nx=uxn if user else pxn, pxn=pxn, uxn=uxn, contiguous=bool(desc & CONTIGUOUS),
    )


def _reserved(vaddr: int, ttbr0: int, level: int, desc: int) -> TranslationError:
    return TranslationError(vaddr, ttbr0, f"cannot translate {vaddr:#x}: reserved block descriptor {desc:#x} "
                            f"at level {level}", level=level, entry=desc)


def _outside(vaddr: int, ttbr0: int, level: int, ea: int) -> TranslationError:
    return TranslationError(vaddr, ttbr0, f"cannot translate {vaddr:#x}: level {level} descriptor at physical "
                            f"{ea:#x} is outside physical memory", level=level)
