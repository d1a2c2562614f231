"""Physical memory: the interface every source implements, a buffer-backed source, a page cache.

Theory of operation: a source (image, live RAM file, replay) knows only guest-physical
addresses. ``read_into`` and the batched ``read_many`` are the whole contract (as in memflow's
``PhysicalMemory``); everything else is built on them. :class:`CachedPhysicalMemory` keeps
whole 4 KiB pages as ``bytes`` so the page walker and the integer readers can
``struct.unpack_from`` straight out of them.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Iterable, Protocol, runtime_checkable

from vmwatch.errors import PhysicalReadError, UnsupportedOperation
from vmwatch.images.base import PhysicalReads, Run

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1


@runtime_checkable
class PhysicalMemory(Protocol):
    """Guest-physical memory of any source (see INTERFACES.md)."""

    volatile: bool
    """True if the contents can change behind our back (a running guest); dumps: False."""
    writable: bool
    """True only when opened for writing and the source can write."""
    runs: tuple[Run, ...]
    """Sorted backed ranges."""

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None: ...

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes: ...

    def read_many(self, requests: Iterable[tuple[int, int]]) -> list[bytes | None]: ...

    def write(self, paddr: int, data: bytes) -> None: ...


class BufferMemory(PhysicalReads):
    """Physical memory backed by a bytes-like buffer (tests, FakeGuest, small raw dumps).

    Args:
        data: the buffer; a ``bytearray`` (or writable mmap) allows writes when ``writable``.
        runs: backed ranges whose ``file_offset`` indexes ``data``; by default one run mapping
            ``data`` at physical address 0. A run with ``file_offset=None`` reads as zeros.
        writable: allow ``write`` (the buffer must be mutable).
        volatile: declare that the contents may change behind the reader's back.
    """

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        runs: Iterable[Run] | None = None,
        writable: bool = False,
        volatile: bool = False,
    ) -> None:
        self._view = memoryview(data).cast("B")
        if writable and self._view.readonly:
            raise ValueError("writable=True needs a mutable buffer, not a read-only one")
        self.runs = tuple(sorted(runs, key=lambda r: r.start)) if runs is not None else (
            Run(start=0, size=len(self._view), file_offset=0),
        )
        for run in self.runs:
            if run.file_offset is not None and run.file_offset + run.size > len(self._view):
                raise ValueError(f"run {run!r} lies past the end of the {len(self._view):#x}-byte buffer")
        self._starts = [r.start for r in self.runs]
        self.writable = writable
        self.volatile = volatile
        # One run at file offset 0: paddr is the buffer offset (the common, fast case).
        self._flat = len(self.runs) == 1 and self.runs[0].start == 0 and self.runs[0].file_offset == 0

    @property
    def size(self) -> int:
        """Highest backed physical address + 1."""
        return self.runs[-1].start + self.runs[-1].size if self.runs else 0

    def _locate(self, paddr: int) -> tuple[Run, int] | None:
        """The run holding ``paddr`` and how many bytes of it remain from there."""
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i < 0:
            return None
        run = self.runs[i]
        left = run.start + run.size - paddr
        return (run, left) if left > 0 else None

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        out = memoryview(buf).cast("B")
        size = len(out)
        if self._flat and 0 <= paddr and paddr + size <= len(self._view):
            out[:] = self._view[paddr : paddr + size]
            return
        pos = 0
        while pos < size:
            found = self._locate(paddr + pos)
            if found is None:
                if not pad:
                    raise PhysicalReadError(paddr + pos, size - pos)
                nxt = bisect.bisect_right(self._starts, paddr + pos)
                gap_end = self._starts[nxt] if nxt < len(self._starts) else paddr + size
                step = min(size - pos, gap_end - paddr - pos)
                out[pos : pos + step] = bytes(step)
            else:
                run, left = found
                step = min(size - pos, left)
                if run.file_offset is None:
                    out[pos : pos + step] = bytes(step)
                else:
                    off = run.file_offset + paddr + pos - run.start
                    out[pos : pos + step] = self._view[off : off + step]
            pos += step

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size!r}")
        if self._flat and 0 <= paddr and paddr + size <= len(self._view):
            return self._view[paddr : paddr + size].tobytes()
        buf = bytearray(size)
        self.read_into(paddr, buf, pad=pad)
        return bytes(buf)

    def write(self, paddr: int, data: bytes) -> None:
        if not self.writable:
            raise UnsupportedOperation("this physical memory was not opened for writing")
        data = memoryview(data).cast("B")
        pos = 0
        while pos < len(data):
            found = self._locate(paddr + pos)
            if found is None or found[0].file_offset is None:
                raise PhysicalReadError(paddr + pos, len(data) - pos, f"cannot write unbacked physical address {paddr + pos:#x}")
            run, left = found
            step = min(len(data) - pos, left)
            off = run.file_offset + paddr + pos - run.start
            self._view[off : off + step] = data[pos : pos + step]
            pos += step


class CachedPhysicalMemory:
    """A bounded LRU cache of whole 4 KiB pages in front of another physical memory.

    It has the same interface as what it wraps, so callers never know it is there. Pages that
    are not wholly backed are never cached (reads of them go to the source each time). A
    volatile source's pages go stale when the guest runs: the owner calls :meth:`flush` then
    (``GuestMemory.on_resume`` does). Writes go through and drop the pages they touch.

    Args:
        inner: the source.
        capacity: how many pages to keep (default 4096 = 16 MiB).
    """

    def __init__(self, inner: PhysicalMemory, *, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity!r}")
        self.inner = inner
        self.capacity = capacity
        self.volatile = inner.volatile
        self.writable = inner.writable
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._seen: set[int] = set()  # pages touched once by entry() since the last flush
        self.hits = 0
        self.misses = 0

    @property
    def runs(self) -> tuple[Run, ...]:
        return self.inner.runs

    def page(self, pfn: int) -> bytes:
        """The 4 KiB page number ``pfn``, from the cache or the source.

        Raises:
            PhysicalReadError: the page is not wholly backed.
        """
        pages = self._pages
        data = pages.get(pfn)
        if data is not None:
            pages.move_to_end(pfn)
            self.hits += 1
            return data
        self.misses += 1
        data = self.inner.read(pfn << PAGE_SHIFT, PAGE_SIZE)
        pages[pfn] = data
        if len(pages) > self.capacity:
            pages.popitem(last=False)
        return data

    def entry(self, paddr: int, size: int) -> tuple[bytes, int]:
        """Bytes holding the ``size``-byte paging entry at ``paddr``, and its offset in them.

        The first touch of a page since the last flush reads only the entry; the second caches
        the whole page. A table walked twice will be walked again; the first walk after a
        resume (everything flushed) then costs a few 8-byte reads, not 4 KiB copies.

        Raises:
            PhysicalReadError: the entry is not backed.
        """
        pfn = paddr >> PAGE_SHIFT
        seen = self._seen
        if pfn in seen:
            return self.page(pfn), paddr & PAGE_MASK
        if len(seen) >= self.capacity:
            seen.clear()
        seen.add(pfn)
        self.misses += 1
        return self.inner.read(paddr, size), 0

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        out = memoryview(buf).cast("B")
        size = len(out)
        pos = 0
        while pos < size:
            addr = paddr + pos
            off = addr & PAGE_MASK
            step = min(size - pos, PAGE_SIZE - off)
            try:
                page = self.page(addr >> PAGE_SHIFT)
            except PhysicalReadError:
                # A partly backed page: let the source sort out which bytes exist.
                self.inner.read_into(addr, out[pos : pos + step], pad=pad)
            else:
                out[pos : pos + step] = page[off : off + step]
            pos += step

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size!r}")
        off = paddr & PAGE_MASK
        if off + size <= PAGE_SIZE and paddr >= 0:
            try:
                return self.page(paddr >> PAGE_SHIFT)[off : off + size]
            except PhysicalReadError:
                return self.inner.read(paddr, size, pad=pad)
        buf = bytearray(size)
        self.read_into(paddr, buf, pad=pad)
        return bytes(buf)

    def read_many(self, requests: Iterable[tuple[int, int]]) -> list[bytes | None]:
        """Serve what the cache holds; send the rest to the source in one batch (one round
        trip for a gdbstub source) without caching it."""
        requests = list(requests)
        out: list[bytes | None] = [None] * len(requests)
        missing = []
        pages = self._pages
        for i, (paddr, size) in enumerate(requests):
            off = paddr & PAGE_MASK
            page = pages.get(paddr >> PAGE_SHIFT) if off + size <= PAGE_SIZE else None
            if page is not None:
                self.hits += 1
                out[i] = page[off : off + size]
            else:
                missing.append(i)
        if missing:
            self.misses += len(missing)
            for i, data in zip(missing, self.inner.read_many([requests[i] for i in missing])):
                out[i] = data
        return out

    def write(self, paddr: int, data: bytes) -> None:
        self.inner.write(paddr, data)
        for pfn in range(paddr >> PAGE_SHIFT, (paddr + max(len(data), 1) - 1 >> PAGE_SHIFT) + 1):
            self._pages.pop(pfn, None)

    def flush(self) -> None:
        """Drop every cached page."""
        self._pages.clear()
        self._seen.clear()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._pages), "capacity": self.capacity}
