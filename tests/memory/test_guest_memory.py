"""GuestMemory reads: widths, page-spanning reads, faults, strings, caches and invalidation."""

from __future__ import annotations

import struct

import pytest

from vmwatch.cpu import PagingMode
from vmwatch.errors import GuestDataError, PageNotPresent, SymbolError, TranslationError, UnsupportedOperation
from vmwatch.memory import BufferMemory, GuestMemory
from vmwatch.testing.fakeguest import FakeGuest

BASE = 0xFFFF_8880_0000_0000


@pytest.fixture
def fake() -> FakeGuest:
    """Three consecutive 4 KiB pages at BASE on scattered frames, then a hole, then one more page."""
    guest = FakeGuest(PagingMode.LEVEL4, seed=11, memory_size=1 << 20, writable=True)
    for i, frame in enumerate((0x5000, 0x2000, 0x9000)):
        guest.map(BASE + i * 0x1000, frame, 0x1000, writable=True)
    guest.map(BASE + 0x4000, 0x7000, 0x1000)
    return guest


def _phys(fake: FakeGuest, paddr: int, size: int) -> bytes:
    return bytes(fake.buffer[paddr : paddr + size])


class TestReads:
    def test_read_within_page(self, fake):
        """A read inside one page returns the bytes at the translated frame."""
        mem = fake.guest_memory()
        assert mem.read(BASE + 0x10, 32) == _phys(fake, 0x5010, 32)

    def test_read_spanning_pages(self, fake):
        """A read across page boundaries stitches the scattered frames together."""
        mem = fake.guest_memory()
        want = _phys(fake, 0x5FF0, 0x10) + _phys(fake, 0x2000, 0x1000) + _phys(fake, 0x9000, 0x10)
        assert mem.read(BASE + 0xFF0, 0x1020) == want

    def test_fault_names_first_unmapped_address(self, fake):
        """A read running into the hole raises PageNotPresent naming the hole's first byte."""
        mem = fake.guest_memory()
        with pytest.raises(PageNotPresent) as info:
            mem.read(BASE + 0x2FF0, 0x20)
        assert info.value.vaddr == BASE + 0x3000

    def test_pad(self, fake):
        """pad=True reads the hole as zeros."""
        mem = fake.guest_memory()
        data = mem.read(BASE + 0x2FF0, 0x1020, pad=True)
        assert data == _phys(fake, 0x9FF0, 0x10) + bytes(0x1000) + _phys(fake, 0x7000, 0x10)

    def test_unbacked_frame(self, fake):
        """A page mapped past the end of physical memory raises TranslationError naming the vaddr."""
        fake.map(BASE + 0x8000, 0x4000_0000, 0x1000)
        mem = fake.guest_memory()
        assert mem.translate(BASE + 0x8000) == 0x4000_0000
        with pytest.raises(TranslationError) as info:
            mem.u64(BASE + 0x8008)
        assert info.value.vaddr == BASE + 0x8008 and "not backed" in str(info.value)
        with pytest.raises(TranslationError):
            mem.read(BASE + 0x7FF0, 0x20, pad=False)

    def test_integers(self, fake):
        """Each integer width reads little-endian at the translated address, also across pages."""
        mem = fake.guest_memory()
        raw = _phys(fake, 0x5100, 8)
        assert mem.u8(BASE + 0x100) == raw[0]
        assert mem.u16(BASE + 0x100) == struct.unpack_from("<H", raw)[0]
        assert mem.u32(BASE + 0x100) == struct.unpack_from("<I", raw)[0]
        assert mem.u64(BASE + 0x100) == struct.unpack_from("<Q", raw)[0]
        assert mem.s32(BASE + 0x100) == struct.unpack_from("<i", raw)[0]
        assert mem.s64(BASE + 0x100) == struct.unpack_from("<q", raw)[0]
        spanning = _phys(fake, 0x5FFC, 4) + _phys(fake, 0x2000, 4)
        assert mem.u64(BASE + 0xFFC) == struct.unpack("<Q", spanning)[0]

    def test_absurd_length(self, fake):
        """A gigantic or negative length is refused with a typed error."""
        mem = fake.guest_memory()
        with pytest.raises(GuestDataError):
            mem.read(BASE, 1 << 40)
        with pytest.raises(GuestDataError):
            mem.read(BASE, -1)
        assert mem.read(BASE + 0x3000, 0) == b""

    def test_read_many(self, fake):
        """Batched virtual reads give each range's bytes, None for unmapped or unbacked ones."""
        fake.map(BASE + 0x8000, 0x4000_0000, 0x1000)
        mem = fake.guest_memory()
        got = mem.read_many([(BASE + 0x10, 8), (BASE + 0xFFC, 8), (BASE + 0x3000, 4), (BASE + 0x8000, 4), (BASE, 0)])
        assert got == [
            _phys(fake, 0x5010, 8),
            _phys(fake, 0x5FFC, 4) + _phys(fake, 0x2000, 4),
            None,
            None,
            b"",
        ]

    def test_read_phys(self, fake):
        """read_phys bypasses translation."""
        assert fake.guest_memory().read_phys(0x2000, 16) == _phys(fake, 0x2000, 16)


class TestPointers:
    def test_chain(self, fake):
        """chain follows p = pointer(p + offset) for each offset."""
        fake.buffer[0x5000:0x5008] = (BASE + 0x1000).to_bytes(8, "little")
        fake.buffer[0x2010:0x2018] = (BASE + 0x2000).to_bytes(8, "little")
        fake.buffer[0x9020:0x9028] = (0x1234).to_bytes(8, "little")
        mem = fake.guest_memory()
        assert mem.chain(BASE, [0]) == BASE + 0x1000
        assert mem.chain(BASE, [0, 0x10, 0x20]) == 0x1234

    def test_chain_null(self, fake):
        """A NULL pointer in the middle of a chain is a GuestDataError naming the step."""
        fake.buffer[0x5000:0x5008] = bytes(8)
        with pytest.raises(GuestDataError, match="step 1"):
            fake.guest_memory().chain(BASE, [0, 8])

    def test_pointer_width(self):
        """Pointers are 4 bytes under 32-bit and PAE paging, 8 under 64-bit paging."""
        for mode, width in ((PagingMode.BITS32, 4), (PagingMode.PAE, 4), (PagingMode.LEVEL4, 8)):
            fake = FakeGuest(mode, memory_size=1 << 20)
            fake.map(0x1000, 0x3000, 0x1000)
            fake.buffer[0x3000:0x3008] = bytes(range(1, 9))
            mem = fake.guest_memory()
            assert mem.pointer(0x1000) == int.from_bytes(bytes(range(1, 9))[:width], "little")


class TestStrings:
    def test_cstring_across_pages(self, fake):
        """A C string spanning two pages is read whole up to its NUL."""
        fake.buffer[0x5FFC:0x6000] = b"Linu"
        fake.buffer[0x2000:0x2007] = b"x 6.1\0z"
        assert fake.guest_memory().cstring(BASE + 0xFFC) == "Linux 6.1"

    def test_cstring_stops_before_hole(self, fake):
        """A string ending just before an unmapped page is read without faulting."""
        fake.buffer[0x9FFE:0xA000] = b"h\0"
        assert fake.guest_memory().cstring(BASE + 0x2FFE, max_len=100) == "h"

    def test_cstring_cap_and_fault(self, fake):
        """max_len caps the result; a string running into the hole faults naming the hole."""
        fake.buffer[0x9FF0:0xA000] = b"A" * 16
        mem = fake.guest_memory()
        assert mem.cstring(BASE + 0x2FF0, max_len=4) == "AAAA"
        with pytest.raises(PageNotPresent) as info:
            mem.cstring(BASE + 0x2FF0, max_len=64)
        assert info.value.vaddr == BASE + 0x3000

    def test_utf16(self, fake):
        """UTF-16LE strings end at a 0 unit, also across a page boundary at an odd address."""
        text = "Système\0".encode("utf-16-le")
        fake.buffer[0x5FF9:0x6000] = text[:7]
        fake.buffer[0x2000 : 0x2000 + len(text) - 7] = text[7:]
        mem = fake.guest_memory()
        assert mem.utf16(BASE + 0xFF9) == "Système"
        assert mem.utf16(BASE + 0xFF9, max_len=3) == "Sys"


class TestCaches:
    def test_symbols(self, fake):
        """Symbols resolve through the resolver once, then hit the cache."""
        calls = []

        def resolve(name):
            calls.append(name)
            if name != "init_task":
                raise SymbolError(f"unknown symbol {name}", name=name)
            return BASE + 0x100

        mem = fake.guest_memory()
        with pytest.raises(SymbolError):
            mem.u64_symbol("init_task")
        mem.symbols.resolver = resolve
        assert mem.u64_symbol("init_task") == mem.u64(BASE + 0x100)
        assert mem.read_symbol("init_task", 4) == _phys(fake, 0x5100, 4)
        assert calls == ["init_task"]
        with pytest.raises(SymbolError):
            mem.symbols.get("nope")
        assert mem.stats()["symbols"]["hits"] == 1

    def test_pid_dtb(self, fake):
        """read_user translates with the pid's page-table root."""
        # A second address space in the same memory, rooted at a free frame.
        root = 0x30000
        fake.buffer[root : root + 0x1000] = bytes(0x1000)
        fake.cr3, saved = root, fake.cr3
        fake.map(0x40_0000, 0x9000, 0x1000)
        fake.cr3 = saved
        mem = fake.guest_memory()
        mem.pid_dtb.resolver = {42: root}.__getitem__
        assert mem.read_user(42, 0x40_0008, 8) == _phys(fake, 0x9008, 8)
        with pytest.raises(PageNotPresent):
            mem.read(0x40_0008, 8)

    def test_flush_and_stats(self, fake):
        """flush() empties every cache; stats() reports them all."""
        mem = fake.guest_memory()
        mem.u64(BASE)
        mem.u64(BASE)
        stats = mem.stats()
        assert stats["tlb"]["hits"] == 1 and stats["tlb"]["misses"] == 1 and stats["tlb"]["size"] == 1
        mem.flush()
        assert mem.stats()["tlb"]["size"] == 0 and mem.stats()["pages"]["size"] == 0

    def test_dump_never_stale(self, fake):
        """on_resume() keeps the caches of a non-volatile source."""
        mem = fake.guest_memory()
        mem.u64(BASE)
        mem.on_resume()
        assert mem.stats()["tlb"]["size"] == 1

    def test_volatile_invalidation(self):
        """On a volatile source, changed page tables are seen only after on_resume()."""
        fake = FakeGuest(PagingMode.LEVEL4, seed=13, memory_size=1 << 20)
        fake.map(0x1000, 0x5000, 0x1000)
        mem = GuestMemory(BufferMemory(fake.buffer, volatile=True), registers=fake.registers)
        assert mem.translate(0x1000) == 0x5000
        # The guest "runs" and remaps the page: find the PTE and point it elsewhere.
        fake.set_entry(fake.entry_address(0x1000, depth=3), 0x6000 | 3)
        assert mem.translate(0x1000) == 0x5000  # still paused from our point of view: cached
        mem.on_resume()
        assert mem.translate(0x1000) == 0x6000


class TestWrites:
    def test_write_needs_writable(self):
        """Writing through a read-only source raises UnsupportedOperation."""
        fake = FakeGuest(PagingMode.LEVEL4, memory_size=1 << 20)
        fake.map(0x1000, 0x5000, 0x1000)
        with pytest.raises(UnsupportedOperation):
            fake.guest_memory().write(0x1000, b"x")

    def test_write_spanning_pages(self, fake):
        """A write across pages lands in each frame and is visible to the next read."""
        mem = fake.guest_memory()
        mem.read(BASE + 0xFFE, 4)
        mem.write(BASE + 0xFFE, b"WXYZ")
        assert _phys(fake, 0x5FFE, 2) == b"WX" and _phys(fake, 0x2000, 2) == b"YZ"
        assert mem.read(BASE + 0xFFE, 4) == b"WXYZ"

    def test_write_into_hole_writes_nothing(self, fake):
        """A write that would run into an unmapped page fails before writing any byte."""
        mem = fake.guest_memory()
        before = _phys(fake, 0x9FFE, 2)
        with pytest.raises(PageNotPresent):
            mem.write(BASE + 0x2FFE, b"abcd")
        assert _phys(fake, 0x9FFE, 2) == before
