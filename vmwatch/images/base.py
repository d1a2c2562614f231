"""What every memory-image format shares: the physical run map, mmap-backed reads, validation.

Theory of operation: a format parser only finds *where* guest-physical ranges live in a file and
returns them as :class:`Run` values. :class:`Image` validates the runs once (sorted, no overlap,
inside the file, sane sizes) and then serves reads by bisecting the run starts and slicing the
mmap: one bisect plus one slice for a read inside a run, no seek, no file read, no lock.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from typing import Iterable, Sequence

import attrs

from vmwatch.cpu import Registers
from vmwatch.errors import ImageFormatError, PhysicalReadError, UnsupportedOperation

MAX_PHYSICAL = 1 << 52
"""x86 physical addresses have at most 52 bits: anything beyond is a corrupt header."""


@attrs.frozen
class Run:
    """One backed guest-physical range."""

    start: int
    """First guest-physical address."""
    size: int
    """Length in bytes."""
    file_offset: int | None
    """Where the bytes start in the data file, or ``None`` if the range reads as zeros."""

    @property
    def end(self) -> int:
        """One past the last guest-physical address."""
        return self.start + self.size


class Reader:
    """Bounds-checked little-endian reads from a header, raising ImageFormatError on truncation."""

    __slots__ = ("buf", "path", "size")

    def __init__(self, buf: bytes | mmap.mmap | memoryview, path: str) -> None:
        self.buf = buf
        self.path = path
        self.size = len(buf)

    def need(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageFormatError(
                f"{what} ({length:#x} bytes) runs past the end of the file (size {self.size:#x})",
                path=self.path, offset=offset)

    def bytes(self, offset: int, length: int, what: str = "data") -> bytes:
        self.need(offset, length, what)
        return bytes(self.buf[offset:offset + length])

    def unpack(self, fmt: struct.Struct, offset: int, what: str = "header") -> tuple:
        self.need(offset, fmt.size, what)
        return fmt.unpack_from(self.buf, offset)

    def u16(self, offset: int, what: str = "u16") -> int:
        return self.unpack(_U16, offset, what)[0]

    def u32(self, offset: int, what: str = "u32") -> int:
        return self.unpack(_U32, offset, what)[0]

    def u64(self, offset: int, what: str = "u64") -> int:
        return self.unpack(_U64, offset, what)[0]

    def error(self, message: str, offset: int | None = None) -> ImageFormatError:
        return ImageFormatError(message, path=self.path, offset=offset)


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def map_file(path: str | os.PathLike) -> tuple[mmap.mmap, int]:
    """Map a whole file read-only; returns (mmap, size). An empty file is not an image."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageFormatError("empty file", path=str(path))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, size


def validate_runs(runs: Iterable[Run], data_size: int, path: str) -> tuple[Run, ...]:
    """Sort runs, drop empty ones, and reject overlaps, runs past EOF and absurd addresses.

    Raises:
        ImageFormatError: naming the first bad run.
    """
    out = sorted((r for r in runs if r.size), key=lambda r: r.start)
    prev_end = 0
    for run in out:
        if run.start < 0 or run.size < 0 or run.end > MAX_PHYSICAL:
            raise ImageFormatError(
                f"run {run.start:#x}+{run.size:#x} lies outside the 52-bit physical space", path=path)
        if run.start < prev_end:
            raise ImageFormatError(
                f"run at {run.start:#x} overlaps the previous one (ending at {prev_end:#x})", path=path)
        if run.file_offset is not None and (run.file_offset < 0 or run.file_offset + run.size > data_size):
            raise ImageFormatError(
                f"run {run.start:#x}+{run.size:#x} needs file bytes up to "
                f"{(run.file_offset + run.size):#x} but the data is {data_size:#x} bytes long",
                path=path, offset=run.file_offset)
        prev_end = run.end
    return tuple(out)


class PhysicalReads:
    """``read`` and ``read_many`` of a physical memory, in terms of its ``read_into``.

    Every physical memory (images, live RAM, recordings) offers the same three reads; a class
    that only knows how to fill a buffer gets the other two from here.
    """

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size!r}")
        buf = bytearray(size)
        self.read_into(paddr, buf, pad=pad)
        return bytes(buf)

    def read_many(self, requests: Iterable[tuple[int, int]]) -> list[bytes | None]:
        """Batched reads: one result per (paddr, size); ``None`` where any byte is unmapped."""
        out: list[bytes | None] = []
        for paddr, size in requests:
            try:
                out.append(self.read(paddr, size))
            except PhysicalReadError:
                out.append(None)
        return out


class Image(PhysicalReads):
    """A memory image: physical memory (read-only, mmap-backed) plus saved CPUs and metadata.

    Formats subclass this and call ``super().__init__`` with the runs they found; everything
    about reading lives here. The image owns the maps it is given (it closes them, also when
    the runs are rejected). Use as a context manager or call :meth:`close`.
    """

    format: str = "raw"
    volatile = False
    writable = False

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        data: mmap.mmap,
        runs: Sequence[Run],
        cpus: Sequence[Registers] = (),
        metadata: dict | None = None,
        extra_maps: Sequence[mmap.mmap] = (),
        data_path: str | os.PathLike | None = None,
    ) -> None:
        self.path = str(path)
        self.data_path = str(data_path if data_path is not None else path)
        """The file the runs' ``file_offset`` values index (a VMware ``.vmem`` may differ from ``path``)."""
        self._maps = (data, *extra_maps)
        try:
            self.runs = validate_runs(runs, len(data), self.path)
        except BaseException:  # the image owns its maps from here on, even when it fails
            for mm in self._maps:
                mm.close()
            raise
        self._data = data
        self._view = memoryview(data)
        self.cpus: tuple[Registers, ...] = tuple(cpus)
        self.metadata: dict = dict(metadata or {})
        self._starts = [r.start for r in self.runs]
        self._ends = [r.end for r in self.runs]
        self._offsets = [r.file_offset for r in self.runs]
        self._compile_readers()

    # -- reading ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Highest backed physical address + 1 (0 for an image without runs)."""
        return self._ends[-1] if self._ends else 0

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        """Read ``size`` bytes of guest-physical memory at ``paddr``.

        (Replaced per instance by the closure from :meth:`_compile_readers`; same contract.)

        Raises:
            PhysicalReadError: part of the range is not backed and ``pad`` is false.
        """
        raise AssertionError("replaced in __init__")  # pragma: no cover

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        """Fill ``buf`` from guest-physical ``paddr`` (zeros for holes only when ``pad``).

        Raises:
            PhysicalReadError: part of the range is not backed and ``pad`` is false.
        """
        raise AssertionError("replaced in __init__")  # pragma: no cover

    def _compile_readers(self) -> None:
        """Bind ``read``/``read_into`` as closures over local lists: the hot path then costs one
        bisect and one slice, with no attribute lookups (measured: ~30% faster per small read)."""
        starts, ends, offsets = self._starts, self._ends, self._offsets
        data, view, slow = self._data, self._view, self._read_slow
        find = bisect.bisect_right

        if len(starts) == 1 and offsets[0] is not None:  # raw, .vmem, one-range LiME: no bisect
            first, last, delta = starts[0], ends[0], offsets[0] - starts[0]

            def read_one(paddr: int, size: int, *, pad: bool = False) -> bytes:
                if first <= paddr and 0 <= size and paddr + size <= last:
                    return data[paddr + delta:paddr + delta + size]
                buf = bytearray(size if size > 0 else 0)
                slow(paddr, memoryview(buf), pad, size)
                return bytes(buf)

        def read(paddr: int, size: int, *, pad: bool = False) -> bytes:
            i = find(starts, paddr) - 1
            if i >= 0 and 0 <= size and paddr + size <= ends[i]:
                off = offsets[i]
                if off is None:
                    return bytes(size)
                off += paddr - starts[i]
                return data[off:off + size]
            buf = bytearray(size if size > 0 else 0)
            slow(paddr, memoryview(buf), pad, size)
            return bytes(buf)

        def read_into(paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
            out = memoryview(buf).cast("B")
            size = len(out)
            i = find(starts, paddr) - 1
            if i >= 0 and paddr + size <= ends[i]:
                off = offsets[i]
                if off is None:
                    out[:] = bytes(size)
                else:
                    off += paddr - starts[i]
                    out[:] = view[off:off + size]
                return
            slow(paddr, out, pad, size)

        self.read = read_one if len(starts) == 1 and offsets[0] is not None else read
        self.read_into = read_into

    def view(self, paddr: int, size: int) -> memoryview:
        """A zero-copy view of ``size`` bytes at ``paddr`` inside one file-backed run.

        Release the view before :meth:`close` (an exported view keeps the mapping alive).

        Raises:
            PhysicalReadError: the range is not wholly inside one file-backed run.
        """
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i < 0 or size < 0 or paddr + size > self._ends[i] or self._offsets[i] is None:
            raise PhysicalReadError(paddr, size)
        off = self._offsets[i] + paddr - self._starts[i]
        return self._view[off:off + size]

    def _read_slow(self, paddr: int, view: memoryview, pad: bool, size: int) -> None:
        """A read that crosses runs or touches holes: walk the runs piece by piece."""
        if paddr < 0 or size < 0:
            raise ValueError(f"bad physical read {paddr!r}+{size!r}")
        end = paddr + size
        pos = paddr
        i = max(bisect.bisect_right(self._starts, paddr) - 1, 0)
        runs = self.runs
        while pos < end:
            run = runs[i] if i < len(runs) else None
            if run is None or pos < run.start:
                gap_end = end if run is None else min(end, run.start)
                if not pad:
                    raise PhysicalReadError(paddr, size)
                view[pos - paddr:gap_end - paddr] = bytes(gap_end - pos)
                pos = gap_end
                continue
            if pos >= run.end:
                i += 1
                continue
            chunk_end = min(end, run.end)
            dst = view[pos - paddr:chunk_end - paddr]
            if run.file_offset is None:
                dst[:] = bytes(len(dst))
            else:
                off = run.file_offset + pos - run.start
                dst[:] = self._view[off:off + len(dst)]
            pos = chunk_end
            i += 1

    def is_mapped(self, paddr: int, size: int = 1) -> bool:
        """True when every byte of the range is backed."""
        i = bisect.bisect_right(self._starts, paddr) - 1
        pos, end = paddr, paddr + size
        while pos < end:
            if i < 0 or i >= len(self.runs) or pos < self._starts[i] or pos >= self._ends[i]:
                return False
            pos = self._ends[i]
            i += 1
        return True

    def write(self, paddr: int, data: bytes) -> None:
        """Images are read-only."""
        raise UnsupportedOperation(f"{self.format} image {self.path} is read-only")

    # -- description --------------------------------------------------------------------------

    def summary(self) -> list[tuple[str, str]]:
        """Format-specific facts for ``vmwatch info`` as (label, text) pairs, in display order."""
        return []

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the mappings (reads afterwards fail)."""
        self._view.release()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view into the map
                pass

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path!r} runs={len(self.runs)} size={self.size:#x}>"
