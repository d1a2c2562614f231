"""Every x86 paging mode and page size on FakeGuest page tables, checked against known truth."""

from __future__ import annotations

import pytest

import paging_reference as reference
from vmwatch.cpu import PagingMode
from vmwatch.errors import GuestDataError, PageNotPresent, TranslationError
from vmwatch.memory import BufferMemory, GuestMemory
from vmwatch.testing.fakeguest import FakeGuest

MODES = [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5]
REFERENCE = {
    PagingMode.BITS32: reference.walk32,
    PagingMode.PAE: reference.walk_pae,
    PagingMode.LEVEL4: reference.walk4,
    PagingMode.LEVEL5: reference.walk5,
}
SIZES = {
    PagingMode.BITS32: {0x1000, 0x400000},
    PagingMode.PAE: {0x1000, 0x200000},
    PagingMode.LEVEL4: {0x1000, 0x200000, 0x40000000},
    PagingMode.LEVEL5: {0x1000, 0x200000, 0x40000000},
}


def _key(m):
    return (m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx)


@pytest.fixture(params=MODES, ids=lambda m: m.value)
def fake(request) -> FakeGuest:
    guest = FakeGuest(request.param, seed=7)
    guest.map_random(120)
    return guest


class TestTranslate:
    def test_every_page_size_is_built(self, fake):
        """The random guest of each mode uses every page size the mode has."""
        assert {m.size for m in fake.expected} == SIZES[fake.mode]

    def test_matches_expected(self, fake):
        """translate() gives the mapped frame plus offset at the start, middle and end of each page."""
        mem = fake.guest_memory()
        for m in fake.expected:
            for off in (0, m.size // 2 + 3, m.size - 1):
                assert mem.translate(m.vaddr + off) == m.paddr + off

    def test_matches_reference_walker(self, fake):
        """translate() agrees with the naive reference walker on random addresses, mapped or not."""
        mem = fake.guest_memory()
        ref = REFERENCE[fake.mode]
        rng = fake.rng
        candidates = [m.vaddr + rng.randrange(m.size) for m in fake.expected]
        candidates += [fake.random_vaddr(0x1000) + rng.randrange(0x1000) for _ in range(300)]
        buf = bytes(fake.buffer)
        for vaddr in candidates:
            want = ref(buf, fake.cr3, vaddr)
            try:
                got = mem.translate(vaddr)
            except PageNotPresent:
                got = None
            assert got == want, hex(vaddr)

    def test_lookup_rights(self, fake):
        """lookup() gives the page's size and rights combined over every level."""
        mem = fake.guest_memory()
        for m in fake.expected:
            assert _key(mem.lookup(m.vaddr + 1)) == _key(m)

    def test_cached_equals_uncached(self, fake):
        """A TLB hit gives the same answer as the walk that filled it."""
        mem = fake.guest_memory()
        first = [mem.translate(m.vaddr) for m in fake.expected]
        assert [mem.translate(m.vaddr) for m in fake.expected] == first
        assert mem.stats()["tlb"]["hits"] >= len(first)

    def test_not_present_names_address(self, fake):
        """An unmapped address raises PageNotPresent naming it, with how much is missing."""
        mem = fake.guest_memory()
        ref = REFERENCE[fake.mode]
        buf = bytes(fake.buffer)
        for _ in range(200):
            vaddr = fake.random_vaddr(0x1000) + 0x123
            if ref(buf, fake.cr3, vaddr) is None:
                break
        with pytest.raises(PageNotPresent) as info:
            mem.translate(vaddr)
        assert info.value.vaddr == vaddr
        assert info.value.invalid_bits >= 12
        assert f"{vaddr:#x}" in str(info.value)


class TestMappings:
    def test_enumerates_everything(self, fake):
        """mappings() yields exactly the pages that were mapped, in address order."""
        mem = fake.guest_memory()
        found = list(mem.mappings())
        assert sorted(map(_key, found)) == sorted(map(_key, fake.expected))
        linear = [m.vaddr & ((1 << fake.spec.va_bits) - 1) for m in found]
        assert linear == sorted(linear)

    def test_range(self, fake):
        """A [start, end) window yields only pages that overlap it."""
        mem = fake.guest_memory()
        ordered = list(mem.mappings())
        mid = ordered[len(ordered) // 2]
        window = list(mem.mappings(start=mid.vaddr, end=mid.vaddr + mid.size))
        assert window == [mid]
        upper = list(mem.mappings(start=mid.vaddr))
        assert upper == ordered[len(ordered) // 2 :]


class TestModes:
    def test_32bit_without_pse(self):
        """With CR4.PSE clear, a PDE's PS bit is ignored and the entry names a page table."""
        fake = FakeGuest(PagingMode.BITS32, seed=3, pse=False)
        fake.map_random(40)
        assert {m.size for m in fake.expected} == {0x1000}
        mem = GuestMemory(fake.memory, registers=fake.registers)
        for m in fake.expected:
            assert mem.translate(m.vaddr + 5) == m.paddr + 5

    def test_pse36_high_bits(self):
        """A 32-bit 4 MiB page can map physical memory above 4 GiB (PSE-36)."""
        fake = FakeGuest(PagingMode.BITS32, seed=1)
        fake.map(0x80400000, 0x12_3440_0000 & ~0x3FFFFF, 0x400000)
        mem = fake.guest_memory()
        assert mem.translate(0x80400123) == (0x12_3440_0000 & ~0x3FFFFF) + 0x123

    def test_mode_from_registers(self):
        """The paging mode comes from CR0/CR4/EFER of the registers."""
        for mode in MODES:
            assert FakeGuest(mode).guest_memory().mode is mode

    def test_no_paging_is_identity(self):
        """Without paging, virtual == physical."""
        mem = GuestMemory(BufferMemory(bytes(range(256)) * 48))
        assert mem.translate(0x1234) == 0x1234
        assert mem.read(0x1FFE, 4) == bytes([254, 255, 0, 1])
        assert [(m.vaddr, m.size) for m in mem.mappings()] == [(0, 0x3000)]

    @pytest.mark.parametrize(
        ("mode", "vaddr"),
        [
            (PagingMode.LEVEL4, 0x0000_8000_0000_0000),
            (PagingMode.LEVEL4, 0xFFFF_7FFF_FFFF_FFFF),
            (PagingMode.LEVEL5, 0x0100_0000_0000_0000),
            (PagingMode.PAE, 0x1_0000_0000),
            (PagingMode.BITS32, -1),
            (PagingMode.LEVEL4, 1 << 64),
        ],
    )
    def test_bad_addresses(self, mode, vaddr):
        """Non-canonical, negative and over-wide addresses raise TranslationError, not a crash."""
        mem = FakeGuest(mode).guest_memory()
        with pytest.raises(TranslationError) as info:
            mem.translate(vaddr)
        assert not isinstance(info.value, PageNotPresent)
        assert info.value.vaddr == vaddr

    def test_la57_addresses_beyond_48_bits(self):
        """5-level paging maps addresses that 4-level paging cannot express."""
        fake = FakeGuest(PagingMode.LEVEL5, seed=2)
        vaddr = 0x00AB_C000_0000_0000
        fake.map(vaddr, 0x5000, 0x1000)
        assert fake.guest_memory().translate(vaddr + 8) == 0x5008


class TestHostileTables:
    def test_entry_outside_memory(self):
        """A table entry pointing past physical memory gives a TranslationError naming the vaddr."""
        fake = FakeGuest(PagingMode.LEVEL4, seed=4)
        fake.map(0x7000_0000, 0x3000, 0x1000)
        # Point the PML4 entry for that address far outside the 8 MiB of memory.
        fake.set_entry(fake.entry_address(0x7000_0000, depth=0), 0x7_0000_0000 | 7)
        mem = fake.guest_memory()
        with pytest.raises(TranslationError) as info:
            mem.translate(0x7000_0010)
        assert info.value.vaddr == 0x7000_0010
        assert "outside physical memory" in str(info.value)
        assert list(mem.mappings()) == []

    def test_reserved_bits_in_large_page(self):
        """A 2 MiB entry with reserved bits 13..20 set is refused."""
        fake = FakeGuest(PagingMode.LEVEL4, seed=5)
        fake.map(0x4000_0000, 0x20_0000, 0x20_0000)
        mem = fake.guest_memory()
        assert mem.translate(0x4000_0000) == 0x20_0000
        pde_addr = fake.entry_address(0x4000_0000, depth=2)
        fake.set_entry(pde_addr, fake.get_entry(pde_addr) | 1 << 15)
        mem.flush()
        with pytest.raises(TranslationError) as info:
            mem.translate(0x4000_0000)
        assert "reserved" in str(info.value)
        assert info.value.level == 2

    def test_reserved_bits_in_pae_pdpte(self):
        """A PAE PDPTE with RW set (a reserved bit there) is refused."""
        fake = FakeGuest(PagingMode.PAE, seed=5)
        fake.map(0x1000, 0x2000, 0x1000)
        fake.set_entry(fake.cr3, fake.get_entry(fake.cr3) | 2)
        with pytest.raises(TranslationError, match="reserved"):
            fake.guest_memory().translate(0x1000)

    @pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
    def test_self_referencing_root(self, mode):
        """Every top-level entry pointing at the root itself: translate ends, enumeration is bounded."""
        fake = FakeGuest(mode, seed=6)
        spec = fake.spec
        count = 1 << spec.levels[0].bits
        rights = 1 if mode is PagingMode.PAE else 7
        for i in range(count):
            fake.set_entry(fake.cr3 + i * spec.entry_size, (fake.cr3 & ~0xFFF) | rights)
        mem = fake.guest_memory()
        try:
            mem.translate(0x1234)
        except TranslationError:
            pass
        found = []
        try:
            for m in mem.mappings(max_tables=2000):
                found.append(m)
        except GuestDataError as exc:
            assert "2000" in str(exc)
        assert len(found) < 2000 * 1024

    def test_aliased_tables_hit_the_cap(self):
        """512 PML4 entries sharing one PDPT whose entries share one PD: GuestDataError, no blow-up."""
        fake = FakeGuest(PagingMode.LEVEL4, seed=8)
        pdpt, pd = fake.alloc_table(), fake.alloc_table()
        for i in range(512):
            fake.set_entry(fake.cr3 + i * 8, pdpt | 7)
            fake.set_entry(pdpt + i * 8, pd | 7)
        fake.set_entry(pd, 0x20_0000 | 0x87)
        mem = fake.guest_memory()
        assert mem.translate(0x4000_0123) == 0x20_0123
        with pytest.raises(GuestDataError):
            for _ in mem.mappings(max_tables=1000):
                pass

    def test_loop_between_levels(self):
        """A PD entry pointing back to the PML4 is skipped by enumeration; translate ends as a CPU would."""
        fake = FakeGuest(PagingMode.LEVEL4, seed=9)
        fake.map(0x20_0000, 0x4000, 0x1000)
        fake.set_entry(fake.entry_address(5 << 21, depth=2), fake.cr3 | 7)  # PD[5] -> PML4 (a loop)
        mem = fake.guest_memory()
        assert [(m.vaddr, m.paddr) for m in mem.mappings()] == [(0x20_0000, 0x4000)]
        # The CPU would take PML4[0] as the PTE: the walk ends at its frame.
        assert mem.translate(5 << 21) == reference.walk4(bytes(fake.buffer), fake.cr3, 5 << 21)
        assert mem.translate(5 << 21) == fake.get_entry(fake.cr3) & 0x000F_FFFF_FFFF_F000


class TestModeFromDumpRegisters:
    def test_long_mode_from_cs_when_efer_unknown(self):
        """Without EFER (QEMU ELF dumps), a 64-bit code segment means IA-32e paging even at a user rip."""
        from vmwatch.cpu import CS_L, Registers, Segment

        common = dict(cr0=0x80050033, cr3=0x1000, rip=0x401000)
        long_user = Registers(cr4=0x6F0, cs=Segment(selector=0x33, attributes=0xA0FB00), **common)
        assert long_user.cs.attributes & CS_L and long_user.paging_mode is PagingMode.LEVEL4
        la57_user = Registers(cr4=0x16F0, cs=Segment(selector=0x33, attributes=0xA0FB00), **common)
        assert la57_user.paging_mode is PagingMode.LEVEL5
        pae_32bit = Registers(cr4=0x6F0, cs=Segment(selector=0x73, attributes=0xCFFB00), **common)
        assert pae_32bit.paging_mode is PagingMode.PAE

    def test_long_mode_from_table_bases_when_efer_and_cs_unknown(self):
        """A VMware checkpoint has neither EFER nor segments: a 64-bit guest paused in user mode
        (rip below 4 GiB) is told by its IDTR, GDTR or CR3 above 4 GiB, which 32-bit modes cannot hold."""
        from vmwatch.cpu import Registers

        user = dict(cr0=0x80050033, cr4=0x6F0, rip=0x528A1C, rsp=0x7FFD268BEA60)
        assert Registers(cr3=0x29E0000, idtr_base=0xFFFFFE0000000000, **user).paging_mode is PagingMode.LEVEL4
        assert Registers(cr3=0x29E0000, gdtr_base=0xFFFFFE0000001000, **user).paging_mode is PagingMode.LEVEL4
        assert Registers(cr3=0x1_0000_0000, **user).paging_mode is PagingMode.LEVEL4
        assert Registers(cr3=0x29E0000, idtr_base=0xC1D5E000, **user).paging_mode is PagingMode.PAE
