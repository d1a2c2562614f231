"""Hostile 32-bit Windows memory and files: one clear error or a bounded, flagged result, never a
hang or a traceback. Guests are built around libwine:i386's real PE32 ntoskrnl (PAE paging)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwatch.errors import GuestDataError, KernelNotFound, PEFormatError, SymbolError, VmwatchError
from vmwatch.memory import BufferMemory
from vmwatch.os.windows import kdbg as kdbg_mod
from vmwatch.os.windows.kernel import Windows
from vmwatch.testing.cli import run_cli
from vmwatch.testing.windowsguest import KERNEL_PA, X86, WindowsGuest

UNMAPPED = 0x9FF00000
"""An x86 kernel address no page table of the builder maps."""


def _guest(wine_pe32, **options) -> WindowsGuest:
    g = WindowsGuest(wine_pe32["ntoskrnl.exe"], hal=wine_pe32["hal.dll"], **options)
    g.build_objects()
    return g


@pytest.fixture
def guest(wine_pe32) -> WindowsGuest:
    return _guest(wine_pe32)


def _win(guest: WindowsGuest, cpu: bool = True) -> Windows:
    return Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,) if cpu else ())


def _one_line(r) -> bool:
    return r.status == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


class TestLists:
    def test_process_cycle(self, guest):
        """A 32-bit ActiveProcessLinks cycle that skips the head: what was read, and the cycle flagged."""
        links = guest.profile.eprocess["ActiveProcessLinks"]
        guest.put_ptr(guest.processes[2].address + links, guest.processes[1].address + links)
        tasks = _win(guest).tasks()
        assert [t.pid for t in tasks] == [4, 256, 348] and any("cycle" in s for s in tasks.skipped)

    def test_module_cycle_onto_itself(self, guest):
        """A KLDR entry whose Flink is itself: one entry read, the cycle flagged."""
        first = guest.ptr_at(guest.module_head)
        guest.put_ptr(first, first)
        modules = _win(guest).modules()
        assert [m.name for m in modules] == ["ntoskrnl.exe"] and any("cycle" in s for s in modules.skipped)

    def test_flink_outside_ram(self, guest):
        """A Flink to an unmapped page: the processes before it, and the break flagged."""
        links = guest.profile.eprocess["ActiveProcessLinks"]
        guest.put_ptr(guest.processes[1].address + links, UNMAPPED)
        tasks = _win(guest).tasks()
        assert [t.pid for t in tasks] == [4, 256] and any("unreadable" in s for s in tasks.skipped)

    def test_module_name_outside_ram(self, guest):
        """A BaseDllName.Buffer (32-bit, at +4) pointing nowhere skips that driver with a warning."""
        entry = guest.ptr_at(guest.module_head)
        guest.put_ptr(entry + guest.profile.ldr["BaseDllName"] + 4, UNMAPPED)
        modules = _win(guest).modules()
        assert [m.name for m in modules] == ["hal.dll", "fakedrv.sys"] and len(modules.skipped) == 1

    def test_absurd_ssdt_limit(self, guest):
        """An x86 KeServiceDescriptorTable Limit (at +8) of 2**32-1: an error, not a 16 GiB read."""
        guest.put_u32(guest.ksym("KeServiceDescriptorTable") + 8, 0xFFFFFFFF)
        with pytest.raises(GuestDataError, match="absurd Limit"):
            _win(guest).syscalls()

    def test_kpcr_that_does_not_point_back(self, guest, tmp_path):
        """KiProcessorBlock[0] aimed at pool garbage: idt on the dump is exit 2, one line."""
        guest.put_ptr(guest.processor_block, guest.kpcr + 0x1000)
        (tmp_path / "x86.dmp").write_bytes(guest.crashdump())
        r = run_cli("idt", tmp_path / "x86.dmp")
        assert _one_line(r) and "does not point back at itself" in r.stderr, r.stderr


class TestKernel:
    def test_kernbase_not_a_32_bit_pointer(self, guest):
        """KDBG.KernBase with garbage in its upper half (neither sign- nor zero-extended): the
        block is rejected; without CPU state that is one clear error."""
        struct.pack_into("<Q", guest.buffer, guest.paddr(guest.kdbg_vaddr) + 0x18, 0x12345678_82A00000)
        with pytest.raises(SymbolError, match="neither CPU state"):
            _win(guest, cpu=False)
        assert "KDBG" not in {f.what for f in _win(guest).kernel.found}

    def test_truncated_pe32_headers(self, guest):
        """The PE32 header page zeroed past the PE signature: no kernel, one error."""
        lfanew = struct.unpack_from("<I", guest.buffer, KERNEL_PA + 0x3C)[0]
        guest.buffer[KERNEL_PA + lfanew + 0x18:KERNEL_PA + 0x1000] = bytes(0x1000 - lfanew - 0x18)
        with pytest.raises(KernelNotFound):
            _win(guest, cpu=False)

    def test_export_names_cut(self, guest):
        """ntoskrnl's name pointer table zeroed (an image cut inside .edata): its name still reads,
        its exports do not: one PEFormatError, on the API and as one CLI line."""
        names_rva = struct.unpack_from("<I", guest.buffer, KERNEL_PA + _export_rva(guest) + 32)[0]
        guest.buffer[KERNEL_PA + names_rva:KERNEL_PA + names_rva + 0x1000] = bytes(0x1000)
        with pytest.raises(PEFormatError, match="outside the image"):
            _win(guest)

    def test_file_cut_inside_the_kernel(self, guest, tmp_path):
        """A raw image that ends 0x30000 bytes into ntoskrnl: exit 2 and one line for every command."""
        path = tmp_path / "cut.raw"
        path.write_bytes(guest.raw()[:KERNEL_PA + 0x30000])
        for command in ("ps", "modules", "syscalls", "idt"):
            r = run_cli(command, path)
            assert _one_line(r), (command, r.stderr)

    def test_pae_flag_that_lies(self, guest, tmp_path):
        """A PAGEDUMP header claiming 32-bit paging for a PAE DTB: one line, no garbage list."""
        data = bytearray(guest.crashdump())
        data[0x5C] = 0
        (tmp_path / "lie.dmp").write_bytes(data)
        r = run_cli("ps", tmp_path / "lie.dmp")
        assert _one_line(r) and "in 32-bit paging does not map the kernel base" in r.stderr, r.stderr


def _export_rva(guest: WindowsGuest) -> int:
    lfanew = struct.unpack_from("<I", guest.buffer, KERNEL_PA + 0x3C)[0]
    return struct.unpack_from("<I", guest.buffer, KERNEL_PA + lfanew + 0x18 + 96)[0]


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(raw=st.binary(min_size=kdbg_mod.READ, max_size=kdbg_mod.READ), size=st.integers(0, 2**32 - 1),
           kernbase=st.integers(0, 2**64 - 1))
    def test_kdbg_block_32(self, raw, size, kernbase):
        """Any block parsed as a 32-bit kernel's: GuestDataError, or every field a 32-bit value."""
        raw = bytearray(raw)
        raw[0x10:0x18] = kdbg_mod.TAG + struct.pack("<I", size)
        struct.pack_into("<Q", raw, 0x18, kernbase)
        try:
            block = kdbg_mod.parse(bytes(raw), vaddr=0x82A57400, paddr=None, bits=32)
        except GuestDataError:
            return
        assert all(0 <= v < 1 << 32 for v in block.fields.values())
        assert block.fields["KernBase"] >= kdbg_mod.KERNEL_SPACE_X86

    @settings(max_examples=60, deadline=None)
    @given(targets=st.lists(st.sampled_from(["head", "self", "next", "first", "unmapped", "misaligned", "null"]),
                            min_size=4, max_size=4))
    def test_rewired_process_links(self, shared_guest, targets):
        """Each EPROCESS Flink rewired anywhere (the head, itself, another node, unmapped, NULL,
        4 bytes off): the walk ends, at most every node once, problems in ``skipped``."""
        g = shared_guest
        links = g.profile.eprocess["ActiveProcessLinks"]
        nodes = [p.address + links for p in g.processes]
        saved = bytes(g.buffer)
        try:
            for i, (node, where) in enumerate(zip(nodes, targets)):
                target = {"head": g.process_head, "self": node, "next": nodes[(i + 1) % len(nodes)],
                          "first": nodes[0], "unmapped": UNMAPPED, "misaligned": nodes[(i + 2) % len(nodes)] + 4,
                          "null": 0}[where]
                g.put_ptr(node, target)
            tasks = Windows.from_memory(BufferMemory(g.buffer), (g.registers,)).tasks()
            assert len(tasks) <= 2 * len(nodes)
            assert all(isinstance(s, str) for s in tasks.skipped)
        finally:
            g.buffer[:] = saved


@pytest.fixture(scope="module")
def shared_guest(wine_pe32) -> WindowsGuest:
    """One guest for every example (rebuilding 64 MiB per example would be the test's whole time):
    each example restores what it changed."""
    return _guest(wine_pe32)


@pytest.fixture(scope="module")
def dump(wine_pe32, tmp_path_factory):
    """A 32-bit bitmap (DumpType 5) dump of a 48 MiB PAE guest."""
    g = WindowsGuest(wine_pe32["ntoskrnl.exe"], memory_size=48 << 20)
    g.build_objects()
    path = tmp_path_factory.mktemp("fuzz32") / "x86.dmp"
    path.write_bytes(g.crashdump(dump_type=5))
    return path


class TestDumpHeaderFuzz:
    HOT = (0x10, 0x18, 0x1C, 0x20, 0x24, 0x5C, 0x60, 0x64, 0x68, 0x6C, 0x70, 0xF88,
           0x1000, 0x1020, 0x1030, 0x1038)
    """DirectoryTableBase, the list heads, Machine, processors, PaeEnabled, KdDebuggerDataBlock,
    NumberOfRuns/Pages, the first run, DumpType, and the SDMP header (signature, first page, bits, bitmap)."""

    @settings(max_examples=80, deadline=None)
    @given(pokes=st.lists(st.tuples(st.sampled_from(HOT) | st.integers(8, 0x1040),
                                    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF])
                                    | st.integers(0, 2**32 - 1)), min_size=1, max_size=6))
    def test_mutated_pagedump(self, dump, pokes):
        """A 32-bit bitmap dump with its header and bitmap header poked: open and walk it, or one
        VmwatchError; lists stay bounded."""
        from vmwatch.images import open_image

        original = dump.read_bytes()[:0x1100]
        data = bytearray(original)
        for pos, value in pokes:
            struct.pack_into("<I", data, pos, value)
        with open(dump, "r+b") as f:
            f.write(data)
        try:
            with open_image(dump) as image:
                win = Windows.from_memory(image, image.cpus)
                for listing in (win.tasks(), win.modules()):
                    assert len(listing) <= 1 << 16
        except VmwatchError:
            pass
        finally:
            with open(dump, "r+b") as f:
                f.write(original)


def test_plain_32_bit_paging_guest_with_cycle(wine_pe32):
    """The same cycle on a guest in plain 32-bit paging (4-byte entries): bounded, flagged."""
    g = _guest(wine_pe32, pae=False)
    links = g.profile.eprocess["ActiveProcessLinks"]
    g.put_ptr(g.processes[3].address + links, g.processes[0].address + links)
    tasks = _win(g, cpu=False).tasks()
    assert [t.pid for t in tasks] == [4, 256, 348, 1236] and any("cycle" in s for s in tasks.skipped)
    assert g.fake.mode.value == "32-bit" and X86.bits == 32
