"""Windows.from_memory on guests built around the real ntoskrnl: every init step, lists, hostile memory."""

from __future__ import annotations

import json
import struct

import pytest

from vmwatch.errors import KernelNotFound, SymbolError, VmwatchError
from vmwatch.memory import BufferMemory
from vmwatch.os.windows.kernel import Windows
from vmwatch.testing.windowsguest import KERNEL_PA, KERNEL_VA, WindowsGuest


@pytest.fixture
def guest(ntoskrnl, wine_pe) -> WindowsGuest:
    g = WindowsGuest(ntoskrnl, hal=wine_pe["hal.dll"])
    g.build_objects()
    return g


def how_found(win: Windows) -> dict[str, tuple]:
    """{step: (value, how)} of what the initialisation found."""
    return {f.what: (f.value, f.how) for f in win.kernel.found}


def check_objects(win: Windows, guest: WindowsGuest) -> None:
    """Processes, drivers and the SSDT read back as the builder wrote them (x64 or x86 guest)."""
    tasks = win.tasks()
    assert tasks.skipped == []
    assert [(t.pid, t.ppid, t.name.encode(), t.dtb, t.create_time, t.peb, t.address) for t in tasks] == [
        (p.pid, p.ppid, p.name, p.dtb, p.create_time, p.peb, p.address) for p in guest.processes]
    modules = win.modules()
    assert modules.skipped == []
    assert [(m.name, m.base, m.size, m.path) for m in modules] == guest.drivers
    services = win.syscalls()
    assert [s.address for s in services] == guest.services
    assert [s.in_text for s in services] == [True, True, True, False]
    assert services[0].symbol in ("NtClose", "ZwClose") and services[2].symbol == "KeBugCheckEx"


class TestInit:
    def test_raw_without_cpu_state(self, guest):
        """No registers: MZ scan, NtBuildNumber, KDBG scan, KernBase, System EPROCESS scan."""
        win = Windows.from_memory(BufferMemory(guest.buffer))
        how = how_found(win)
        assert how["kernel physical base"][0] == KERNEL_PA
        assert how["build"][0] == 7601
        assert how["KDBG"] == (guest.kdbg_vaddr, "physical scan for the KDBG tag (Size 0x340), in ntoskrnl's own pages")
        assert how["kernel base"] == (KERNEL_VA, "KDBG KernBase")
        assert how["DTB"][0] == guest.fake.cr3 and "System EPROCESS" in how["DTB"][1]
        assert how["PsActiveProcessHead"] == (guest.process_head, "KDBG")
        assert win.kernel.name == "ntoskrnl.exe" and win.kernel.size == guest.kernel_size
        assert win.ksym2v("PsInitialSystemProcess") == guest.ksym("PsInitialSystemProcess")
        assert len(win.symbols.exports) > 1600
        check_objects(win, guest)

    def test_idt_scan_with_cpu_state(self, guest):
        """CR3 and IDTR: the kernel base comes from scanning down from the vector 0 handler."""
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        how = how_found(win)
        assert how["DTB"] == (guest.fake.cr3, "CR3 of the saved/live vCPU")
        assert how["kernel base"][0] == KERNEL_VA and "IDT vector 0 handler" in how["kernel base"][1]
        idt = win.idt(guest.registers)
        assert idt[0].address == guest.idt_handler and idt[0].present
        check_objects(win, guest)

    def test_windows10_build(self, ntoskrnl):
        """A 19041 guest is read with the Windows 10 offsets."""
        g = WindowsGuest(ntoskrnl, build=19041)
        g.build_objects()
        win = Windows.from_memory(BufferMemory(g.buffer))
        assert win.profile.eprocess["ImageFileName"] == 0x5A8
        check_objects(win, g)

    def test_crash_dump(self, guest, tmp_path):
        """A full crash dump: DTB and KDBG from its header."""
        from vmwatch.images import open_image

        path = tmp_path / "win.dmp"
        path.write_bytes(guest.crashdump())
        with open_image(path) as image:
            win = Windows.from_memory(image, image.cpus)
            how = how_found(win)
            assert how["DTB"] == (guest.fake.cr3, "crash dump header DirectoryTableBase")
            assert how["KDBG"] == (guest.kdbg_vaddr, "crash dump header KdDebuggerDataBlock")
            check_objects(win, guest)

    def test_encoded_kdbg_with_isf(self, ntoskrnl, tmp_path):
        """A Windows 8+ encoded KDBG: no tag to scan for; decoded with the keys an ISF locates."""
        g = WindowsGuest(ntoskrnl, encoded=True)
        g.build_objects()
        assert b"KDBG" not in bytes(g.buffer[KERNEL_PA:KERNEL_PA + 0x100000])
        isf = tmp_path / "ntkrnlmp.json"
        isf.write_text(json.dumps(g.isf()))
        win = Windows.from_memory(BufferMemory(g.buffer), (g.registers,), symbols_file=str(isf))
        value, how = how_found(win)["KDBG"]
        assert value == g.kdbg_vaddr and "decoded with KiWaitNever/KiWaitAlways" in how
        check_objects(win, g)

    def test_encoded_kdbg_without_keys(self, ntoskrnl):
        """Without keys the process list still comes from PsInitialSystemProcess; modules need KDBG."""
        g = WindowsGuest(ntoskrnl, encoded=True)
        g.build_objects()
        win = Windows.from_memory(BufferMemory(g.buffer), (g.registers,))
        assert "KDBG" not in how_found(win)
        assert [t.pid for t in win.tasks()] == [4, 256, 348, 1236]
        with pytest.raises(SymbolError, match="PsLoadedModuleList"):
            win.modules()

    def test_encoded_kdbg_raw_is_one_error(self, ntoskrnl):
        """Encoded KDBG and no CPU state: one error saying what is missing."""
        g = WindowsGuest(ntoskrnl, encoded=True)
        g.build_objects()
        with pytest.raises(SymbolError, match="neither CPU state"):
            Windows.from_memory(BufferMemory(g.buffer))

    def test_libvmi_conf(self, ntoskrnl, tmp_path):
        """An unknown build read with a libvmi.conf entry (the seed's syntax)."""
        g = WindowsGuest(ntoskrnl, build=7601)
        g.put_u32(g.ksym("NtBuildNumber"), 0xF0000000 | 9999)
        g.build_objects()
        with pytest.raises(SymbolError, match="Windows build 9999 has no built-in offsets.*--symbols"):
            Windows.from_memory(BufferMemory(g.buffer))
        conf = tmp_path / "libvmi.conf"
        conf.write_text('win7sp1x64 {\n    ostype = "Windows";\n    win_tasks   = 0x188;\n    win_pdbase  = 0x28;\n'
                        f'    win_pid     = 0x180;\n    win_pname = 0x2e0;\n    win_kdvb    = {g.kdbg_vaddr:#x};\n}}\n')
        win = Windows.from_memory(BufferMemory(g.buffer), (g.registers,), symbols_file=str(conf))
        assert how_found(win)["KDBG"] == (g.kdbg_vaddr, "libvmi.conf win_kdvb")
        assert [t.name for t in win.tasks()] == ["System", "smss.exe", "csrss.exe", "explorer.exe"]

    def test_no_windows(self):
        """Memory without ntoskrnl: KernelNotFound."""
        with pytest.raises(KernelNotFound, match="no ntoskrnl"):
            Windows.from_memory(BufferMemory(bytearray(8 << 20)))


class TestHostile:
    def test_fake_mz_before_the_real_one(self, ntoskrnl):
        """MZ pages below the kernel (junk, a valid PE of another name) are passed over."""
        g = WindowsGuest(ntoskrnl)
        g.build_objects()
        g.buffer[0x100000:0x100002] = b"MZ"  # junk after MZ
        image = g.buffer[KERNEL_PA:KERNEL_PA + 0x1000]
        g.buffer[0x200000:0x201000] = image  # ntoskrnl's headers, export directory elsewhere: garbage
        win = Windows.from_memory(BufferMemory(g.buffer))
        assert win.kernel.paddr == KERNEL_PA

    def test_process_cycle(self, guest):
        """An ActiveProcessLinks cycle that skips the head: bounded, flagged."""
        links = guest.profile.eprocess["ActiveProcessLinks"]
        guest.put_u64(guest.processes[2].address + links, guest.processes[1].address + links)
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        tasks = win.tasks()
        assert [t.pid for t in tasks] == [4, 256, 348]
        assert any("cycle" in s for s in tasks.skipped)

    def test_list_outside_ram(self, guest):
        """A Flink to unmapped memory: what was read, plus a warning."""
        links = guest.profile.eprocess["ActiveProcessLinks"]
        guest.put_u64(guest.processes[1].address + links, 0xFFFFFA80DEAD0000)
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        tasks = win.tasks()
        assert [t.pid for t in tasks] == [4, 256]
        assert any("unreadable" in s for s in tasks.skipped)

    def test_module_name_outside_ram(self, guest):
        """A BaseDllName buffer pointing nowhere skips that driver with a warning."""
        entry = struct.unpack_from("<Q", guest.buffer, guest.paddr(guest.module_head))[0]
        guest.put_u64(entry + 0x58 + 8, 0xFFFFFA80DEAD0000)
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        modules = win.modules()
        assert [m.name for m in modules] == ["hal.dll", "fakedrv.sys"] and len(modules.skipped) == 1

    def test_kdbg_absurd_size(self, guest):
        """A KDBG whose Size is absurd is rejected; without CPU state that is one clear error."""
        guest.write_kdbg(size=0x7FFFFFF0)
        with pytest.raises(SymbolError, match="neither CPU state"):
            Windows.from_memory(BufferMemory(guest.buffer))
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        assert "KDBG" not in how_found(win)

    def test_absurd_ssdt_limit(self, guest):
        """A KeServiceDescriptorTable Limit of 2**32-1 is an error, not a 16 GiB read."""
        guest.put_u32(guest.ksym("KeServiceDescriptorTable") + 0x10, 0xFFFFFFFF)
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        with pytest.raises(VmwatchError, match="absurd Limit"):
            win.syscalls()

    def test_truncated_kernel_headers(self, guest):
        """ntoskrnl's header page zeroed past the PE signature: no kernel, one error."""
        lfanew = struct.unpack_from("<I", guest.buffer, KERNEL_PA + 0x3C)[0]
        guest.buffer[KERNEL_PA + lfanew + 0x18:KERNEL_PA + 0x1000] = bytes(0x1000 - lfanew - 0x18)
        with pytest.raises(KernelNotFound):
            Windows.from_memory(BufferMemory(guest.buffer))


class TestDetect:
    def test_mapped_image_with_ntoskrnl_skips_the_linux_search(self, guest, tmp_path, monkeypatch):
        """A raw image holding ntoskrnl is Windows without Linux's whole-memory search running."""
        from vmwatch.images import open_image
        from vmwatch.os import detect
        from vmwatch.os.linux.kernel import Linux

        def no_linux(*args, **kwargs):
            raise AssertionError("the Linux search ran")

        monkeypatch.setattr(Linux, "from_memory", no_linux)
        (tmp_path / "win.raw").write_bytes(guest.raw())
        with open_image(tmp_path / "win.raw") as image:
            assert detect.from_memory(image).kernel.base == KERNEL_VA

    def test_unusable_ntoskrnl_tries_linux_then_names_windows(self, guest, tmp_path):
        """ntoskrnl's image but no KDBG and no CPU state (a stray file in page cache): Linux is tried,
        and the error is Windows' own."""
        from vmwatch.images import open_image
        from vmwatch.os import detect

        guest.buffer[guest.paddr(guest.kdbg_vaddr) + 0x10:guest.paddr(guest.kdbg_vaddr) + 0x14] = b"XXXX"
        (tmp_path / "win.raw").write_bytes(guest.raw())
        with open_image(tmp_path / "win.raw") as image, pytest.raises(SymbolError, match="neither CPU state"):
            detect.from_memory(image)

    def test_unmapped_memory_with_windows_cpu_state_skips_linux(self, guest, monkeypatch):
        """No mapping (as a live gdbstub source) but CR3 + IDTR: the IDT handler's range says Windows."""
        from vmwatch.os import detect
        from vmwatch.os.linux.kernel import Linux

        def no_linux(*args, **kwargs):
            raise AssertionError("the Linux search ran")

        monkeypatch.setattr(Linux, "from_memory", no_linux)
        assert detect.from_memory(BufferMemory(guest.buffer), (guest.registers,)).kernel.base == KERNEL_VA


class TestProcessors:
    def test_crash_dump_idt_through_the_kpcr(self, guest, tmp_path):
        """A crash dump saves no IDTR: KDBG's KiProcessorBlock leads to the KPCR's IdtBase."""
        from vmwatch.testing.cli import run_cli

        (tmp_path / "win.dmp").write_bytes(guest.crashdump())
        r = run_cli("idt", tmp_path / "win.dmp", "--json", "--all")
        assert r.status == 0, r.stderr
        gates = {g["vector"]: g for g in json.loads(r.stdout)}
        assert gates[0]["address"] == guest.idt_handler and gates[0]["present"]
        assert not gates[1]["present"]

    def test_kpcr_that_does_not_point_back_is_one_line(self, guest, tmp_path):
        """KiProcessorBlock[0] aimed at pool garbage: exit 2, one line naming the KPCR."""
        from vmwatch.testing.cli import run_cli
        from vmwatch.testing.windowsguest import PRCBS_RVA

        guest.put_u64(KERNEL_VA + PRCBS_RVA, guest.kpcr + 0x1000)
        (tmp_path / "win.dmp").write_bytes(guest.crashdump())
        r = run_cli("idt", tmp_path / "win.dmp")
        assert r.status == 2 and "does not point back at itself" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
