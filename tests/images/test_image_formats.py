"""Every format on files built from the published layouts, plus the real samples."""

from __future__ import annotations

import os
import struct

import pytest

from vmwatch.errors import ImageFormatError
from vmwatch.images import open_image
from vmwatch.images.vbox import VBoxImage
from vmwatch.images.vmware import MAGICS, VmwareImage
from vmwatch.testing import imagebuilders as build

PAGE = 4096
REGS = dict(rax=0x1111, rbx=0x2222, rcx=0x3333, rdx=0x4444, rsi=0x5555, rdi=0x6666, rbp=0x7777,
            rsp=0xFFFF888000001000, r8=8, r15=15, rip=0xFFFFFFFF81000000, rflags=0x246,
            cr0=0x80050033, cr2=0x7F0000001000, cr3=0x1AD000, cr4=0x3606F0, cs=0x10, ss=0x18,
            gdtr_base=0xFFFFFE0000001000, gdtr_limit=0x7F, idtr_base=0xFFFFFE0000000000, idtr_limit=0xFFF)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _check_regs(cpu, *, gprs=True):
    if gprs:
        assert (cpu.rax, cpu.rbx, cpu.rcx, cpu.rdx, cpu.rsi, cpu.rdi) == (0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666)
        assert (cpu.rbp, cpu.rsp, cpu.r8, cpu.r15) == (0x7777, 0xFFFF888000001000, 8, 15)
    assert cpu.rip == 0xFFFFFFFF81000000 and cpu.rflags == 0x246
    assert (cpu.cr0, cpu.cr3, cpu.cr4) == (0x80050033, 0x1AD000, 0x3606F0)


class TestRaw:
    def test_raw_is_identity(self, tmp_path):
        """A raw file maps physical address == file offset."""
        data = os.urandom(4 * PAGE)
        with open_image(_write(tmp_path, "m.raw", data)) as img:
            assert img.format == "raw" and img.runs[0].start == 0 and img.size == len(data)
            assert img.read(0x1234, 0x100) == data[0x1234:0x1334]


class TestLime:
    def test_built_ranges(self, tmp_path):
        """Each LiME range is one run, e_addr inclusive."""
        a, b = os.urandom(PAGE), os.urandom(2 * PAGE)
        with open_image(_write(tmp_path, "x.lime", build.lime([(0, a), (0x100000, b)]))) as img:
            assert img.format == "lime"
            assert [(r.start, r.size, r.file_offset) for r in img.runs] == [(0, PAGE, 32), (0x100000, 2 * PAGE, 64 + PAGE)]
            assert img.read(0x100000 + PAGE, 16) == b[PAGE:PAGE + 16]

    def test_real_sample_matches_volatility(self, samples):
        """The real Debian LiME slice reads at 0x1000 exactly what Volatility 3 read."""
        oracle = (samples / "lime" / "deb-x86_64-slice_0x1000_volatility3_out").read_bytes()
        with open_image(samples / "lime" / "deb-x86_64-slice.lime") as img:
            assert [(r.start, r.size) for r in img.runs] == [(0x1000, 0x9F000)]
            assert img.read(0x1000, len(oracle)) == oracle

    def test_other_version_and_big_endian_rejected(self, tmp_path):
        """Version != 1 and big-endian headers are refused clearly."""
        with pytest.raises(ImageFormatError, match="version 2"):
            open_image(_write(tmp_path, "v2.lime", build.lime([(0, bytes(PAGE))], version=2)))
        be = struct.pack(">IIQQQ", 0x4C694D45, 1, 0, PAGE - 1, 0) + bytes(PAGE)
        with pytest.raises(ImageFormatError, match="big-endian"):
            open_image(_write(tmp_path, "be.lime", be))

    def test_backwards_range_rejected(self, tmp_path):
        """A range that starts before the previous one ended is refused."""
        data = build.lime([(0x2000, bytes(PAGE)), (0x1000, bytes(PAGE))])
        with pytest.raises(ImageFormatError, match="backwards"):
            open_image(_write(tmp_path, "back.lime", data))


class TestQemuElf:
    @pytest.mark.parametrize("elf_class,machine", [(2, 62), (1, 3), (2, 3)])
    def test_runs_and_registers(self, tmp_path, elf_class, machine):
        """ELF64/x86-64, ELF32/i386 and ELF64/i386 dumps give runs by p_paddr and QEMUCPUState registers."""
        low, high = os.urandom(0xA0000), os.urandom(PAGE)
        loads = [build.Load(0, low), build.Load(0xC0000, high)]
        data = build.qemu_elf(loads, [REGS, dict(REGS, rip=0x1234)], elf_class=elf_class, machine=machine,
                              vmcoreinfo="OSRELEASE=6.1.0\n")
        with open_image(_write(tmp_path, "q.elf", data)) as img:
            assert img.format == "qemu-elf"
            assert img.metadata["elf_class"] == (64 if elf_class == 2 else 32)
            assert [(r.start, r.size) for r in img.runs] == [(0, 0xA0000), (0xC0000, PAGE)]
            assert img.read(0x9FFF0, 16) == low[-16:] and img.read(0xC0000, 16) == high[:16]
            assert len(img.cpus) == 2 and img.cpus[1].rip == 0x1234
            _check_regs(img.cpus[0])
            assert img.cpus[0].idtr_base == REGS["idtr_base"] and img.cpus[0].cs.selector == 0x10
            assert img.metadata["vmcoreinfo"].startswith("OSRELEASE=6.1.0")

    def test_pn_xnum_reads_count_from_section_zero(self, tmp_path):
        """e_phnum 0xffff: the real segment count comes from section 0's sh_info."""
        loads = [build.Load(i * 2 * PAGE, bytes([i]) * PAGE) for i in range(5)]
        with open_image(_write(tmp_path, "x.elf", build.qemu_elf(loads, xnum=True))) as img:
            assert len(img.runs) == 5 and img.read(8 * PAGE, 1) == b"\x04"

    def test_unstored_segment_is_unmapped(self, tmp_path):
        """p_offset = -1 (QEMU could not store the range) leaves it unmapped."""
        loads = [build.Load(0, bytes(PAGE)), build.Load(0x10000, b"", memsz=PAGE, unstored=True)]
        with open_image(_write(tmp_path, "u.elf", build.qemu_elf(loads))) as img:
            assert not img.is_mapped(0x10000)

    def test_consistent_overlaps_merge(self, tmp_path):
        """paging=true style: the same physical range listed twice with the same file bytes is merged."""
        core = bytearray(build.elf_core([build.Load(0, os.urandom(2 * PAGE))], []))
        phoff = 64
        load = core[phoff + 56:phoff + 112]
        data_offset = struct.unpack_from("<Q", load, 8)[0]
        # Turn the (empty) PT_NOTE header into a second PT_LOAD for the upper page of the same bytes.
        core[phoff:phoff + 56] = struct.pack("<IIQQQQQQ", 1, 0, data_offset + PAGE, 0, PAGE, PAGE, PAGE, 0)
        with open_image(_write(tmp_path, "dup.elf", bytes(core))) as img:
            assert [(r.start, r.size) for r in img.runs] == [(0, 2 * PAGE)]
        # The same page listed with different file bytes is a corrupt map.
        core[phoff:phoff + 56] = struct.pack("<IIQQQQQQ", 1, 0, data_offset, 0, PAGE, PAGE, PAGE, 0)
        with pytest.raises(ImageFormatError, match="overlaps"):
            open_image(_write(tmp_path, "bad.elf", bytes(core)))

    def test_generic_elf_core_without_qemu_notes(self, tmp_path):
        """An ELF core with only NT_PRSTATUS (e.g. a kernel vmcore) reads as elf-core with GPRs."""
        data = build.elf_core([build.Load(0, bytes(PAGE))], [("CORE", 1, build.prstatus64(REGS))])
        with open_image(_write(tmp_path, "c.elf", data)) as img:
            assert img.format == "elf-core" and img.cpus[0].rip == REGS["rip"] and img.cpus[0].rbx == 0x2222


class TestVBox:
    def _build(self, **kw):
        loads = [build.Load(0, os.urandom(0xA0000)), build.Load(0xE0000000, b"", memsz=0x1000),
                 build.Load(0x100000000, os.urandom(2 * PAGE))]
        return loads, build.vbox_core(loads, [REGS, dict(REGS, rip=5)], **kw)

    @pytest.mark.parametrize("fmt", [0x00010005, 0x00010006])
    def test_descriptor_runs_and_registers(self, tmp_path, fmt):
        """VBCORE facts, PT_LOAD runs (MMIO without file bytes reads as zeros) and VBCPU registers."""
        loads, data = self._build(fmt=fmt)
        with open_image(_write(tmp_path, "v.core", data)) as img:
            assert isinstance(img, VBoxImage) and img.format == "vbox-elf"
            m = img.metadata
            assert (m["magic"], m["format_version"], m["vbox_version"], m["vbox_revision"], m["cpu_count"]) == (
                0xC01AC0DE, fmt, "6.1.50", 161033, 2)
            assert dict(img.summary())["Version"] == "VirtualBox 6.1.50 (revision 161033)"
            assert [r.start for r in img.runs] == [0, 0xE0000000, 0x100000000]
            assert img.read(0x100000000, 32) == loads[2].data[:32]
            assert img.read(0xE0000000, 8) == bytes(8)
            _check_regs(img.cpus[0])
            assert img.cpus[0].idtr_base == REGS["idtr_base"] and img.cpus[1].rip == 5

    def test_older_note_name_sizes_with_nul(self, tmp_path):
        """Older VirtualBox counted the NUL in n_namesz ("@todo fix this later"): read both."""
        loads = [build.Load(0, os.urandom(PAGE))]
        data = build.vbox_core(loads, [REGS], fmt=0x00010005, namesz_has_nul=True)
        with open_image(_write(tmp_path, "old-names.core", data)) as img:
            assert img.format == "vbox-elf" and img.metadata["cpu_count"] == 1
            _check_regs(img.cpus[0])

    def test_format_0x10000_exposes_memory_only(self, tmp_path):
        """The oldest format stored internal CPUMCTX: memory yes, registers no."""
        _, data = self._build(fmt=0x00010000)
        with open_image(_write(tmp_path, "old.core", data)) as img:
            assert img.cpus == () and img.metadata["registers_decoded"] is False

    def test_bad_descriptor_magic(self, tmp_path):
        """A VBCORE note with the wrong magic is refused."""
        _, data = self._build(magic=0xDEADBEEF)
        with pytest.raises(ImageFormatError, match="VBCORE magic"):
            open_image(_write(tmp_path, "bad.core", data))

    def test_cpu_count_mismatch(self, tmp_path):
        """cCpus must match the VBCPU notes present."""
        _, data = self._build(n_cpus=7)
        with pytest.raises(ImageFormatError, match="7 CPUs"):
            open_image(_write(tmp_path, "n.core", data))


class TestVmware:
    @pytest.mark.parametrize("magic", sorted(MAGICS))
    def test_every_magic_single_region(self, tmp_path, magic):
        """All header magics: block lengths u32 when magic & 0xF == 0, else u64; Memory maps from 0."""
        ram = os.urandom(8 * PAGE)
        data = build.vmware_checkpoint(ram, cpus=[REGS], magic=magic, pad=7)
        with open_image(_write(tmp_path, "s.vmss", data)) as img:
            assert isinstance(img, VmwareImage) and img.magic == magic
            assert [(r.start, r.size) for r in img.runs] == [(0, len(ram))]
            assert img.read(0x1234, 64) == ram[0x1234:0x1274]
            _check_regs(img.cpus[0])
            assert img.cpus[0].idtr_base == REGS["idtr_base"] and img.cpus[0].idtr_limit == 0xFFF

    def test_regions_place_ram_above_4g(self, tmp_path):
        """regionPPN/regionPageNum/regionSize map blob pages to physical pages (holes between)."""
        ram = os.urandom(6 * PAGE)
        regions = [(0, 0, 2), (0x100000, 2, 4)]  # 2 pages at 0, 4 pages at 4 GiB
        with open_image(_write(tmp_path, "r.vmsn", build.vmware_checkpoint(ram, regions=regions))) as img:
            assert [(r.start, r.size) for r in img.runs] == [(0, 2 * PAGE), (1 << 32, 4 * PAGE)]
            assert img.read(1 << 32, PAGE) == ram[2 * PAGE:3 * PAGE]
            assert not img.is_mapped(2 * PAGE)

    def test_companion_vmem(self, tmp_path):
        """No Memory tag: RAM comes from the .vmem of the same base name, regions still apply."""
        ram = os.urandom(4 * PAGE)
        _write(tmp_path, "guest.vmem", ram)
        meta = _write(tmp_path, "guest.vmss", build.vmware_checkpoint(None, regions=[(0x10, 0, 4)]))
        with open_image(meta) as img:
            assert img.metadata["vmem"].endswith("guest.vmem")
            assert img.read(0x10 * PAGE, 4 * PAGE) == ram

    def test_explicit_vmem_path(self, tmp_path):
        """An explicit vmem= path (ESXi names differ) is used instead of the default name."""
        ram = os.urandom(2 * PAGE)
        other = _write(tmp_path, "other-name.bin", ram)
        meta = _write(tmp_path, "guest.vmsn", build.vmware_checkpoint(None))
        with open_image(meta, vmem=other) as img:
            assert img.runs[0].size == 2 * PAGE and img.read(0, 16) == ram[:16]

    def test_missing_vmem_is_a_clear_error(self, tmp_path):
        """Metadata-only checkpoint without its .vmem: a typed error naming the expected file."""
        meta = _write(tmp_path, "lonely.vmss", build.vmware_checkpoint(None))
        with pytest.raises(ImageFormatError, match="lonely.vmem"):
            open_image(meta)

    def test_config_screenshot_and_tags(self, tmp_path):
        """Snapshot/cfgFile, MKSVMX/imageData and scalar tags are exposed."""
        png = b"\x89PNG\r\n\x1a\n" + os.urandom(100)
        cfg = '.encoding = "UTF-8"\nmemsize = "16"\n'
        data = build.vmware_checkpoint(bytes(PAGE), cpus=[REGS], config=cfg, png=png)
        with open_image(_write(tmp_path, "c.vmss", data)) as img:
            assert img.config() == cfg and img.screenshot() == png
            tag = next(t for t in img.tags if t.path == "cpu/cr3" or t.path == "cpu/CR64[0][3]")
            assert img.tag_value(tag) == REGS["cr3"]
            assert img.metadata["config"] == cfg

    def test_compressed_memory_rejected_other_compressed_tags_listed(self, tmp_path):
        """A compressed Memory block is refused; a compressed metadata tag is only listed."""
        extra = {"Extra": [build.Tag("blob", b"\x01\x02\x03", block=True, compressed=True, mem_size=99)]}
        ok = build.vmware_checkpoint(bytes(PAGE), extra=extra)
        with open_image(_write(tmp_path, "ok.vmss", ok)) as img:
            tag = next(t for t in img.tags if t.name == "blob")
            assert tag.compressed and tag.mem_size == 99 and img.tag_value(tag) is None
        groups = {"memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True, compressed=True)]}
        with pytest.raises(ImageFormatError, match="compressed"):
            open_image(_write(tmp_path, "cm.vmss", build.vmware(groups)))

    def test_gpregs_and_cr64_blocks(self, tmp_path):
        """Block forms of registers (gpregs 128 B in crash's order, CR64 72 B) are decoded."""
        gp = struct.pack("<16Q", *range(1, 17))  # rax rcx rdx rbx rbp rsp rsi rdi r8..r15
        crs = struct.pack("<9Q", 0x80000011, 0, 0, 0x5000, 0x20, 0, 0, 0, 0)
        groups = {"cpu": [build.Tag("cpu:numVCPUs", 1), build.Tag("gpregs", gp, (0,), block=True),
                          build.Tag("CR64", crs, (0,), block=True)],
                  "memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True)]}
        with open_image(_write(tmp_path, "g.vmss", build.vmware(groups))) as img:
            cpu = img.cpus[0]
            assert (cpu.rax, cpu.rcx, cpu.rbx, cpu.rbp, cpu.rsp, cpu.r15) == (1, 2, 4, 5, 6, 16)
            assert (cpu.cr0, cpu.cr3, cpu.cr4) == (0x80000011, 0x5000, 0x20)


class TestWindowsCrashDump:
    def test_real_headers_parse(self, samples):
        """The real (page-stripped) headers give the documented facts; opening says the pages are missing."""
        from vmwatch.images.base import Reader
        from vmwatch.images.windows import parse_header

        d64 = (samples / "windows-crashdump" / "coredump_win10_64bit_stripped.raw").read_bytes()
        h = parse_header(Reader(d64, "w10"))
        assert (h.bits, h.dtb, h.machine, h.processors, h.dump_type, h.kdbg) == (
            64, 0x3E6B1A000, 0x8664, 8, 1, 0xFFFFF80510A00B20)
        assert h.runs == ((0x1, 0x9F), (0x100, 0x7F7EF), (0x7FBFF, 0x3E1), (0x100000, 0x380000))
        assert (h.minor, h.ps_loaded_module_list, h.ps_active_process_head, h.pfn_database) == (
            9200, 0xFFFFF80510A2A2B0, 0xFFFFF80510A1E060, 0xFFFFDF8000000000)
        assert (h.bugcheck, h.bugcheck_parameters) == (0, (0, 0, 0, 0))
        d32 = (samples / "windows-crashdump" / "coredump_win7_32bit_stripped.raw").read_bytes()
        h = parse_header(Reader(d32, "w7"))
        assert (h.bits, h.dtb, h.machine, h.dump_type, h.pae) == (32, 0xBF62F2E0, 0x14C, 1, True)
        assert h.runs == ((0x1, 0x9E), (0x100, 0xBFEDF))
        assert (h.minor, h.processors, h.ps_loaded_module_list, h.ps_active_process_head, h.pfn_database) == (
            7601, 2, 0x82999850, 0x82991F18, 0x829B9700)
        assert h.kdbg is None  # this header keeps the PAGE filler at KdDebuggerDataBlock
        with pytest.raises(ImageFormatError, match="past the end|needs file bytes"):
            open_image(samples / "windows-crashdump" / "coredump_win10_64bit_stripped.raw")

    @pytest.mark.parametrize("bits", [64, 32])
    def test_full_dump_on_real_header(self, samples, tmp_path, bits):
        """A full dump built on the real header with small runs reads page data run after run."""
        name = "coredump_win10_64bit_stripped.raw" if bits == 64 else "coredump_win7_32bit_stripped.raw"
        header = (samples / "windows-crashdump" / name).read_bytes()
        a, b = os.urandom(PAGE), os.urandom(3 * PAGE)
        data = build.windows_crashdump([(1, a), (0x100, b)], bits=bits, header=header, regs=REGS)
        with open_image(_write(tmp_path, "w.dmp", data)) as img:
            assert img.format == "windows-crashdump"
            assert [(r.start, r.size) for r in img.runs] == [(PAGE, PAGE), (0x100000, 3 * PAGE)]
            assert img.read(0x101000, PAGE) == b[PAGE:2 * PAGE]
            assert img.cpus[0].cr3 == 0x1AD000
            if bits == 64:
                assert img.cpus[0].rip == REGS["rip"] and img.cpus[0].rsp == REGS["rsp"]

    def test_info_on_the_real_32_bit_header(self, samples, tmp_path):
        """info --json on a full dump built on the real Windows 7 SP1 x86 header (its DTB kept):
        the header's facts, PaeEnabled among them; no kernel in the made-up pages is one fact."""
        import json

        from vmwatch.testing.cli import run_cli

        header = (samples / "windows-crashdump" / "coredump_win7_32bit_stripped.raw").read_bytes()
        data = build.windows_crashdump([(1, bytes(PAGE)), (0x100, bytes(2 * PAGE))], bits=32, header=header,
                                       dtb=0xBF62F2E0)
        r = run_cli("info", _write(tmp_path, "w7.dmp", data), "--json")
        assert r.status == 0, r.stderr
        doc = json.loads(r.stdout)
        s = doc["summary"]
        assert (s["Signature"], s["Version"], s["DumpType"], s["Machine"], s["Processors"]) == (
            "PAGEDUMP", "15.7601 (build 7601)", "full", "0x14c", "2")
        assert (s["DirectoryTableBase"], s["PsLoadedModuleList"], s["PsActiveProcessHead"], s["KdDebuggerDataBlock"]) == (
            "0xbf62f2e0", "0x82999850", "0x82991f18", "-")
        assert s["PaeEnabled"] == "1 (PAE paging)" and doc["metadata"]["pae"] is True
        assert doc["kernel"]["os"] is None

    def test_bitmap_dump(self, tmp_path):
        """DumpType 5: pages whose bit is set are stored in order from the first-page offset."""
        a, b = os.urandom(2 * PAGE), os.urandom(PAGE)
        data = build.windows_crashdump([(3, a), (20, b)], dump_type=5)
        with open_image(_write(tmp_path, "bm.dmp", data)) as img:
            assert [(r.start, r.size) for r in img.runs] == [(3 * PAGE, 2 * PAGE), (20 * PAGE, PAGE)]
            assert img.read(20 * PAGE, PAGE) == b and img.read(4 * PAGE, 8) == a[PAGE:PAGE + 8]

    def test_kernel_dump_rejected(self, tmp_path):
        """The legacy summary (kernel) dump is refused, saying what to take instead."""
        data = build.windows_crashdump([(1, bytes(PAGE))], dump_type=2)
        with pytest.raises(ImageFormatError, match="DumpType 2 is a legacy summary.*take a complete memory dump"):
            open_image(_write(tmp_path, "k.dmp", data))


class TestDetection:
    @pytest.mark.parametrize("head,why", [
        (b"makedumpfile", "makedumpfile"), (b"KDUMP   ", "kdump"), (b"DISKDUMP", "diskdump")])
    def test_kdump_family_rejected(self, tmp_path, head, why):
        """QEMU's kdump outputs are recognised and refused with advice."""
        with pytest.raises(ImageFormatError, match=why):
            open_image(_write(tmp_path, "k.dump", head + bytes(PAGE - len(head))))

    def test_unknown_small_file_rejected(self, tmp_path):
        """No magic and not page-sized: not taken for a raw dump."""
        with pytest.raises(ImageFormatError, match="unknown image format"):
            open_image(_write(tmp_path, "notes.txt", b"hello\n"))

    def test_detection_ignores_extension(self, tmp_path):
        """A LiME file named .vmem is still read as LiME."""
        data = build.lime([(0x1000, bytes(PAGE))])
        with open_image(_write(tmp_path, "trap.vmem", data)) as img:
            assert img.format == "lime"

    def test_empty_file(self, tmp_path):
        """An empty file is not an image."""
        with pytest.raises(ImageFormatError, match="empty"):
            open_image(_write(tmp_path, "empty.raw", b""))


class TestForeignElf:
    def test_unknown_machine_core_gives_memory_but_no_registers(self, tmp_path):
        """A 32-bit Arm core (EM 40) reads as memory; its notes are not misread as x86 registers."""
        data = build.elf_core([build.Load(0x40000000, b"\x01" * PAGE)], [("CORE", 1, bytes(392))], machine=40)
        with open_image(_write(tmp_path, "arm.elf", data)) as img:
            assert img.read(0x40000000, 4) == b"\x01" * 4 and img.cpus == ()
            assert img.metadata["machine"] == "40"

    def test_aarch64_prstatus_gives_x_sp_pc_pstate(self, tmp_path):
        """An aarch64 core's NT_PRSTATUS (user_pt_regs at 112) gives x0..x30, sp, pc, pstate; a short one none."""
        values = list(range(0x100, 0x100 + 34))
        note = bytes(112) + struct.pack("<34Q", *values) + bytes(8)
        data = build.elf_core([build.Load(0x40000000, bytes(PAGE))], [("CORE", 1, note), ("CORE", 1, bytes(200))],
                              machine=183)
        with open_image(_write(tmp_path, "arm64.elf", data)) as img:
            (cpu,) = img.cpus
            assert cpu.arch == "aarch64" and img.metadata["machine"] == "aarch64"
            assert (cpu.x, cpu.sp, cpu.pc, cpu.pstate) == (tuple(values[:31]), *values[31:])
            assert cpu.tcr_el1 is None
