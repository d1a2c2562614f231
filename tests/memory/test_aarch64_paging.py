"""AArch64 stage-1 walks over tables the test writes: every granule x VA size, blocks, rights."""

from __future__ import annotations

import struct

import aarch64_reference as reference
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.cpu import PagingMode
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import GuestDataError, PageNotPresent, TranslationError, VmwatchError
from vmwatch.memory import BufferMemory, GuestMemory
from vmwatch.memory.aarch64 import (
    AP_EL0, AP_RO, APTABLE_RO, CONTIGUOUS, OA_MASK, PXN, UXN, Aarch64Walker, Region, plan, strip_pac, tcr_regions,
)
from vmwatch.memory.physical import CachedPhysicalMemory
from vmwatch.testing.aarch64tables import Aarch64Tables, tcr_for

LAYOUTS = [(g, va) for g in (12, 14, 16) for va in (39, 42, 47, 48)] + [(16, 52)]
BLOCK_LEVELS = {12: (1, 2), 14: (2,), 16: (1, 2)}


def walker(t: Aarch64Tables) -> Aarch64Walker:
    return Aarch64Walker(t.tcr, t.ttbr1, CachedPhysicalMemory(BufferMemory(t.ram)))


def kernel(va_bits: int, offset: int) -> int:
    return ((1 << 64) - (1 << va_bits)) + offset


@pytest.mark.parametrize(("granule", "va_bits"), LAYOUTS)
def test_pages_in_both_halves(granule: int, va_bits: int) -> None:
    """Pages at high indexes of both halves translate; the kernel half ignores the user root."""
    t = Aarch64Tables(granule, va_bits)
    size = 1 << granule
    user_page, kernel_page = t.alloc(), t.alloc()
    user_va = (1 << (va_bits - 1)) + 5 * size  # high indexes at every level
    kern_va = kernel(va_bits, 3 * size)
    t.map(user_va, user_page)
    t.map(kern_va, kernel_page)
    w = walker(t)
    assert w.translate(user_va + 0x123, t.ttbr0) == user_page + 0x123
    assert w.translate(kern_va + size - 1, t.ttbr0) == kernel_page + size - 1
    # The kernel half ignores the user root; the user half follows it.
    other = Aarch64Tables(granule, va_bits)
    assert w.translate(kern_va, other.ttbr0 + (1 << 60)) == kernel_page
    with pytest.raises(PageNotPresent):
        w.translate(user_va + size, t.ttbr0)


@pytest.mark.parametrize(("granule", "va_bits"), LAYOUTS)
def test_blocks_at_every_allowed_level(granule: int, va_bits: int) -> None:
    """A block at each level its granule allows maps its whole span; other levels have none."""
    t = Aarch64Tables(granule, va_bits, ram_size=1 << 22)
    for shift, _mask, level, block in plan(Region(granule, va_bits, False)):
        if level not in BLOCK_LEVELS[granule]:
            assert not block
            continue
        assert block
        va = kernel(va_bits, 1 << shift)  # index 1 at this level
        pa = 7 << shift
        t.map(va, pa, level=level)
        w = walker(t)
        assert w.translate(va + (1 << shift) - 8, t.ttbr0) == pa + (1 << shift) - 8
        assert w.lookup(va + 16, t.ttbr0).size == 1 << shift


def test_out_of_range_and_tbi() -> None:
    """Addresses outside both regions are refused; with TBI a tagged address translates; PAC bits strip."""
    t = Aarch64Tables(12, 39)
    page = t.alloc()
    t.map(0x1000, page)
    w = walker(t)
    for bad in (1 << 39, 0xFF00_0000_0000_1000, -1, 1 << 64, (1 << 63) | 0x1000):
        with pytest.raises(TranslationError):
            w.translate(bad, t.ttbr0)
    tagged = Aarch64Walker(tcr_for(12, 39, tbi=True), t.ttbr1, CachedPhysicalMemory(BufferMemory(t.ram)))
    assert tagged.translate(0x3C00_0000_0000_1008, t.ttbr0) == page + 8
    assert strip_pac(0x3C7F_0000_0000_1008, 39) == 0x1008
    assert strip_pac(0xBCFF_FFC0_1234_5678, 39) == 0xFFFF_FFC0_1234_5678


def test_rights() -> None:
    """AP, UXN and PXN give writable, user and nx as x86 names them; APTable limits what is below."""
    t = Aarch64Tables(12, 48)
    cases = {
        0x1000: (AP_EL0 | UXN, (True, True, True, False, True)),
        0x2000: (AP_EL0 | AP_RO | PXN, (False, True, False, True, False)),
        0x3000: (PXN | CONTIGUOUS, (True, False, True, True, False)),
    }
    for va, (bits, _) in cases.items():
        t.map(va, t.alloc(), attrs=bits)
    w = walker(t)
    for va, (_, (writable, user, nx, pxn, uxn)) in cases.items():
        m = w.lookup(va + 4, t.ttbr0)
        assert (m.writable, m.user, m.nx, m.pxn, m.uxn) == (writable, user, nx, pxn, uxn)
    assert w.lookup(0x3000, t.ttbr0).contiguous
    # APTable[1] in a table descriptor makes everything below read-only.
    t2 = Aarch64Tables(12, 48)
    t2.map(kernel(48, 0), t2.alloc(), tables=APTABLE_RO)
    assert not walker(t2).lookup(kernel(48, 0), t2.ttbr0).writable


def test_invalid_and_reserved_descriptors() -> None:
    """Invalid descriptors are PageNotPresent; reserved blocks and tables outside RAM are TranslationError."""
    t = Aarch64Tables(12, 48)
    t.map(0x1000, t.alloc())
    leaf = t.descriptor_address(0x1000, 3)
    assert t.get(leaf) & 3 == 3
    t.set(leaf, t.get(leaf) & ~2)  # a block descriptor at level 3 is reserved
    with pytest.raises(TranslationError) as err:
        walker(t).translate(0x1000, t.ttbr0)
    assert not isinstance(err.value, PageNotPresent) and err.value.level == 3
    t.set(leaf, 0x2)  # bit 0 clear: invalid
    with pytest.raises(PageNotPresent):
        walker(t).translate(0x1000, t.ttbr0)
    t.set(t.ttbr0, (1 << 40) | 3)  # next table outside RAM
    with pytest.raises(TranslationError, match="outside physical memory"):
        walker(t).translate(0x1000, t.ttbr0)
    # Level 0 blocks do not exist with the 4 KiB granule (without LPA2).
    t.set(t.ttbr0, 1)
    with pytest.raises(TranslationError, match="reserved block"):
        walker(t).translate(0x1000, t.ttbr0)


def test_granule_encodings_differ_between_halves() -> None:
    """TG0 and TG1 encode granules differently; reserved encodings and sizes are refused."""
    r0, r1 = tcr_regions(tcr_for(16, 48) & ~(3 << 30) | 1 << 30)
    assert (r0.granule, r1.granule) == (16, 14)
    with pytest.raises(TranslationError, match="reserved granule"):
        tcr_regions(3 << 14)
    with pytest.raises(TranslationError, match="reserved granule"):
        tcr_regions(16 | 16 << 16)  # valid sizes, but TG1 = 0 is reserved
    with pytest.raises(TranslationError, match="64-bit region"):
        tcr_regions(tcr_for(12, 48) & ~0x3F)  # T0SZ = 0


# -- hostile tables ------------------------------------------------------------------------------

GRANULES = 10  # the fuzzed memory, in granules


def _descriptors(granule: int):
    """Descriptors that mostly point at granules of the small memory, sometimes anywhere."""
    inside = st.builds(
        lambda n, low, high: n << granule | low | high << 48,
        st.integers(0, GRANULES + 1), st.integers(0, 0xFFF), st.integers(0, 0xFFFF),
    )
    return st.one_of(inside, st.integers(0, (1 << 64) - 1))


@st.composite
def hostile(draw):
    granule, va_bits = draw(st.sampled_from(LAYOUTS))
    tcr = tcr_for(granule, va_bits, tbi=draw(st.booleans()))
    buf = bytearray(GRANULES << granule)
    for _ in range(draw(st.integers(0, 60))):
        slot = draw(st.integers(0, len(buf) // 8 - 1))
        struct.pack_into("<Q", buf, slot * 8, draw(_descriptors(granule)))
    roots = st.integers(0, GRANULES - 1).map(lambda n: n << granule)
    ttbr0, ttbr1 = draw(roots), draw(roots)
    wide = 1 << va_bits
    vaddrs = draw(st.lists(st.one_of(
        st.integers(0, wide - 1), st.integers((1 << 64) - wide, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1), st.integers(-3, 3),
    ), max_size=20))
    # Plant walks: along a few addresses' paths, descriptors that are mostly tables and pages.
    kinds = st.sampled_from((3, 3, 3, 1, 1, 0, 2))
    for vaddr in draw(st.lists(st.one_of(st.integers(0, wide - 1), st.integers((1 << 64) - wide, (1 << 64) - 1)),
                               min_size=1, max_size=6)):
        table = ttbr1 if vaddr >> 55 & 1 else ttbr0
        shift = granule + (-(-(va_bits - granule) // (granule - 3)) - 1) * (granule - 3)
        while shift >= granule and table + (1 << granule) <= len(buf):
            slot = table + ((vaddr >> shift) & ((1 << (granule - 3)) - 1)) * 8
            out = draw(st.integers(0, GRANULES)) << granule
            struct.pack_into("<Q", buf, slot, out | draw(kinds) | draw(st.sampled_from((0, 1 << 52, 1 << 54, 3 << 6))))
            table, shift = out, shift - (granule - 3)
        vaddrs.append(vaddr)
    return bytes(buf), tcr, ttbr0, ttbr1, vaddrs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile())
def test_random_tables_match_the_reference(case) -> None:
    """Random descriptors: translate agrees with the naive walker or raises a VmwatchError,
    lookup agrees with translate, and enumeration ends (bounded) with mappings that translate."""
    buf, tcr, ttbr0, ttbr1, vaddrs = case
    w = Aarch64Walker(tcr, ttbr1, CachedPhysicalMemory(BufferMemory(bytearray(buf))))
    for vaddr in vaddrs:
        want = reference.walk(buf, tcr, ttbr0, ttbr1, vaddr)
        try:
            got = w.translate(vaddr, ttbr0)
        except VmwatchError:
            # The reference has no "table outside memory": it says None there too.
            assert want is None, hex(vaddr)
            continue
        assert got == want, hex(vaddr)
        assert w.lookup(vaddr, ttbr0).paddr + (vaddr - w.lookup(vaddr, ttbr0).vaddr) == got
    mem = GuestMemory(BufferMemory(bytearray(buf)), registers=Aarch64Registers(tcr_el1=tcr, ttbr1_el1=ttbr1),
                      cr3=ttbr0)
    for vaddr in vaddrs:
        try:
            mem.read(vaddr, 0x30)
            mem.cstring(vaddr, 40)
        except VmwatchError:
            pass
    try:
        found = list(w.mappings(ttbr0, max_tables=200))
    except GuestDataError:
        return
    for m in found[:40]:
        assert w.translate(m.vaddr, ttbr0) == m.paddr
        assert w.lookup(m.vaddr, ttbr0).size == m.size


def test_looping_tables_end() -> None:
    """A table whose descriptors all point back at itself or its parent is enumerated once."""
    t = Aarch64Tables(12, 48)
    t.map(kernel(48, 0), t.alloc())
    l1 = t.get(t.ttbr1) & OA_MASK
    for index in range(512):
        t.set(l1 + index * 8, l1 | 3)  # level 1 points at itself
        t.set(t.ttbr1 + index * 8, l1 | 3)  # every level-0 slot shares it
    found = list(walker(t).mappings(None, max_tables=1 << 16))
    assert found == []
    with pytest.raises(GuestDataError, match="more than 100 tables"):
        list(walker(t).mappings(None, max_tables=100))


# -- through GuestMemory ------------------------------------------------------------------------


def guest_memory(t: Aarch64Tables, **regs) -> GuestMemory:
    registers = Aarch64Registers(tcr_el1=t.tcr, ttbr1_el1=t.ttbr1, ttbr0_el1=t.ttbr0, **regs)
    return GuestMemory(BufferMemory(t.ram), registers=registers)


@pytest.mark.parametrize(("granule", "va_bits"), [(12, 48), (14, 47), (16, 52)])
def test_guest_memory_reads_both_halves_with_the_x86_caches(granule: int, va_bits: int) -> None:
    """Registers of an aarch64 vCPU select the AArch64 walk; reads cross pages, the TLB and the
    page cache count as they do for x86."""
    t = Aarch64Tables(granule, va_bits)
    size = 1 << granule
    kern = kernel(va_bits, 0x40 * size)
    frames = [t.alloc(), t.alloc()]
    for i, frame in enumerate(frames):
        t.map(kern + i * size, frame)
        t.ram[frame : frame + size] = bytes([0x41 + i]) * size
    user = t.alloc()
    t.map(0x10 * size, user)
    t.ram[user : user + 5] = b"user\0"
    mem = guest_memory(t)
    assert mem.mode is PagingMode.AARCH64 and mem.pointer_size == 8
    assert mem.read(kern + size - 2, 4) == b"AABB"
    assert mem.cstring(0x10 * size) == "user"
    hits = mem.stats()["tlb"]["hits"]
    mem.u64(kern + size - 16)
    assert mem.stats()["tlb"]["hits"] == hits + 1
    assert mem.stats()["pages"]["size"] > 0
    assert [m.paddr for m in mem.mappings(start=1 << 63)] == frames
    # Another process: kernel addresses still translate, its user half is its own (empty) table.
    other = t.alloc()
    assert mem.read(kern, 2, other) == b"AA"
    with pytest.raises(PageNotPresent):
        mem.read(0x10 * size, 1, other)


def test_guest_memory_without_tcr_says_what_is_missing() -> None:
    """A dump's registers have no TCR_EL1/TTBR1_EL1: the error names them, no walk is guessed."""
    with pytest.raises(TranslationError, match="TCR_EL1/TTBR1_EL1"):
        GuestMemory(BufferMemory(bytearray(0x1000)), registers=Aarch64Registers(pc=0))
