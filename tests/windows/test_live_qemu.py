"""The Windows layer through the real live backend: a stopped qemu-system-x86_64 whose RAM file is
a Windows memory image built around Wine's real ntoskrnl (x64; x86 with PAE and with 32-bit
page tables).

No Windows boots: the vCPU state the image needs is loaded into QEMU (testing/windows_qemu.py)
and vmwatch attaches by the QMP socket alone, as to any guest (QMP, ``info mtree``, the shared
RAM file, gdbstub registers, HMP's IDTR). Truth is the builder's objects and the same image
opened as a file; the live path must find the kernel from the vCPU's CR3 and IDTR.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time

import attrs
import pytest
import trio

from vmwatch.live.qemu import attach_qemu
from vmwatch.os.detect import from_memory
from vmwatch.os.windows.kernel import Windows
from vmwatch.testing.cli import run_cli
from vmwatch.testing.windows_qemu import WindowsQemu, patch_cpu_state
from vmwatch.testing.windowsguest import SSDT_RVA, WindowsGuest
from tests.windows.test_windows import check_objects, how_found

COMMANDS = ("ps", "modules", "syscalls", "idt")
ARCHES = {"x64": ("wine_pe", True), "x86-pae": ("wine_pe32", True), "x86-32bit": ("wine_pe32", False)}
"""Guest arch -> (the PE files' fixture, PAE tables for an x86 kernel)."""
LIVE_STEPS = {"DTB": "CR3 of the saved/live vCPU"}


@attrs.frozen
class Live:
    guest: WindowsGuest
    image: object
    qemu: WindowsQemu
    monitor: object


def _guest(request, arch: str, *, clean: bool = False) -> WindowsGuest:
    fixture, pae = ARCHES[arch]
    pe = request.getfixturevalue(fixture)
    g = WindowsGuest(pe["ntoskrnl.exe"], hal=pe["hal.dll"], pae=pae)
    g.build_objects(clean=clean)
    return g


@pytest.fixture(scope="module", params=list(ARCHES))
def live(request, tmp_path_factory):
    """The default builder guest (a hooked SSDT entry, a driver from outside the system
    directories) in a stopped QEMU, once per arch; the image file it was started from."""
    g = _guest(request, request.param)
    image = tmp_path_factory.mktemp(request.param) / "win.raw"
    image.write_bytes(g.raw())
    with WindowsQemu.start(image, g.registers) as qemu, qemu.monitor() as monitor:
        yield Live(g, image, qemu, monitor)


@pytest.mark.guest
@pytest.mark.parametrize("command", COMMANDS)
def test_command_same_as_on_the_image_file(live, command):
    """ps/modules/syscalls/idt on qemu:SOCK find Windows with no flag and print what they print
    on the image file, which is what the builder wrote."""
    on_live = run_cli(command, live.qemu.target, "--json")
    on_file = run_cli(command, live.image, "--json")
    assert (on_live.status, on_live.stderr) == (0, ""), on_live.stderr
    assert on_live.stdout == on_file.stdout
    rows, g = json.loads(on_live.stdout), live.guest
    expected = {"ps": lambda: [(p.pid, p.ppid, p.name.decode()) for p in g.processes],
                "modules": lambda: [(d[0], d[1], d[2]) for d in g.drivers],
                "syscalls": lambda: g.services,
                "idt": lambda: [(0, g.idt_handler)]}[command]()
    picked = {"ps": lambda r: (r["pid"], r["ppid"], r["name"]), "modules": lambda r: (r["name"], r["base"], r["size"]),
              "syscalls": lambda r: r["address"], "idt": lambda r: (r["vector"], r["address"])}[command]
    assert [picked(r) for r in rows] == expected


@pytest.mark.guest
def test_info_kernel_found_from_the_live_vcpu(live):
    """info: the kernel base scanned down from the live IDTR's vector 0 handler and the DTB from
    the live CR3 (the file, without CPU state, finds the same values by scans)."""
    g = live.guest
    on_live = json.loads(run_cli("info", live.qemu.target, "--os", "--json").stdout)
    on_file = json.loads(run_cli("info", live.image, "--os", "--json").stdout)
    found = {f["what"]: (f["value"], f["how"]) for f in on_live["kernel"]["found"]}
    assert found["kernel base"] == (g.kernel_va, f"scanned down from IDT vector 0 handler {g.idt_handler:#x} "
                                                 f"(IDTR {g.idtr_base:#x})")
    assert found["DTB"] == (g.fake.cr3, LIVE_STEPS["DTB"])
    assert found["KDBG"][0] == g.kdbg_vaddr and found["PsActiveProcessHead"][0] == g.process_head
    file_found = {f["what"]: (f["value"], f["how"]) for f in on_file["kernel"]["found"]}
    assert file_found["DTB"][0] == g.fake.cr3 and file_found["DTB"][1].startswith("System EPROCESS found by scan")
    assert {w: v for w, (v, _) in found.items()} == {w: v for w, (v, _) in file_found.items() if w in found}


@pytest.mark.guest
def test_python_api(live):
    """attach_qemu + detection: a Windows, its objects as the builder wrote them, and the same
    steps found as Windows.from_memory with the live registers."""
    async def main():
        async with attach_qemu(str(live.qemu.qmp_path)) as vm:
            registers = await vm.all_registers()
            detected, win = from_memory(vm.memory, registers), Windows.from_memory(vm.memory, registers)
            assert isinstance(detected, Windows)
            check_objects(detected, live.guest)  # memory is read while attached
            assert how_found(detected) == how_found(win)
            assert how_found(win)["kernel base"][1].startswith("scanned down from IDT vector 0 handler")

    trio.run(main)


@pytest.mark.guest
def test_guest_found_stopped_never_ran(live):
    """After every command the guest is as QEMU was started: no RESUME (vmwatch's detach never
    let it run), the run state still prelaunch, the vCPU at the reset vector, RAM the image's bytes."""
    for command in (*COMMANDS, "info"):
        assert run_cli(command, live.qemu.target).status == 0
    status = live.monitor.execute("query-status")
    assert [e.name for e in live.monitor.events if e.name in ("RESUME", "STOP")] == []
    assert status == {"status": "prelaunch", "singlestep": False, "running": False}
    text = live.monitor.execute("human-monitor-command", command_line="info registers")
    assert "EIP=0000fff0" in text and "HLT=1" in text
    assert live.qemu.ram_path.read_bytes() == live.image.read_bytes()


def _ssdt_alerts(target: str) -> list[dict]:
    r = run_cli("watch", target, "--rules", "security", "--duration", "2", "--json")
    assert r.status == 0, r.stderr
    alerts = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["rule"] for a in alerts if a.get("event") == "alert" and a["rule"] != "security.ssdt"] == []
    return [a for a in alerts if a.get("event") == "alert" and a["rule"] == "security.ssdt"]


@pytest.mark.guest
@pytest.mark.parametrize("arch", list(ARCHES))
def test_watch_ssdt_entry_written_live(request, tmp_path, arch):
    """vmwatch watch over the clean guest: no alert. SSDT[1] rewritten through the live backend
    (vmwatch write --write) to memory outside every driver: security.ssdt reports it. The vCPU,
    halted with interrupts off, ran no instruction while the watches let QEMU run."""
    g = _guest(request, arch, clean=True)
    image = tmp_path / "clean.raw"
    image.write_bytes(g.raw())
    table = g.rva(SSDT_RVA)
    outside = g.kernel_va + 0x2000000  # no driver there; within an x64 entry's +-128 MiB reach
    entry = struct.pack("<i", (outside - table) << 4 | 2) if g.ptr_size == 8 else struct.pack("<I", outside)
    with WindowsQemu.start(image, g.registers) as qemu:
        assert _ssdt_alerts(qemu.target) == []
        r = run_cli("write", qemu.target, f"{table + 4:#x}", entry.hex(), "--write")
        assert r.status == 0, r.stderr
        assert f"they were {image.read_bytes()[g.paddr(table + 4):g.paddr(table + 8)].hex()}" in r.stdout
        alerts = _ssdt_alerts(qemu.target)
        assert [(a["severity"], a["details"]) for a in alerts] == [
            ("critical", {"index": 1, "address": f"{outside:#x}"})]
        with qemu.monitor() as monitor:
            text = monitor.execute("human-monitor-command", command_line="info registers")
        assert "EIP=0000fff0" in text and "HLT=1" in text


def _wait_for_events(monitor, names: list[str], timeout: float) -> None:
    """Until QMP has sent ``names`` in this order (other events between them are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        monitor.execute("query-status")
        seen = iter(e.name for e in monitor.events)
        if all(name in seen for name in names):
            return
        assert time.monotonic() < deadline, [e.name for e in monitor.events]
        time.sleep(0.05)


@pytest.mark.guest
def test_watch_ssdt_entry_changed_between_ticks(request, tmp_path):
    """SSDT[1] rewritten in guest RAM while a watch runs (from the host, through the RAM file QEMU
    shares, as a DMA or rootkit write would land): the periodic check reports it changed, old and
    new target; nothing was reported before it."""
    g = _guest(request, "x64", clean=True)
    image = tmp_path / "clean.raw"
    image.write_bytes(g.raw())
    table = g.rva(SSDT_RVA)
    outside = g.kernel_va + 0x2000000
    with WindowsQemu.start(image, g.registers) as qemu, qemu.monitor() as monitor:
        watch = subprocess.Popen([sys.executable, "-m", "vmwatch", "watch", qemu.target, "--rules", "security",
                                  "--duration", "12", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            # the guest let run, then stopped and let run twice more: two periodic checks took the baseline
            _wait_for_events(monitor, ["RESUME", "STOP", "RESUME", "STOP", "RESUME"], timeout=30)
            with open(qemu.ram_path, "r+b") as ram:
                ram.seek(g.paddr(table + 4))
                ram.write(struct.pack("<i", (outside - table) << 4 | 2))
            out, err = watch.communicate(timeout=60)
        finally:
            watch.kill()
        text = monitor.execute("human-monitor-command", command_line="info registers")
    assert "EIP=0000fff0" in text and "HLT=1" in text  # the vCPU ran nothing while QEMU ran
    assert watch.returncode == 0, err
    alerts = [json.loads(line) for line in out.splitlines() if json.loads(line).get("event") == "alert"]
    assert [(a["rule"], a["details"]["index"], a["details"]["old"], a["details"]["new"]) for a in alerts] == [
        ("security.ssdt", 1, f"{g.services[1]:#x}", f"{outside:#x}")]


@pytest.mark.guest
def test_vcpu_cr3_not_mapping_the_kernel_is_one_line(request, tmp_path):
    """A live vCPU whose CR3 does not map ntoskrnl (the page of zeros below the tables): exit 2,
    one line naming the DTB, no traceback."""
    g = _guest(request, "x64")
    image = tmp_path / "win.raw"
    image.write_bytes(g.raw())
    bad = attrs.evolve(g.registers, cr3=0x100000)
    with WindowsQemu.start(image, bad) as qemu:
        r = run_cli("ps", qemu.target)
    assert r.status == 2 and "0x100000" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.guest
def test_idtr_into_unmapped_memory_falls_back_to_the_scan(request, tmp_path):
    """A live IDTR pointing at unmapped memory: the kernel base comes from the physical MZ scan
    instead, and ps still lists the builder's processes."""
    g = _guest(request, "x64")
    image = tmp_path / "win.raw"
    image.write_bytes(g.raw())
    with WindowsQemu.start(image, attrs.evolve(g.registers, idtr_base=0xFFFFFA80DEAD0000)) as qemu:
        info = json.loads(run_cli("info", qemu.target, "--os", "--json").stdout)
        ps = run_cli("ps", qemu.target, "--json")
    found = {f["what"]: (f["value"], f["how"]) for f in info["kernel"]["found"]}
    assert found["kernel base"][0] == g.kernel_va and "IDT" not in found["kernel base"][1]
    assert ps.status == 0, ps.stderr
    assert [p["pid"] for p in json.loads(ps.stdout)] == [p.pid for p in g.processes]


COMMON = b"\x04\x00\x00\x00\x04\x0acpu_common" + bytes(8)
"""A cpu_common section header (instance 0, a version); ``halted`` follows."""
CPU = b"\x04\x00\x00\x00\x05\x03cpu" + bytes(8)


@pytest.mark.parametrize(("stream", "why"), [
    (b"", "no single 'cpu_common'"), (bytes(4096), "no single 'cpu_common'"),
    (CPU + bytes(64), "no single 'cpu_common'"), (COMMON + b"\0\0\0\1" + CPU + bytes(64), "halted = 0"),
    (COMMON + bytes(4) + CPU + bytes(64) + CPU, "no single 'cpu'"),
    (COMMON + bytes(4) + CPU, "no reset GDT/IDT"), (COMMON + bytes(4) + CPU + bytes(64), "no reset GDT/IDT")],
    ids=["empty", "zeros", "no-cpu_common", "halted", "two-cpu-sections", "crs-at-section-start", "no-reset-idt"])
def test_patch_refuses_a_stream_it_does_not_know(stream, why, ntoskrnl):
    """A migration stream without the sections and fields expected (each followed by the CR
    values, so only the named check can refuse it): one LabError saying why, nothing patched."""
    from vmwatch.errors import LabError

    registers = WindowsGuest(ntoskrnl).registers
    crs = struct.pack(">QQQQ", registers.cr0 | 0x10, 0, registers.cr3, registers.cr4)
    with pytest.raises(LabError, match=re.escape(why)):
        patch_cpu_state(stream + crs, registers)
