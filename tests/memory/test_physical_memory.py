"""BufferMemory and the page cache in front of any physical memory."""

from __future__ import annotations

import pytest

from vmwatch.errors import PhysicalReadError, UnsupportedOperation
from vmwatch.images.base import Run
from vmwatch.memory import BufferMemory, CachedPhysicalMemory, PhysicalMemory


def _holey() -> BufferMemory:
    # phys 0x0000-0x1fff -> buffer 0x0000; hole 0x2000-0x2fff; zeros 0x3000-0x3fff; 0x4000-0x4fff -> buffer 0x2000
    data = bytes(range(256)) * 48
    runs = [Run(0, 0x2000, 0), Run(0x3000, 0x1000, None), Run(0x4000, 0x1000, 0x2000)]
    return BufferMemory(data, runs=runs)


class TestBufferMemory:
    def test_protocol(self):
        """BufferMemory satisfies the PhysicalMemory protocol."""
        assert isinstance(BufferMemory(b"x"), PhysicalMemory)

    def test_flat_read(self):
        """A plain buffer maps at physical 0."""
        mem = BufferMemory(bytes(range(16)))
        assert mem.read(3, 4) == bytes([3, 4, 5, 6])
        assert mem.size == 16

    def test_runs_and_holes(self):
        """Reads honour runs, zero runs and holes; pad fills holes with zeros."""
        mem = _holey()
        assert mem.read(0x4001, 4) == bytes(range(1, 5))
        assert mem.read(0x3ffe, 4) == bytes(2) + bytes(range(0, 2))
        with pytest.raises(PhysicalReadError) as info:
            mem.read(0x1ffe, 4)
        assert info.value.paddr == 0x2000
        assert mem.read(0x1ffe, 4, pad=True) == bytes([254, 255, 0, 0])
        with pytest.raises(PhysicalReadError):
            mem.read(0x5000, 1)

    def test_read_many(self):
        """Batched reads give None for unmapped requests."""
        assert _holey().read_many([(0, 2), (0x2000, 1), (0x3000, 1)]) == [b"\0\1", None, b"\0"]

    def test_write_permission(self):
        """Writes need writable=True and a mutable buffer."""
        with pytest.raises(UnsupportedOperation):
            BufferMemory(bytearray(16)).write(0, b"x")
        with pytest.raises(ValueError):
            BufferMemory(b"immutable", writable=True)
        buf = bytearray(16)
        BufferMemory(buf, writable=True).write(2, b"ab")
        assert buf[2:4] == b"ab"

    def test_write_to_hole(self):
        """Writing an unbacked range raises PhysicalReadError."""
        runs = [Run(0, 0x10, 0)]
        with pytest.raises(PhysicalReadError):
            BufferMemory(bytearray(0x20), runs=runs, writable=True).write(0x0F, b"ab")

    def test_run_past_buffer(self):
        """A run that the buffer cannot back is rejected."""
        with pytest.raises(ValueError):
            BufferMemory(b"abc", runs=[Run(0, 0x10, 0)])


class TestCachedPhysicalMemory:
    def test_hits_and_misses(self):
        """A second read of the same page is a hit."""
        cached = CachedPhysicalMemory(BufferMemory(bytes(0x3000)))
        cached.read(0x10, 8)
        cached.read(0x20, 8)
        assert cached.stats()["hits"] == 1 and cached.stats()["misses"] == 1

    def test_lru_bound(self):
        """The cache never holds more than capacity pages, and evicts the least recently used."""
        cached = CachedPhysicalMemory(BufferMemory(bytes(0x10000)), capacity=2)
        cached.read(0x0000, 1)
        cached.read(0x1000, 1)
        cached.read(0x0000, 1)  # page 0 is now most recent
        cached.read(0x2000, 1)  # evicts page 1
        assert cached.stats()["size"] == 2
        misses = cached.misses
        cached.read(0x0000, 1)
        assert cached.misses == misses
        cached.read(0x1000, 1)
        assert cached.misses == misses + 1

    def test_cross_page_and_partial(self):
        """Reads spanning pages and partly backed pages give the source's bytes."""
        mem = _holey()
        cached = CachedPhysicalMemory(mem)
        assert cached.read(0xFF0, 0x20) == mem.read(0xFF0, 0x20)
        assert cached.read(0x3FF0, 0x20) == mem.read(0x3FF0, 0x20)
        with pytest.raises(PhysicalReadError):
            cached.read(0x1FF0, 0x20)
        assert cached.read(0x1FF0, 0x20, pad=True) == mem.read(0x1FF0, 0x20, pad=True)

    def test_write_invalidates(self):
        """A write through the cache is visible to the next read."""
        buf = bytearray(0x2000)
        cached = CachedPhysicalMemory(BufferMemory(buf, writable=True))
        assert cached.read(0xFFE, 4) == bytes(4)
        cached.write(0xFFE, b"abcd")
        assert cached.read(0xFFE, 4) == b"abcd"

    def test_volatile_flags_pass_through(self):
        """The wrapper reports the source's volatile and writable flags."""
        cached = CachedPhysicalMemory(BufferMemory(bytearray(16), volatile=True, writable=True))
        assert cached.volatile and cached.writable


class _CountingMemory(BufferMemory):
    """Counts read_many batches, like a gdbstub source where each batch is a round trip."""

    batches = 0

    def read_many(self, requests):
        self.batches += 1
        return super().read_many(requests)


class TestBatchedReads:
    def test_misses_go_in_one_batch(self):
        """Uncached requests reach the source as one read_many; cached ones do not reach it."""
        inner = _CountingMemory(bytes(range(256)) * 64)
        cached = CachedPhysicalMemory(inner)
        cached.read(0x1000, 1)  # page 1 is now cached
        got = cached.read_many([(0x1004, 2), (0x10, 2), (0x3FFE, 2), (0x4000, 1)])
        assert got == [bytes([4, 5]), bytes([16, 17]), bytes([254, 255]), None]
        assert inner.batches == 1
        assert cached.stats()["hits"] == 1


class TestEntryReads:
    def test_second_touch_caches_the_page(self):
        """entry() reads just the entry on the first touch and caches the page on the second."""
        cached = CachedPhysicalMemory(BufferMemory(bytes(range(256)) * 32))
        data, off = cached.entry(0x1010, 8)
        assert (data[off : off + 8], cached.stats()["size"]) == (bytes(range(16, 24)), 0)
        data, off = cached.entry(0x1010, 8)
        assert (data[off : off + 8], off, cached.stats()["size"]) == (bytes(range(16, 24)), 0x10, 1)
        cached.flush()
        data, off = cached.entry(0x1010, 8)
        assert cached.stats()["size"] == 0 and off == 0

    def test_unbacked_entry(self):
        """An entry outside memory raises PhysicalReadError."""
        with pytest.raises(PhysicalReadError):
            CachedPhysicalMemory(BufferMemory(bytes(0x1000))).entry(0x5000, 8)
