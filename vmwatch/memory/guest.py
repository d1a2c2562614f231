"""GuestMemory: read a guest by virtual address, with every cache wired in.

Theory of operation: ``translate`` probes the TLB inline (two dict lookups), and only on a miss
walks the page tables through the page cache. Reads inside one page translate once and slice
one cached physical page; reads that cross pages go page by page so a hole names the exact
faulting address. Nothing here awaits: a read is a few hundred nanoseconds, far less than a
trio checkpoint would cost.

Invalidation: a dump never changes, so its caches are never stale. A live source says
``volatile = True``; its owner calls :meth:`GuestMemory.on_resume` whenever the guest has run,
which drops translations, cached pages and pid->dtb entries (symbols stay: kernel text does not
move). Our own writes go through the page cache and drop the TLB.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator

from vmwatch.cpu import PagingMode, Registers
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import GuestDataError, PhysicalReadError, TranslationError, UnsupportedOperation
from vmwatch.memory.aarch64 import Aarch64Walker
from vmwatch.memory.cache import PidDtbCache, SymbolCache, Tlb
from vmwatch.memory.paging import Mapping, Walker, spec_from_registers
from vmwatch.memory.physical import PAGE_MASK, PAGE_SIZE, CachedPhysicalMemory, PhysicalMemory

MAX_READ = 1 << 30
"""Larger reads are refused: a length that big came from corrupt guest data."""

_U64_MASK = (1 << 64) - 1


def _int_reader(fmt: str, doc: str):
    unpack = struct.Struct(fmt).unpack_from
    size = struct.calcsize(fmt)
    last = PAGE_SIZE - size

    def read_int(self: GuestMemory, vaddr: int, cr3: int | None = None) -> int:
        if vaddr & PAGE_MASK <= last:
            paddr = self.translate(vaddr, cr3)
            try:
                return unpack(self._page(paddr >> 12), paddr & PAGE_MASK)[0]
            except PhysicalReadError:
                return unpack(self._read_partial_page(vaddr, paddr, size, cr3), 0)[0]
        return unpack(self.read(vaddr, size, cr3), 0)[0]

    read_int.__doc__ = doc + "\n\n        Raises:\n            TranslationError: the address is not mapped (PageNotPresent) or not backed.\n        "
    return read_int


class GuestMemory:
    """Virtual and physical reads of one guest, cached.

    Args:
        phys: physical memory of any source (wrapped in a page cache unless it already is one).
        cr3: default page-table root for kernel reads (else taken from ``registers``).
        mode: paging mode (else from ``registers``; 4-level if only ``cr3`` is given, none if
            neither is).
        registers: vCPU registers to take CR3, CR4 and the paging mode from; AArch64 ones give
            TCR_EL1 and TTBR1_EL1 (then ``cr3`` means a TTBR0 value, the user root).
        page_cache: how many 4 KiB pages the page cache keeps.
    """

    def __init__(
        self,
        phys: PhysicalMemory,
        *,
        cr3: int | None = None,
        mode: PagingMode | None = None,
        registers: Registers | Aarch64Registers | None = None,
        page_cache: int = 4096,
    ) -> None:
        self.phys = phys if isinstance(phys, CachedPhysicalMemory) else CachedPhysicalMemory(phys, capacity=page_cache)
        self._page = self.phys.page
        self.tlb = Tlb()
        self._tlb_sets = self.tlb.sets
        self.symbols = SymbolCache()
        self.pid_dtb = PidDtbCache()
        if getattr(registers, "arch", None) == "aarch64":
            self._init_aarch64(registers, cr3)
            return
        cr4 = None
        if registers is not None:
            cr3 = registers.cr3 if cr3 is None else cr3
            mode = registers.paging_mode if mode is None else mode
            cr4 = registers.cr4
        if mode is None:
            mode = PagingMode.LEVEL4 if cr3 is not None else PagingMode.NONE
        self.mode = mode
        spec = spec_from_registers(mode, cr4)
        self._walker = Walker(spec, self.phys) if spec is not None else None
        self._kernel_cr3 = cr3
        wide = spec is None or spec.entry_size == 8 and mode is not PagingMode.PAE
        self.pointer_size = 8 if wide else 4
        self.pointer = self.u64 if wide else self.u32
        if self._walker is None:
            self.translate = self._identity  # type: ignore[method-assign]
        else:
            self._walk = self._walker.translate

    def _init_aarch64(self, registers: Aarch64Registers, ttbr0: int | None) -> None:
        """AArch64 stage 1 from TCR_EL1 and TTBR1_EL1; ``cr3`` arguments are TTBR0 values.

        The default root is TTBR0_EL1 (kernel addresses ignore it; user ones follow it).
        """
        if registers.tcr_el1 is None or registers.ttbr1_el1 is None:
            raise TranslationError(0, 0, "aarch64 registers without TCR_EL1/TTBR1_EL1: the kernel's page tables "
                                   "are unknown (vmwatch.os.linux.swapper finds them in a dump)")
        self.mode = PagingMode.AARCH64
        self._walker = Aarch64Walker(registers.tcr_el1, registers.ttbr1_el1, self.phys)
        self._walk = self._walker.translate
        self._kernel_cr3 = (registers.ttbr0_el1 or 0) if ttbr0 is None else ttbr0
        self.pointer_size = 8
        self.pointer = self.u64

    # -- translation --------------------------------------------------------------------------

    @property
    def kernel_cr3(self) -> int | None:
        """The default page-table root for kernel virtual reads."""
        return self._kernel_cr3

    @kernel_cr3.setter
    def kernel_cr3(self, cr3: int) -> None:
        self._kernel_cr3 = cr3

    def translate(self, vaddr: int, cr3: int | None = None) -> int:
        """The physical address of virtual ``vaddr`` under page-table root ``cr3`` (default: kernel).

        Raises:
            PageNotPresent: a paging entry on the walk is not present.
            TranslationError: non-canonical address, reserved bits, tables outside memory.
        """
        if cr3 is None:
            cr3 = self._kernel_cr3
        entries = self._tlb_sets.get(cr3)
        if entries is not None:
            frame = entries.get(vaddr >> 12)
            if frame is not None:
                self.tlb.hits += 1
                return frame | (vaddr & 0xFFF)
        return self._translate_miss(vaddr, cr3)

    def _translate_miss(self, vaddr: int, cr3: int | None) -> int:
        tlb = self.tlb
        tlb.misses += 1
        if cr3 is None:
            raise TranslationError(vaddr, 0, f"cannot translate {vaddr:#x}: no page-table root (pass cr3= or registers=)")
        paddr = self._walk(vaddr, cr3)
        entries = self._tlb_sets.get(cr3)
        if entries is not None and len(entries) < tlb.max_entries:
            entries[vaddr >> 12] = paddr & ~0xFFF
        else:
            tlb.insert(cr3, vaddr >> 12, paddr & ~0xFFF)
        return paddr

    def _identity(self, vaddr: int, cr3: int | None = None) -> int:
        if vaddr < 0 or vaddr >> 52:
            raise TranslationError(vaddr, cr3 or 0, f"{vaddr:#x} is not a physical address (paging is off)")
        return vaddr

    def lookup(self, vaddr: int, cr3: int | None = None) -> Mapping:
        """The leaf mapping holding ``vaddr`` with its page size and rights (uncached)."""
        cr3 = self._kernel_cr3 if cr3 is None else cr3
        if self._walker is None:
            base = self._identity(vaddr) & ~PAGE_MASK
            return Mapping(base, base, PAGE_SIZE, True, True, False)
        if cr3 is None:
            raise TranslationError(vaddr, 0, f"cannot translate {vaddr:#x}: no page-table root")
        return self._walker.lookup(vaddr, cr3)

    def mappings(
        self, cr3: int | None = None, *, start: int = 0, end: int | None = None, max_tables: int = 1 << 16
    ) -> Iterator[Mapping]:
        """Every present page of an address space in ``[start, end)``, in address order.

        Raises:
            GuestDataError: the tables alias or loop so much that more than ``max_tables``
                tables would be read.
        """
        cr3 = self._kernel_cr3 if cr3 is None else cr3
        if self._walker is None:
            for run in self.phys.runs:
                if run.start + run.size > start and (end is None or run.start < end):
                    yield Mapping(run.start, run.start, run.size, True, True, False)
            return
        if cr3 is None:
            raise TranslationError(start, 0, "cannot enumerate mappings: no page-table root")
        yield from self._walker.mappings(cr3, start=start, end=end, max_tables=max_tables)

    # -- reads ----------------------------------------------------------------------------------

    def read_phys(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        """``size`` bytes of guest-physical memory (through the page cache).

        Raises:
            PhysicalReadError: part of the range is not backed and ``pad`` is false.
        """
        return self.phys.read(paddr, size, pad=pad)

    def read(self, vaddr: int, size: int, cr3: int | None = None, *, pad: bool = False) -> bytes:
        """``size`` bytes at virtual ``vaddr``; ``pad=True`` reads unmapped pages as zeros.

        Raises:
            TranslationError: (or PageNotPresent) naming the first virtual address that is not
                mapped or not backed, unless ``pad``.
            GuestDataError: ``size`` is absurd (over 1 GiB).
        """
        if not 0 < size <= MAX_READ:
            if size == 0:
                return b""
            raise GuestDataError(f"refusing to read {size:#x} bytes at {vaddr:#x}")
        off = vaddr & PAGE_MASK
        if off + size <= PAGE_SIZE and not pad:
            paddr = self.translate(vaddr, cr3)
            try:
                return self._page(paddr >> 12)[off : off + size]
            except PhysicalReadError:
                return self._read_partial_page(vaddr, paddr, size, cr3)
        out = bytearray(size)
        view = memoryview(out)
        pos = 0
        while pos < size:
            addr = (vaddr + pos) & _U64_MASK
            step = min(size - pos, PAGE_SIZE - (addr & PAGE_MASK))
            try:
                paddr = self.translate(addr, cr3)
                self.phys.read_into(paddr, view[pos : pos + step])
            except TranslationError:
                if not pad:
                    raise
            except PhysicalReadError:
                if not pad:
                    raise self._unbacked(addr, paddr, cr3) from None
            pos += step
        return bytes(out)

    def read_many(self, requests: Iterable[tuple[int, int]], cr3: int | None = None) -> list[bytes | None]:
        """Batched virtual reads: one result per (vaddr, size), ``None`` where any byte is not
        mapped or not backed. All physical pieces go to the source in one ``read_many`` (one
        round trip for a gdbstub source).
        """
        results: list[bytes | None] = []
        pieces: list[tuple[int, int]] = []
        spans: list[tuple[int, int] | None] = []  # per request: its slice of ``pieces``
        for vaddr, size in requests:
            if not 0 <= size <= MAX_READ:
                raise GuestDataError(f"refusing to read {size:#x} bytes at {vaddr:#x}")
            first = len(pieces)
            pos = 0
            try:
                while pos < size:
                    addr = (vaddr + pos) & _U64_MASK
                    step = min(size - pos, PAGE_SIZE - (addr & PAGE_MASK))
                    pieces.append((self.translate(addr, cr3), step))
                    pos += step
            except TranslationError:
                del pieces[first:]
                spans.append(None)
                continue
            spans.append((first, len(pieces)))
        data = self.phys.read_many(pieces) if pieces else []
        for span in spans:
            if span is None:
                results.append(None)
                continue
            parts = data[span[0] : span[1]]
            results.append(None if any(p is None for p in parts) else b"".join(parts))
        return results

    def _read_partial_page(self, vaddr: int, paddr: int, size: int, cr3: int | None) -> bytes:
        try:
            return self.phys.inner.read(paddr, size)
        except PhysicalReadError:
            raise self._unbacked(vaddr, paddr, cr3) from None

    def _unbacked(self, vaddr: int, paddr: int, cr3: int | None) -> TranslationError:
        cr3 = self._kernel_cr3 if cr3 is None else cr3
        return TranslationError(
            vaddr, cr3 or 0, f"{vaddr:#x} maps to physical {paddr:#x}, which is not backed (cr3 {cr3 or 0:#x})"
        )

    u8 = _int_reader("<B", "Unsigned byte at ``vaddr``.")
    u16 = _int_reader("<H", "Unsigned little-endian 16-bit integer at ``vaddr``.")
    u32 = _int_reader("<I", "Unsigned little-endian 32-bit integer at ``vaddr``.")
    u64 = _int_reader("<Q", "Unsigned little-endian 64-bit integer at ``vaddr``.")
    s32 = _int_reader("<i", "Signed little-endian 32-bit integer at ``vaddr``.")
    s64 = _int_reader("<q", "Signed little-endian 64-bit integer at ``vaddr``.")

    def chain(self, vaddr: int, offsets: Iterable[int], cr3: int | None = None) -> int:
        """Follow a pointer chain: ``p = vaddr``, then ``p = pointer(p + offset)`` per offset.

        ``chain(v, [0])`` is ``pointer(v)``; ``chain(v, [a, b])`` is ``*(*(v + a) + b)``.

        Raises:
            GuestDataError: a NULL pointer is met before the last step.
            TranslationError: a pointer leads to an unmapped address.
        """
        mask = (1 << (8 * self.pointer_size)) - 1
        p = vaddr
        for step, offset in enumerate(offsets):
            if step and not p:
                raise GuestDataError(f"pointer chain from {vaddr:#x} hit NULL at step {step}")
            p = self.pointer((p + offset) & mask, cr3)
        return p

    def cstring(self, vaddr: int, max_len: int = 256, cr3: int | None = None) -> str:
        """A NUL-terminated string of at most ``max_len`` bytes (UTF-8, bad bytes replaced).

        Reads page by page so a string that ends before an unmapped page is still read.
        """
        out = bytearray()
        pos = vaddr
        while len(out) < max_len:
            step = min(max_len - len(out), PAGE_SIZE - (pos & PAGE_MASK))
            data = self.read(pos, step, cr3)
            nul = data.find(0)
            if nul >= 0:
                out += data[:nul]
                break
            out += data
            pos += step
        return out.decode("utf-8", "replace")

    def utf16(self, vaddr: int, max_len: int = 256, cr3: int | None = None) -> str:
        """A UTF-16LE string ending at a 0 unit, of at most ``max_len`` code units."""
        units = bytearray()
        pos = vaddr
        limit = 2 * max_len
        while len(units) < limit:
            step = min(limit - len(units), PAGE_SIZE - (pos & PAGE_MASK)) & ~1 or 2
            data = self.read(pos, step, cr3)
            for i in range(0, len(data), 2):
                if data[i] == 0 and data[i + 1] == 0:
                    units += data[:i]
                    return units.decode("utf-16-le", "replace")
            units += data
            pos += step
        return units.decode("utf-16-le", "replace")

    # -- symbols and processes ----------------------------------------------------------------

    def read_symbol(self, name: str, size: int) -> bytes:
        """``size`` bytes at symbol ``name`` (resolved through :attr:`symbols`)."""
        return self.read(self.symbols.get(name), size)

    def u64_symbol(self, name: str) -> int:
        """The 64-bit value at symbol ``name``."""
        return self.u64(self.symbols.get(name))

    def read_user(self, pid: int, vaddr: int, size: int, *, pad: bool = False) -> bytes:
        """``size`` bytes at ``vaddr`` in process ``pid``'s address space (via :attr:`pid_dtb`)."""
        return self.read(vaddr, size, self.pid_dtb.get(pid), pad=pad)

    # -- writes -----------------------------------------------------------------------------------

    def write(self, vaddr: int, data: bytes, cr3: int | None = None) -> None:
        """Write ``data`` at virtual ``vaddr`` (only when the source was opened writable).

        Every page is translated before any byte is written, so an unmapped page fails the
        whole write. The TLB is flushed afterwards in case the write changed page tables.

        Raises:
            UnsupportedOperation: the source is read-only.
            TranslationError: part of the range is not mapped.
        """
        if not self.phys.writable:
            raise UnsupportedOperation("guest memory was not opened for writing")
        pieces = []
        pos = 0
        while pos < len(data):
            addr = vaddr + pos
            step = min(len(data) - pos, PAGE_SIZE - (addr & PAGE_MASK))
            pieces.append((self.translate(addr, cr3), pos, step))
            pos += step
        for paddr, pos, step in pieces:
            self.phys.write(paddr, data[pos : pos + step])
        self.tlb.flush()

    # -- cache control ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Drop every cache (translations, pages, pid->dtb, symbols)."""
        self.tlb.flush()
        self.phys.flush()
        self.pid_dtb.flush()
        self.symbols.flush()

    def on_resume(self) -> None:
        """The guest ran: drop what may be stale (nothing for a non-volatile source)."""
        if self.phys.volatile:
            self.tlb.flush()
            self.phys.flush()
            self.pid_dtb.flush()

    def stats(self) -> dict[str, dict[str, int]]:
        """Hit/miss counters and sizes of every cache."""
        return {
            "tlb": self.tlb.stats(),
            "pages": self.phys.stats(),
            "pid_dtb": self.pid_dtb.stats(),
            "symbols": self.symbols.stats(),
        }
