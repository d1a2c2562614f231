"""x86 paging: every mode described as data, compiled once into a walker.

Theory of operation (Intel SDM vol. 3A, chapter 4 "Paging"): a linear address is split into
table indexes and a page offset. Each mode is a list of levels, top first; level *i* indexes
``bits`` address bits starting at ``shift``. An entry with bit 0 clear stops the walk (the
whole ``1 << shift`` region is absent); an entry with the PS bit (7) set at a level that allows
large pages maps ``1 << shift`` bytes directly; otherwise bits 12..51 name the next table.

==========  =====  ===========================  ===================
mode        entry  address split (bits)         large pages
==========  =====  ===========================  ===================
32-bit      4      10 10 12                     4 MiB (CR4.PSE)
PAE         8      2 9 9 12                     2 MiB
4-level     8      9 9 9 9 12                   1 GiB, 2 MiB
5-level     8      9 9 9 9 9 12                 1 GiB, 2 MiB
==========  =====  ===========================  ===================

:class:`Walker` turns a :class:`PagingSpec` into tuples of shifts and masks at construction so
a walk is a few shifts, dict lookups and ``unpack_from`` calls: no objects per entry. Walks
have at most five steps, so a hostile table cannot make ``translate`` loop; enumeration
(:meth:`Walker.mappings`) skips entries that point back to a table on the current path and
caps the number of tables it expands.
"""

from __future__ import annotations

import struct
from typing import Iterator

import attrs

from vmwatch.cpu import CR4_PSE, PagingMode
from vmwatch.errors import GuestDataError, PageNotPresent, PhysicalReadError, TranslationError
from vmwatch.memory.physical import CachedPhysicalMemory

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PAGE_SIZE_BIT = 1 << 7
NX = 1 << 63
ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000  # bits 12..51 (MAXPHYADDR at most 52)
ADDR_MASK_32 = 0xFFFF_F000


@attrs.frozen
class Level:
    """One level of a paging structure hierarchy."""

    shift: int
    """Lowest linear-address bit this level indexes (= log2 of what one entry covers)."""
    bits: int
    """How many address bits index this level's table."""
    large: bool
    """Whether an entry here with PS set maps a page of ``1 << shift`` bytes."""
    reserved: int = 0
    """Entry bits that must be zero (checked for large pages and PAE PDPTEs)."""


@attrs.frozen
class PagingSpec:
    """A paging mode as data."""

    mode: PagingMode
    entry_size: int
    """Bytes per paging-structure entry (4 or 8)."""
    levels: tuple[Level, ...]
    """Top level first."""
    cr3_mask: int
    """Bits of CR3 that hold the top table's physical address."""
    addr_mask: int
    """Bits of an entry that hold the next table's (or 4 KiB page's) physical address."""
    va_bits: int
    """Linear address width; 64-bit modes require canonical (sign-extended) addresses."""
    canonical: bool


def _large_reserved(shift: int) -> int:
    # Bit 12 is PAT in a large-page entry; bits 13..shift-1 must be zero.
    return ((1 << shift) - 1) & ~0x1FFF


SPECS: dict[PagingMode, PagingSpec] = {
    PagingMode.BITS32: PagingSpec(
        mode=PagingMode.BITS32, entry_size=4, cr3_mask=ADDR_MASK_32, addr_mask=ADDR_MASK_32,
        va_bits=32, canonical=False,
        # PSE-36: bits 13..20 of a 4 MiB entry are physical address bits 32..39; bit 21 is reserved.
        levels=(Level(22, 10, True, reserved=1 << 21), Level(12, 10, False)),
    ),
    PagingMode.PAE: PagingSpec(
        mode=PagingMode.PAE, entry_size=8, cr3_mask=0xFFFF_FFE0, addr_mask=ADDR_MASK_64,
        va_bits=32, canonical=False,
        levels=(
            # PDPTE bits 2:1 are reserved. The SDM reserves 8:5 too, but QEMU's TCG sets the
            # accessed bit (5) in them and ignores 8:5, and Linux guests run fine with it.
            Level(30, 2, False, reserved=0x6),
            Level(21, 9, True, reserved=_large_reserved(21)),
            Level(12, 9, False),
        ),
    ),
    PagingMode.LEVEL4: PagingSpec(
        mode=PagingMode.LEVEL4, entry_size=8, cr3_mask=ADDR_MASK_64, addr_mask=ADDR_MASK_64,
        va_bits=48, canonical=True,
        levels=(
            Level(39, 9, False),
            Level(30, 9, True, reserved=_large_reserved(30)),
            Level(21, 9, True, reserved=_large_reserved(21)),
            Level(12, 9, False),
        ),
    ),
    PagingMode.LEVEL5: PagingSpec(
        mode=PagingMode.LEVEL5, entry_size=8, cr3_mask=ADDR_MASK_64, addr_mask=ADDR_MASK_64,
        va_bits=57, canonical=True,
        levels=(
            Level(48, 9, False),
            Level(39, 9, False),
            Level(30, 9, True, reserved=_large_reserved(30)),
            Level(21, 9, True, reserved=_large_reserved(21)),
            Level(12, 9, False),
        ),
    ),
}


def spec_for(mode: PagingMode, *, pse: bool = True) -> PagingSpec | None:
    """The spec of ``mode`` (``None`` for no paging); ``pse=False`` forbids 32-bit 4 MiB pages."""
    if mode is PagingMode.NONE:
        return None
    spec = SPECS[mode]
    if mode is PagingMode.BITS32 and not pse:
        spec = attrs.evolve(spec, levels=(attrs.evolve(spec.levels[0], large=False, reserved=0), spec.levels[1]))
    return spec


def spec_from_registers(mode: PagingMode, cr4: int | None) -> PagingSpec | None:
    """The spec the control registers select (CR4.PSE matters only to 32-bit paging)."""
    return spec_for(mode, pse=cr4 is None or bool(cr4 & CR4_PSE))


@attrs.frozen
class Mapping:
    """One leaf of an address space: a page of ``size`` bytes and its effective rights."""

    vaddr: int
    paddr: int
    size: int
    writable: bool
    """RW set at every level."""
    user: bool
    """US set at every level."""
    nx: bool
    """XD set at any level (always False in 32-bit paging)."""


class Walker:
    """Translates linear addresses by walking one mode's page tables.

    ``walker.translate(vaddr, cr3) -> int`` is generated at construction (see :meth:`_compile`;
    the code is kept in ``walker.source``). It raises PageNotPresent when an entry on the walk
    is not present, and TranslationError when the address is not canonical, an entry has
    reserved bits set, or a table lies outside physical memory.

    Args:
        spec: the paging mode.
        phys: the page cache tables are read through. A walk probes its page dict inline (a
            cached table costs one dict lookup, no call) and asks ``phys.entry`` on a miss.
    """

    def __init__(self, spec: PagingSpec, phys: CachedPhysicalMemory) -> None:
        self.spec = spec
        self._page = phys.page
        self._pages_get = phys._pages.get
        self._entry_miss = phys.entry
        esize = spec.entry_size
        eshift = esize.bit_length() - 1
        self._entry = struct.Struct("<Q" if esize == 8 else "<I").unpack_from
        # Per level: (right shift giving the entry's byte offset, index mask in bytes, level
        # number counted from the leaf = 1, large-page frame mask or 0, reserved bits, shift).
        steps = []
        for depth, level in enumerate(spec.levels):
            large = 0
            if level.large:
                large = spec.addr_mask & ~((1 << level.shift) - 1)
            steps.append((
                level.shift - eshift,
                ((1 << level.bits) - 1) << eshift,
                len(spec.levels) - depth,
                large,
                level.reserved,
                level.shift,
            ))
        self._steps = tuple(steps)
        self._cr3_mask = spec.cr3_mask
        self._addr_mask = spec.addr_mask
        self._va_mask = (1 << spec.va_bits) - 1
        # vaddr >> _sign_shift must be one of _good_tops: 0 (or all ones for the upper half of
        # a canonical space). Negative and over-wide addresses fail the same single test.
        if spec.canonical:
            self._sign_shift = spec.va_bits - 1
            self._good_tops = (0, (1 << (65 - spec.va_bits)) - 1)
        else:
            self._sign_shift = spec.va_bits
            self._good_tops = (0,)
        self._pse36 = spec.mode is PagingMode.BITS32
        self.source = self._compile()
        namespace = {
            "check_address": self.check_address, "pages_get": self._pages_get, "entry_miss": self._entry_miss,
            "unpack": self._entry, "PageNotPresent": PageNotPresent, "PhysicalReadError": PhysicalReadError,
            "reserved_error": self._reserved, "outside_error": self._outside,
        }
        exec(compile(self.source, f"<vmwatch paging walk: {spec.mode.value}>", "exec"), namespace)
        self.translate = namespace["translate"]

    def check_address(self, vaddr: int, cr3: int) -> None:
        """Raise TranslationError unless ``vaddr`` is a valid (canonical) linear address."""
        if vaddr >> self._sign_shift not in self._good_tops:
            if vaddr < 0 or vaddr >> 64:
                raise TranslationError(vaddr, cr3, f"{vaddr:#x} is not a 64-bit address")
            if self.spec.canonical:
                raise TranslationError(vaddr, cr3, f"{vaddr:#x} is not canonical for {self.spec.mode.value} paging")
            raise TranslationError(vaddr, cr3, f"{vaddr:#x} is wider than {self.spec.va_bits} bits")

    def _compile(self) -> str:
        """Generate this mode's walk as straight-line code: one block per level with every
        shift, mask and level number a literal (no loop, no tuple unpacking per level).

        Each block reads the entry through the page cache dict (one lookup when the table is
        cached, ``entry()`` otherwise), stops on a clear present bit, returns on a large page,
        and checks the reserved bits the SDM (and QEMU) check.
        """
        spec = self.spec
        lines = [
            "def translate(vaddr, cr3):",
            f"    if vaddr >> {self._sign_shift} not in {self._good_tops!r}:",
            "        check_address(vaddr, cr3)",
            f"    base = cr3 & {self._cr3_mask:#x}",
            "    level = 0",
            "    try:",
        ]
        last = len(self._steps) - 1
        for depth, (rshift, imask, level, large, reserved, shift) in enumerate(self._steps):
            lines += [
                f"        level = {level}",
                f"        ea = base + ((vaddr >> {rshift}) & {imask:#x})",
                "        table = pages_get(ea >> 12)",
                "        if table is None:",
                f"            table, off = entry_miss(ea, {spec.entry_size})",
                "        else:",
                "            off = ea & 0xFFF",
                "        entry = unpack(table, off)[0]",
                "        if not entry & 1:",
                f"            raise PageNotPresent(vaddr, cr3, level={level}, entry=entry, invalid_bits={shift})",
            ]
            if large:
                high = " | ((entry >> 13) & 0xFF) << 32" if self._pse36 else ""
                lines += [
                    "        if entry & 0x80:",
                    f"            if entry & {reserved:#x}:",
                    f"                raise reserved_error(vaddr, cr3, {level}, entry, {reserved:#x})",
                    f"            return (entry & {large:#x}){high} | (vaddr & {(1 << shift) - 1:#x})",
                ]
            elif reserved:
                lines += [
                    f"        if entry & {reserved:#x}:",
                    f"            raise reserved_error(vaddr, cr3, {level}, entry, {reserved:#x})",
                ]
            if depth < last:
                lines.append(f"        base = entry & {self._addr_mask:#x}")
        lines += [
            "    except PhysicalReadError:",
            "        raise outside_error(vaddr, cr3, level, ea) from None",
            f"    return (entry & {self._addr_mask:#x}) | (vaddr & 0xFFF)",
        ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _outside(vaddr: int, cr3: int, level: int, ea: int) -> TranslationError:
        return TranslationError(
            vaddr, cr3,
            f"cannot translate {vaddr:#x} (cr3 {cr3:#x}): level {level} table entry at "
            f"physical {ea:#x} is outside physical memory",
            level=level,
        )

    @staticmethod
    def _reserved(vaddr: int, cr3: int, level: int, entry: int, reserved: int) -> TranslationError:
        return TranslationError(
            vaddr, cr3,
            f"cannot translate {vaddr:#x} (cr3 {cr3:#x}): reserved bits {entry & reserved:#x} "
            f"set in level {level} entry {entry:#x}",
            level=level, entry=entry,
        )

    def lookup(self, vaddr: int, cr3: int) -> Mapping:
        """The leaf mapping that holds ``vaddr``, with its effective rights (slower than translate)."""
        paddr = self.translate(vaddr, cr3)
        # Walk again to collect rights; translate() has validated every entry on the way.
        page, unpack = self._page, self._entry
        base = cr3 & self._cr3_mask
        writable = user = True
        nx = False
        size = 0x1000
        pae_top = self.spec.mode is PagingMode.PAE
        for depth, (rshift, imask, level, large, reserved, shift) in enumerate(self._steps):
            ea = base + ((vaddr >> rshift) & imask)
            entry = unpack(page(ea >> 12), ea & 0xFFF)[0]
            if not (pae_top and depth == 0):  # PAE PDPTEs carry no rights
                writable = writable and bool(entry & WRITABLE)
                user = user and bool(entry & USER)
                nx = nx or bool(entry & NX and self.spec.entry_size == 8)
            if large and entry & PAGE_SIZE_BIT:
                size = 1 << shift
                break
            base = entry & self._addr_mask
        start = vaddr & ~(size - 1)
        return Mapping(start, paddr - (vaddr - start), size, writable, user, nx)

    def mappings(
        self, cr3: int, *, start: int = 0, end: int | None = None, max_tables: int = 1 << 16
    ) -> Iterator[Mapping]:
        """Every present leaf mapping with ``start <= vaddr < end``, in address order.

        Entries pointing at a table on the current walk (self-maps, loops) are skipped, and so
        are tables outside physical memory; empty and non-present regions cost one entry each.

        Raises:
            GuestDataError: more than ``max_tables`` tables would have to be read (a hostile
                table that points many entries at the same lower tables).
        """
        spec = self.spec
        lin_mask = self._va_mask
        lo = max(start, 0) & lin_mask if spec.canonical else min(max(start, 0), lin_mask + 1)
        if end is None or end >> 64:
            hi = lin_mask + 1
        else:
            hi = end & lin_mask if spec.canonical else min(end, lin_mask + 1)
        if lo >= hi:
            return
        esize = spec.entry_size
        tables = {lv.bits: struct.Struct(f"<{1 << lv.bits}{'Q' if esize == 8 else 'I'}").unpack for lv in spec.levels}
        budget = [max_tables]
        sign_bit = 1 << (spec.va_bits - 1) if spec.canonical else 0
        sign_fill = ((1 << 64) - 1) ^ lin_mask if spec.canonical else 0
        steps = self._steps
        levels = spec.levels
        pae_top = spec.mode is PagingMode.PAE

        def expand(depth: int, base: int, va_base: int, rights: tuple[bool, bool, bool], path: frozenset[int]):
            level = levels[depth]
            budget[0] -= 1
            if budget[0] < 0:
                raise GuestDataError(
                    f"page tables at cr3 {cr3:#x} need more than {max_tables} tables to enumerate "
                    "(aliased or looping tables)"
                )
            count = 1 << level.bits
            try:
                raw = self._read_table(base, count * esize)
            except PhysicalReadError:
                return
            entries = tables[level.bits](raw)
            span = 1 << level.shift
            first = max(0, (lo - va_base) >> level.shift) if lo > va_base else 0
            last = min(count, -(-(hi - va_base) // span))
            large, reserved = steps[depth][3:5]
            for index in range(first, last):
                entry = entries[index]
                if not entry & PRESENT:
                    continue
                va = va_base + index * span
                if pae_top and depth == 0:
                    if entry & reserved:
                        continue
                    sub = rights
                else:
                    sub = (
                        rights[0] and bool(entry & WRITABLE),
                        rights[1] and bool(entry & USER),
                        rights[2] or (esize == 8 and bool(entry & NX)),
                    )
                is_leaf = depth == len(levels) - 1 or (large and entry & PAGE_SIZE_BIT)
                if is_leaf:
                    if large and entry & PAGE_SIZE_BIT:
                        if entry & reserved:
                            continue
                        paddr = entry & large
                        if self._pse36:
                            paddr |= ((entry >> 13) & 0xFF) << 32
                    else:
                        paddr = entry & self._addr_mask
                    vaddr = va | sign_fill if va & sign_bit else va
                    yield Mapping(vaddr, paddr, span, sub[0], sub[1], sub[2])
                    continue
                child = entry & self._addr_mask
                if child in path:
                    continue
                yield from expand(depth + 1, child, va, sub, path | {child})

        root = cr3 & self._cr3_mask
        yield from expand(0, root, 0, (True, True, False), frozenset((root,)))

    def _read_table(self, base: int, size: int) -> bytes:
        """``size`` bytes at physical ``base`` (a whole table, or the 32-byte PAE PDPT)."""
        off = base & 0xFFF
        if off + size <= 0x1000:
            return bytes(self._page(base >> 12)[off : off + size])
        raise PhysicalReadError(base, size, f"paging structure at {base:#x} crosses a page boundary")
