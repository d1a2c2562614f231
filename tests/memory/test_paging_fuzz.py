"""Hostile page tables from hypothesis: translation and enumeration raise only VmwatchError."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paging_reference as reference
from vmwatch.cpu import PagingMode
from vmwatch.errors import PageNotPresent, VmwatchError
from vmwatch.memory import BufferMemory, GuestMemory

PAGES = 12
MODES = [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5]
REFERENCE = {
    PagingMode.BITS32: reference.walk32,
    PagingMode.PAE: reference.walk_pae,
    PagingMode.LEVEL4: reference.walk4,
    PagingMode.LEVEL5: reference.walk5,
}

# Entries that mostly point inside the small memory (so walks go deep), sometimes anywhere.
entry_values = st.one_of(
    st.builds(lambda page, flags: page << 12 | flags, st.integers(0, PAGES + 2), st.integers(0, 0xFFF)),
    st.builds(lambda page, flags, nx: page << 12 | flags | nx << 63, st.integers(0, PAGES), st.integers(0, 0xFFF),
              st.integers(0, 1)),
    st.integers(0, (1 << 64) - 1),
)
writes = st.lists(st.tuples(st.integers(0, PAGES * 512 - 1), entry_values), max_size=80)
addresses = st.lists(
    st.one_of(
        st.integers(0, (1 << 32) - 1),
        st.integers((1 << 64) - (1 << 47), (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
        st.integers(-5, 5),
    ),
    max_size=20,
)


def _memory(mode: PagingMode, items) -> bytearray:
    buf = bytearray(PAGES * 0x1000)
    esize = 4 if mode is PagingMode.BITS32 else 8
    fmt = "<I" if esize == 4 else "<Q"
    for index, value in items:
        off = index * esize
        if off + esize <= len(buf):
            struct.pack_into(fmt, buf, off, value & ((1 << (8 * esize)) - 1))
    return buf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), items=writes, vaddrs=addresses, root=st.integers(0, PAGES - 1),
       pad=st.integers(0, 127))
def test_random_tables(mode, items, vaddrs, root, pad):
    """Random entries: translate agrees with the reference walker or raises a VmwatchError; reads too."""
    buf = _memory(mode, items)
    cr3 = root << 12 | (pad << 5 if mode is PagingMode.PAE else 0)
    mem = GuestMemory(BufferMemory(buf), cr3=cr3, mode=mode)
    ref = REFERENCE[mode]
    for vaddr in vaddrs:
        try:
            got = mem.translate(vaddr)
        except PageNotPresent:
            got = None
        except VmwatchError:
            got = "error"
        want = ref(bytes(buf), cr3, vaddr) if vaddr >= 0 else None
        if got == "error":
            # The reference has no notion of "table outside memory" / non-canonical: it says None.
            assert want is None, hex(vaddr)
        else:
            assert got == want, hex(vaddr)
        try:
            mem.read(vaddr, 0x30)
            mem.cstring(vaddr, 40)
        except VmwatchError:
            pass
    try:
        found = list(mem.mappings(max_tables=300))
    except VmwatchError:
        return
    for m in found[:50]:
        assert mem.lookup(m.vaddr).paddr == m.paddr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), seed=st.integers(0, 1000),
       reads=st.lists(st.tuples(st.integers(0, 200), st.integers(-0x1800, 0x1800), st.integers(0, 0x2400)),
                      min_size=1, max_size=15))
def test_reads_match_the_model(mode, seed, reads):
    """Any read near mapped pages equals the bytes a page-by-page model predicts, or faults at
    the first unmapped page the model predicts."""
    from vmwatch.testing.fakeguest import FakeGuest

    fake = FakeGuest(mode, seed=seed, memory_size=1 << 21)
    made = fake.map_random(12)
    small = [m for m in made if m.size == 0x1000] or made
    mem = fake.guest_memory()
    ref = REFERENCE[mode]
    buf = bytes(fake.buffer)
    for index, offset, size in reads:
        base = small[index % len(small)].vaddr
        vaddr = (base + offset) & ((1 << 64) - 1)
        want = bytearray()
        fault = None
        for pos in range(size):
            paddr = ref(buf, fake.cr3, (vaddr + pos) & ((1 << 64) - 1))
            if paddr is None or paddr >= len(buf):
                fault = (vaddr + pos) & ((1 << 64) - 1)
                break
            want.append(buf[paddr])
        try:
            got = mem.read(vaddr, size)
        except VmwatchError as exc:
            assert fault is not None and exc.vaddr & ~0xFFF == fault & ~0xFFF, (hex(vaddr), size, exc)
        else:
            assert fault is None and got == bytes(want)
