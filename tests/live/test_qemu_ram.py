"""Pure parts of the QEMU backend: the RAM map from ``info mtree -f``, register decoding."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwatch.errors import ProtocolError
from vmwatch.images.base import Run
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.qemu_registers import parse_descriptor_tables, registers_from_g
from vmwatch.live.qemu_ram import parse_flatview, ram_runs

# Shape of QEMU 7.2 output for `-M pc -m 4G` with a memory-backend-file "ram" (abridged).
MTREE_4G = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000c9fff (prio 0, rom): ram @00000000000c0000
  00000000000ca000-00000000000cdfff (prio 0, ram): ram @00000000000ca000
  00000000000ce000-00000000000fffff (prio 0, rom): ram @00000000000ce000
  0000000000100000-00000000bfffffff (prio 0, ram): ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000febd0000-00000000febd0fff (prio 1, i/o): vga ioports remapped
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram @00000000c0000000 KVM

FlatView #2
 AS "cpu-smm-0", root: memory
  0000000000000000-00000000ffffffff (prio 0, ram): ram
"""


class TestRamMap:
    def test_above_4g_maps_to_file_offset_3g(self) -> None:
        """RAM above the PCI hole sits at GPA 4 GiB but file offset 3 GiB; the VGA hole is not RAM."""
        assert ram_runs(MTREE_4G, ["ram"]) == (
            Run(start=0, size=0xA0000, file_offset=0),
            Run(start=0xC0000, size=0xC0000000 - 0xC0000, file_offset=0xC0000),
            Run(start=0x100000000, size=0x40000000, file_offset=0xC0000000),
        )

    def test_all_ram_when_no_backend(self) -> None:
        """Without a backend name every RAM/ROM region counts (gdbstub fallback bounds)."""
        names = {r for _, _, kind, r, _ in parse_flatview(MTREE_4G) if kind in ("ram", "rom")}
        assert names == {"ram", "vga.vram", "pc.bios"}
        assert Run(start=0xFFFC0000, size=0x40000, file_offset=0) in ram_runs(MTREE_4G, None)

    def test_only_the_memory_address_space(self) -> None:
        """The SMM view (another address space) is ignored."""
        assert all(r.start != 0 or r.size == 0xA0000 for r in ram_runs(MTREE_4G, ["ram"]))

    @settings(max_examples=150, deadline=None)
    @given(st.text(max_size=400))
    def test_fuzz(self, text: str) -> None:
        """Arbitrary monitor text never raises; it just yields fewer runs."""
        ram_runs(MTREE_4G[:60] + text, None)


INFO_REGISTERS = """RAX=0000000000000000 RBX=0000000000000000
GS =0000 ffff8cf20f800000 00000000 00000000
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=00000000005e3c80 CR3=000000000295a000 CR4=000006f0
"""


class TestRegisters:
    def test_descriptor_tables(self) -> None:
        """GDT/IDT base and limit come from HMP's info registers."""
        assert parse_descriptor_tables(INFO_REGISTERS) == (0xFFFFFE0000001000, 0x7F, 0xFFFFFE0000000000, 0xFFF)
        with pytest.raises(ProtocolError):
            parse_descriptor_tables("RAX=0\n")
        with pytest.raises(ProtocolError):
            parse_descriptor_tables("GDT=  zz 7f\nIDT= 0 0\n")

    def test_g_packet(self) -> None:
        """The 608-byte x86-64 g packet decodes by the target-description layout."""
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)] + ["rip"]
        layout, off, num = {}, 0, 0
        for name, bits in [(n, 64) for n in names] + [("eflags", 32)] + [(s, 32) for s in ("cs", "ss", "ds", "es", "fs", "gs")] + \
                [(n, 64) for n in ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]:
            layout[name] = p.RegisterInfo(name, num, bits, off)
            off += bits // 8
            num += 1
        assert off == 236
        data = b"".join(struct.pack("<Q", i + 1) for i in range(17)) + struct.pack("<I", 0x246) + \
            struct.pack("<6I", 0x10, 0x18, 0, 0, 0, 0x2B) + \
            struct.pack("<9Q", 0x7F00, 0xFFFF888000000000, 0x1234, 0x80050033, 0x5E3C80, 0x295A000, 0x6F0, 0, 0xD01) + bytes(372)
        regs = registers_from_g(data, layout, vcpu=1)
        assert (regs.vcpu, regs.rax, regs.r15, regs.rip, regs.rflags) == (1, 1, 16, 17, 0x246)
        assert regs.cs.selector == 0x10 and regs.gs.selector == 0x2B and regs.gs.base == 0xFFFF888000000000
        assert (regs.kernel_gs_base, regs.cr3, regs.cr4, regs.efer) == (0x1234, 0x295A000, 0x6F0, 0xD01)
        assert regs.paging_mode.value == "4-level"
