"""32-bit Windows: guests built around Debian libwine:i386's real PE32 ntoskrnl.exe and hal.dll,
mapped in PAE and in plain 32-bit page tables the builder writes, at Windows 7 SP1 x86's offsets.

Truth is what the builder wrote (its ``processes``, ``drivers``, ``services``); every step of the
initialisation is checked by what it found and how, on raw memory (no CPU state), with CPU state
(CR3 and IDTR of a 32-bit vCPU), and on 32-bit crash dumps (full, bitmap, kernel, triage).
"""

from __future__ import annotations

import json

import pytest

from vmwatch.errors import SymbolError
from vmwatch.images import open_image
from vmwatch.memory import BufferMemory
from vmwatch.os.windows.kernel import Windows
from vmwatch.testing.cli import run_cli
from tests.windows.test_windows import check_objects, how_found
from vmwatch.testing.windowsguest import KERNEL_PA, X86, WindowsGuest

MODES = {True: "pae", False: "32-bit"}


@pytest.fixture(params=[True, False], ids=["pae", "nopae"])
def guest(request, wine_pe32) -> WindowsGuest:
    g = WindowsGuest(wine_pe32["ntoskrnl.exe"], hal=wine_pe32["hal.dll"], pae=request.param)
    g.build_objects()
    return g


class TestInit:
    def test_raw_without_cpu_state(self, guest):
        """No registers: MZ scan finds a PE32 kernel, KDBG (sign-extended fields) gives the base,
        the System EPROCESS scan gives the DTB and the paging mode it works in."""
        win = Windows.from_memory(BufferMemory(guest.buffer))
        how = how_found(win)
        assert how["kernel physical base"][0] == KERNEL_PA
        assert how["architecture"] == ("x86", "ntoskrnl's PE header (Machine 0x14c)")
        assert how["build"][0] == 7601 and how["profile"][0] == "Windows 7 SP1 x86 (7601)"
        assert how["KDBG"] == (guest.kdbg_vaddr, "physical scan for the KDBG tag (Size 0x340), in ntoskrnl's own pages")
        assert how["kernel base"] == (X86.kernel_va, "KDBG KernBase")
        assert how["DTB"][0] == guest.fake.cr3 and "System EPROCESS" in how["DTB"][1]
        assert how["paging"][0] == MODES[guest.fake.mode.value == "pae"]
        assert win.kernel.bits == 32 and win.memory.pointer_size == 4
        assert win.ksym2v("PsInitialSystemProcess") == guest.ksym("PsInitialSystemProcess")
        assert len(win.symbols.exports) > 1600
        check_objects(win, guest)

    def test_cpu_state_idt_and_scheduler(self, guest):
        """CR3/CR0/CR4 of a 32-bit vCPU and IDTR: base scanned down from an 8-byte gate's handler;
        the IDT decodes 8-byte gates; the running process comes through the x86 KPCR."""
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        how = how_found(win)
        assert how["DTB"] == (guest.fake.cr3, "CR3 of the saved/live vCPU")
        assert how["paging"] == (guest.fake.mode.value, "CR0/CR4/EFER of the saved/live vCPU")
        assert how["kernel base"][0] == X86.kernel_va and "IDT vector 0 handler" in how["kernel base"][1]
        idt = win.idt(guest.registers)
        assert len(idt) == 256 and idt[0].address == guest.idt_handler and idt[0].present
        assert (idt[0].selector, idt[0].gate_type) == (0x8, 0xE) and not idt[1].present
        assert win.running_processes() == {0: guest.processes[0].address}
        check_objects(win, guest)

    def test_pool_scan_sees_an_unlinked_process(self, guest):
        """psscan on x86 pool blocks (8-byte pool header): every process, and an unlinked one."""
        hidden = guest.unlink(348)
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,))
        assert [p.pid for p in win.tasks()] == [4, 256, 1236]
        hits = win.scan_processes()
        assert [(h.paddr, h.process.address, h.process.pid) for h in hits] == [
            (guest.paddr(p.address), p.address, p.pid) for p in guest.processes]
        assert [h.process.pid for h in win.hidden_processes()] == [hidden.pid]

    def test_libvmi_conf_for_an_unknown_build(self, guest, tmp_path):
        """An unknown x86 build: one error naming it as 32-bit; LibVMI's Win7 x86 entry reads it."""
        guest.put_u32(guest.ksym("NtBuildNumber"), 0xF0000000 | 7602)
        with pytest.raises(SymbolError, match=r"Windows build 7602 \(32-bit\) has no built-in offsets.*--symbols"):
            Windows.from_memory(BufferMemory(guest.buffer))
        conf = tmp_path / "libvmi.conf"
        conf.write_text('win7sp1x86 {\n    ostype = "Windows";\n    win_tasks = 0xb8;\n    win_pdbase = 0x18;\n'
                        '    win_pid = 0xb4;\n    win_pname = 0x16c;\n}\n')
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,), symbols_file=str(conf))
        assert [(t.pid, t.name, t.dtb) for t in win.tasks()] == [(p.pid, p.name.decode(), p.dtb) for p in guest.processes]
        assert [m.name for m in win.modules()] == [d[0] for d in guest.drivers]

    def test_isf_states_its_pointer_size(self, guest, tmp_path):
        """A Volatility ISF with 4-byte pointers: the x86 KLDR layout is taken with it."""
        isf = tmp_path / "ntkrpamp.json"
        isf.write_text(json.dumps(guest.isf()))
        win = Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,), symbols_file=str(isf))
        assert win.profile.bits == 32
        check_objects(win, guest)


class TestCrashDumps:
    @pytest.mark.parametrize("dump_type", [1, 5, 6])
    def test_full_bitmap_kernel(self, guest, tmp_path, dump_type):
        """PAGEDUMP full, bitmap and kernel-bitmap dumps: DTB and paging from the header (PaeEnabled)."""
        path = tmp_path / "x86.dmp"
        path.write_bytes(guest.crashdump(dump_type=dump_type))
        with open_image(path) as image:
            assert (image.metadata["bits"], image.metadata["pae"]) == (32, guest.fake.mode.value == "pae")
            win = Windows.from_memory(image, image.cpus)
            how = how_found(win)
            assert how["DTB"] == (guest.fake.cr3, "crash dump header DirectoryTableBase")
            assert how["paging"] == (guest.fake.mode.value, "crash dump header PaeEnabled")
            assert how["KDBG"] == (guest.kdbg_vaddr, "crash dump header KdDebuggerDataBlock")
            check_objects(win, guest)

    def test_info_shows_the_header_facts(self, guest, tmp_path):
        """info --json: build, bugcheck, processors, DTB, list heads, KDBG and PaeEnabled of a
        32-bit header, and the kernel steps."""
        path = tmp_path / "x86.dmp"
        path.write_bytes(guest.crashdump())
        r = run_cli("info", path, "--json")
        assert r.status == 0, r.stderr
        doc = json.loads(r.stdout)
        s = doc["summary"]
        assert s["Signature"] == "PAGEDUMP" and s["Version"] == "15.7601 (build 7601)" and s["Processors"] == "1"
        assert s["DirectoryTableBase"] == f"{guest.fake.cr3:#x}" and s["KdDebuggerDataBlock"] == f"{guest.kdbg_vaddr:#x}"
        assert s["PsActiveProcessHead"] == f"{guest.process_head:#x}" and s["Machine"] == "0x14c"
        assert s["PsLoadedModuleList"] == f"{guest.module_head:#x}"
        assert s["BugCheck"] == "0x000000e2 (0x11, 0x22, 0x33, 0x44)"
        pae = guest.fake.mode.value == "pae"
        assert s["PaeEnabled"] == ("1 (PAE paging)" if pae else "0 (32-bit paging)")
        assert doc["metadata"]["pae"] is pae and doc["metadata"]["bugcheck_parameters"] == [0x11, 0x22, 0x33, 0x44]
        how = {f["what"]: f["value"] for f in doc["kernel"]["found"]}
        assert how["architecture"] == "x86" and how["kernel base"] == X86.kernel_va

    def test_triage_decodes_the_x86_process_copy(self, guest, tmp_path):
        """A 32-bit triage dump of this guest: ps decodes its EPROCESS copy at the x86 offsets."""
        path = tmp_path / "tri.dmp"
        path.write_bytes(guest.triage_dump())
        r = run_cli("ps", path, "--json")
        assert r.status == 0, r.stderr
        p = guest.processes[-1]
        assert [(x["pid"], x["ppid"], x["name"], x["dtb"], x["peb"]) for x in json.loads(r.stdout)] == \
            [(p.pid, p.ppid, p.name.decode(), p.dtb, p.peb)]
        r = run_cli("modules", path, "--json")
        assert [m["base"] for m in json.loads(r.stdout)] == [d[1] for d in guest.drivers]


class TestCli:
    @pytest.mark.parametrize("name", ["x86.raw", "x86.dmp"])
    def test_every_command_zero_config(self, guest, tmp_path, name):
        """ps, modules, syscalls, idt on the raw image (no CPU state at all) and the full dump."""
        path = tmp_path / name
        path.write_bytes(guest.raw() if name.endswith(".raw") else guest.crashdump())
        r = run_cli("ps", path, "--json")
        assert r.status == 0, r.stderr
        assert [(p["pid"], p["ppid"], p["name"]) for p in json.loads(r.stdout)] == \
            [(p.pid, p.ppid, p.name.decode()) for p in guest.processes]
        r = run_cli("modules", path, "--json")
        assert [(m["name"], m["base"], m["path"]) for m in json.loads(r.stdout)] == \
            [(n, b, p) for n, b, _s, p in guest.drivers]
        r = run_cli("syscalls", path, "--suspicious", "--json")
        assert [e["address"] for e in json.loads(r.stdout)] == [guest.services[-1]]
        r = run_cli("idt", path, "--json", "--all")  # no IDTR: the x86 KPCR's IDT through KiProcessorBlock
        assert r.status == 0, r.stderr
        gates = {g["vector"]: g for g in json.loads(r.stdout)}
        assert gates[0]["address"] == guest.idt_handler and gates[0]["present"] and not gates[1]["present"]

    def test_detected_from_cpu_state_without_a_mapping(self, guest, monkeypatch):
        """A gdbstub-like source (no mapping) with a 32-bit vCPU whose IDT handler is in x86
        Windows' system space: Windows, without Linux's search running."""
        from vmwatch.os import detect
        from vmwatch.os.linux.kernel import Linux

        def no_linux(*args, **kwargs):
            raise AssertionError("the Linux search ran")

        monkeypatch.setattr(Linux, "from_memory", no_linux)
        assert detect.from_memory(BufferMemory(guest.buffer), (guest.registers,)).kernel.base == X86.kernel_va


class TestRules:
    def test_security_pack_on_a_32_bit_dump(self, guest, tmp_path):
        """The security pack on a PAGEDUMP of the x86 guest (no IDTR: the KPCR's IDT): the SSDT
        entry hooked into fakedrv.sys (an absolute x86 address), an 8-byte IDT gate aimed at pool
        memory, and csrss.exe unlinked from ActiveProcessLinks each give their alert."""
        import trio

        from vmwatch.engine import Engine, ImageSource, ListSink
        from vmwatch.rules import RuleSet, Severity

        rootkit = X86.pool_va + 0x100000
        guest.set_gate(0, rootkit)
        hidden = guest.unlink(348)
        path = tmp_path / "x86.dmp"
        path.write_bytes(guest.crashdump())

        async def main():
            with open_image(path) as image:
                sink = ListSink()
                engine = Engine(ImageSource(image, cpus=tuple(image.cpus)), RuleSet.load(["security"]), [sink])
                return await engine.run(), sink.alerts

        summary, alerts = trio.run(main)
        assert not summary.rule_errors, summary
        name, base = guest.drivers[-1][:2]
        assert sorted((a.rule, a.message) for a in alerts if a.severity >= Severity.WARNING) == sorted([
            ("security.ssdt", f"SSDT[3] points outside ntoskrnl: {base + 0x1230:#x} in {name}"),
            ("security.windows_idt", f"vCPU 0 IDT vector 0 points outside every loaded driver: {rootkit:#x}"),
            ("security.unlinked_process", f"hidden process: pid 348 (csrss.exe) is alive in pool memory at "
                                          f"{hidden.address:#x} but not on ActiveProcessLinks"),
        ])
