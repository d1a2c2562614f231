"""FakeGuest: page tables of any x86 paging mode, built in a bytearray from a seeded RNG.

Like memflow's ``dummy`` OS: no VM, just physical memory laid out the way a CPU expects, plus
the list of mappings that were written, so tests can check a translator against known truth.
Page-table pages are allocated from the top of memory down; 4 KiB data pages point at random
frames in the lower half (filled with random bytes); large pages may point past the end of
memory (translation works, reads fail as unbacked).
"""

from __future__ import annotations

import random

from vmwatch.cpu import CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE
from vmwatch.cpu import PagingMode, Registers
from vmwatch.memory.guest import GuestMemory
from vmwatch.memory.paging import Mapping, spec_for
from vmwatch.memory.physical import BufferMemory

_P, _RW, _US, _PS = 1, 2, 4, 0x80
_NX = 1 << 63


class FakeGuest:
    """Physical memory holding one address space of ``mode``.

    Args:
        mode: the paging mode to build tables for.
        seed: seeds the RNG for contents, addresses and rights.
        memory_size: bytes of physical memory (a multiple of 4 KiB).
        pse: for 32-bit paging, whether 4 MiB pages are allowed (CR4.PSE).
        writable: whether :attr:`memory` accepts writes.
    """

    def __init__(
        self,
        mode: PagingMode = PagingMode.LEVEL4,
        *,
        seed: int = 0,
        memory_size: int = 8 << 20,
        pse: bool = True,
        writable: bool = False,
    ) -> None:
        self.mode = mode
        self.spec = spec_for(mode, pse=pse)
        if self.spec is None:
            raise ValueError(f"FakeGuest needs a paging mode, not {mode!r}")
        self.pse = pse
        self.rng = random.Random(seed)
        self.buffer = bytearray(self.rng.randbytes(memory_size))
        self.memory = BufferMemory(self.buffer, writable=writable)
        self.expected: list[Mapping] = []
        self._next_table = memory_size
        root = self.alloc_table()
        if mode is PagingMode.PAE:
            root += 0x20 * self.rng.randrange(128)  # a PDPT only needs 32-byte alignment
            self.buffer[root : root + 32] = bytes(32)
        self.cr3 = root

    # -- building ---------------------------------------------------------------------------------

    def alloc_table(self) -> int:
        """A zeroed 4 KiB page for a paging structure; returns its physical address."""
        self._next_table -= 0x1000
        if self._next_table < len(self.buffer) // 2:
            raise MemoryError("FakeGuest ran out of page-table pages")
        self.buffer[self._next_table : self._next_table + 0x1000] = bytes(0x1000)
        return self._next_table

    def get_entry(self, paddr: int) -> int:
        """The paging entry stored at physical ``paddr``."""
        return int.from_bytes(self.buffer[paddr : paddr + self.spec.entry_size], "little")

    def set_entry(self, paddr: int, value: int) -> None:
        """Overwrite the paging entry at physical ``paddr`` (to build hostile tables)."""
        self.buffer[paddr : paddr + self.spec.entry_size] = value.to_bytes(self.spec.entry_size, "little")

    def entry_address(self, vaddr: int, depth: int) -> int:
        """Physical address of the entry for ``vaddr`` in the table at ``depth`` (0 = top level),
        following the tables as they are now."""
        spec = self.spec
        base = self.cr3
        for level in spec.levels[: depth + 1]:
            ea = base + ((vaddr >> level.shift) & ((1 << level.bits) - 1)) * spec.entry_size
            base = self.get_entry(ea) & spec.addr_mask
        return ea

    def page_sizes(self) -> list[int]:
        """Page sizes this mode can map."""
        return [1 << lv.shift for lv in self.spec.levels if lv.large] + [0x1000]

    def map(
        self, vaddr: int, paddr: int, size: int, *, writable: bool = True, user: bool = False, nx: bool = False
    ) -> Mapping | None:
        """Map one page; returns its effective Mapping, or None if the range is already used.

        Intermediate entries get random rights when created, so effective rights differ from
        the leaf's: the returned Mapping has the AND/OR over the whole path.
        """
        spec = self.spec
        esize = spec.entry_size
        lin = vaddr & ((1 << spec.va_bits) - 1)
        base = self.cr3
        eff_w, eff_u, eff_nx = writable, user, nx
        for depth, level in enumerate(spec.levels):
            ea = base + ((lin >> level.shift) & ((1 << level.bits) - 1)) * esize
            entry = self.get_entry(ea)
            pdpte = spec.mode is PagingMode.PAE and depth == 0
            if 1 << level.shift == size:
                if entry & _P:
                    return None
                value = paddr & spec.addr_mask & ~(size - 1) | _P
                if size > 0x1000:
                    value |= _PS
                    if spec.mode is PagingMode.BITS32:
                        value |= ((paddr >> 32) & 0xFF) << 13
                value |= (_RW if writable else 0) | (_US if user else 0) | (_NX if nx and esize == 8 else 0)
                self.set_entry(ea, value)
                mapping = Mapping(vaddr, paddr, size, eff_w, eff_u, eff_nx if esize == 8 else False)
                self.expected.append(mapping)
                return mapping
            if entry & _P:
                if level.large and entry & _PS:
                    return None
            else:
                rights = 0 if pdpte else _RW * (self.rng.random() < 0.8) | _US * (self.rng.random() < 0.8)
                nxbit = _NX if esize == 8 and not pdpte and self.rng.random() < 0.2 else 0
                entry = self.alloc_table() | _P | rights | nxbit
                self.set_entry(ea, entry)
            if not pdpte:
                eff_w = eff_w and bool(entry & _RW)
                eff_u = eff_u and bool(entry & _US)
                eff_nx = eff_nx or bool(entry & _NX)
            base = entry & spec.addr_mask
        raise ValueError(f"page size {size:#x} is not one of {self.page_sizes()} for {spec.mode.value} paging")

    def random_vaddr(self, size: int) -> int:
        """A canonical virtual address aligned to ``size``, clustered so tables get shared."""
        spec = self.spec
        top = spec.levels[0]
        if size >= 1 << top.shift:
            index = self.rng.randrange(1 << top.bits)
        else:
            index = self.rng.choice((0, 1, (1 << top.bits) - 1, (1 << top.bits) >> 1))
        low = self.rng.randrange(1 << top.shift) & ~(size - 1)
        if self.rng.random() < 0.7:
            low &= (1 << (top.shift - 3)) - 1  # stay near the start of the region: share tables
        lin = (index << top.shift) | low
        if spec.canonical and lin >> (spec.va_bits - 1):
            lin |= ((1 << 64) - 1) ^ ((1 << spec.va_bits) - 1)
        return lin

    def random_paddr(self, size: int) -> int:
        """A frame for a page of ``size``: inside the data half for 4 KiB, anywhere for large."""
        if size == 0x1000:
            return self.rng.randrange(len(self.buffer) // 2 // 0x1000) * 0x1000
        limit = 1 << (40 if self.spec.mode is PagingMode.BITS32 else 46)
        return self.rng.randrange(limit // size) * size

    def map_random(self, count: int = 64) -> list[Mapping]:
        """Map ``count`` random pages of every size the mode has, with random rights."""
        made = []
        sizes = self.page_sizes()
        while len(made) < count:
            size = self.rng.choice(sizes) if self.rng.random() < 0.4 else 0x1000
            mapping = self.map(
                self.random_vaddr(size), self.random_paddr(size), size,
                writable=self.rng.random() < 0.5, user=self.rng.random() < 0.5, nx=self.rng.random() < 0.5,
            )
            if mapping is not None:
                made.append(mapping)
        return made

    # -- what tests use ---------------------------------------------------------------------------

    @property
    def registers(self) -> Registers:
        """vCPU registers a CPU in this mode would have."""
        cr4 = 0
        efer = 0
        if self.pse:
            cr4 |= CR4_PSE
        if self.mode is not PagingMode.BITS32:
            cr4 |= CR4_PAE
            efer |= EFER_NXE
        if self.mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
            efer |= EFER_LME | EFER_LMA
        if self.mode is PagingMode.LEVEL5:
            cr4 |= CR4_LA57
        return Registers(cr0=CR0_PE | CR0_PG | CR0_WP, cr3=self.cr3, cr4=cr4, efer=efer, rip=0)

    def guest_memory(self, **kwargs) -> GuestMemory:
        """A GuestMemory over this guest, configured from :attr:`registers`."""
        return GuestMemory(self.memory, registers=self.registers, **kwargs)
