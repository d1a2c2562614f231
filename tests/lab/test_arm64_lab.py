"""The arm64 lab guest (qemu-system-aarch64 -M virt, TCG), booted once per session (tests/conftest.py).

Truth comes from the guest's own shell (/proc), the Debian kernel package's config file, and QEMU's
HMP ``info registers`` (QEMU's own view, not the gdbstub path vmwatch reads).
"""

from __future__ import annotations

import json
import mmap
import re
import struct

import pytest
import trio

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.live.qemu import attach_qemu
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

EM_AARCH64 = 183
KERNEL_HALF = 0xFFFF << 48
"""With 48-bit VAs every TTBR1 (kernel) address has its top 16 bits set."""
TABLE_BASE = ((1 << 48) - 1) & ~1
"""TTBRn_EL1 bits 47:1: the table base (bit 0 is CnP, 63:48 the ASID)."""


def kernel_config(guest, option: str) -> str:
    """A CONFIG_ value from the booted kernel package's own config file."""
    match = re.search(rf"^{option}=(.*)$", guest.kernel.config.read_text(), re.M)
    assert match, option
    return match.group(1)


def kallsyms(guest, name: str) -> int:
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    out = guest.shell(f"grep ' {name}$' /proc/kallsyms", check=True).split()
    assert len(out) == 3 and out[2] == name, out
    return int(out[0], 16)


def system_ram(guest) -> list[tuple[int, int]]:
    """``(start, end)`` of each System RAM range in the guest's /proc/iomem."""
    ranges = []
    for line in guest.shell("cat /proc/iomem", check=True).splitlines():
        if not line.startswith(" ") and line.rstrip().endswith(": System RAM"):
            start, end = line.split(" : ")[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    assert ranges
    return ranges


def hmp_registers(text: str) -> dict[str, int]:
    """PC, SP, X00..X30 and PSTATE from QEMU's aarch64 ``info registers``."""
    return {name: int(value, 16) for name, value in re.findall(r"\b(PC|SP|X\d\d|PSTATE)=([0-9a-f]+)", text)}


def test_boots_to_a_shell_that_says_aarch64(arm64_guest) -> None:
    """The serial console's shell runs on an aarch64 kernel: the Debian arm64 package we unpacked."""
    assert arm64_guest.shell("uname -m", check=True).strip() == "aarch64"
    assert arm64_guest.shell("uname -r", check=True).strip() == arm64_guest.kernel_release
    assert arm64_guest.kernel_release.endswith("-arm64")
    assert "console=ttyAMA0" in arm64_guest.shell("cat /proc/cmdline", check=True)


def test_scenario_module_loads_arm64_modules(arm64_guest) -> None:
    """The initramfs carries the arm64 package's tcp_yeah and its dependency; they load and unload."""
    assert arm64_guest.shell("scenario module", check=True).strip() == "scenario module tcp_yeah"
    loaded = {line.split()[0] for line in arm64_guest.shell("cat /proc/modules", check=True).splitlines()}
    assert {"tcp_yeah", "tcp_vegas"} <= loaded
    arm64_guest.shell("scenario unmodule", check=True)
    assert "tcp_yeah" not in arm64_guest.shell("cat /proc/modules", check=True)


async def test_gdbstub_registers_are_the_kernels(arm64_guest) -> None:
    """pc in kernel text, VBAR at `vectors`, TCR T1SZ/T0SZ/TG1 as the kernel config says, TTBR1 in RAM, as HMP shows."""
    text = (kallsyms(arm64_guest, "_stext"), kallsyms(arm64_guest, "_etext"))
    vectors = kallsyms(arm64_guest, "vectors")
    ram = system_ram(arm64_guest)
    va_bits = int(kernel_config(arm64_guest, "CONFIG_ARM64_VA_BITS"))
    assert kernel_config(arm64_guest, "CONFIG_ARM64_4K_PAGES") == "y"
    async with attach_qemu(str(arm64_guest.qmp_path)) as vm:
        assert vm.arch == "aarch64"
        for _ in range(20):  # an idle guest is nearly always in EL1 (the idle loop); a stop may land in EL0
            await vm.pause()
            regs = await vm.registers()
            if regs.el == 1:
                break
            await vm.resume()
        assert isinstance(regs, Aarch64Registers) and regs.el == 1
        hmp = hmp_registers(await vm.qmp.execute("human-monitor-command", command_line="info registers"))
        await vm.resume()
    assert hmp["PC"] == regs.pc and hmp["SP"] == regs.sp and hmp["PSTATE"] == regs.pstate
    assert [hmp[f"X{i:02d}"] for i in range(31)] == list(regs.x)
    assert text[0] <= regs.pc < text[1], (hex(regs.pc), [hex(t) for t in text])
    assert regs.pc & KERNEL_HALF == KERNEL_HALF and regs.sp & KERNEL_HALF == KERNEL_HALF
    assert regs.sp_el0 & KERNEL_HALF == KERNEL_HALF  # `current`, a task_struct in the kernel half
    tcr = regs.tcr_el1
    assert (tcr >> 16) & 0x3F == 64 - va_bits == 16  # T1SZ: 48-bit kernel half
    assert tcr & 0x3F == 64 - va_bits  # T0SZ
    assert (tcr >> 30) & 3 == 0b10  # TG1 = 4 KiB granule
    base = regs.ttbr1_el1 & TABLE_BASE
    assert base and any(start <= base <= end for start, end in ram), hex(regs.ttbr1_el1)
    assert regs.vbar_el1 == vectors  # QEMU calls it VBAR (AArch32 shares it)


async def test_shared_ram_holds_the_kernel_page_tables(arm64_guest) -> None:
    """The RAM file mapped at virt's 0x40000000 shows TTBR1's table as QEMU's physical reads do."""
    async with attach_qemu(str(arm64_guest.qmp_path)) as vm:
        await vm.pause()
        regs = await vm.registers()
        base = regs.ttbr1_el1 & TABLE_BASE
        table = vm.memory.read(base, 4096)
        stub = await vm.read_memory(base, 4096, physical=True)
        await vm.resume()
    assert vm.memory is not None and table == stub
    # a 48-bit, 4 KiB-granule kernel half has some valid level-0 descriptors (bit 0) in its table
    assert any(struct.unpack_from("<Q", table, off)[0] & 1 for off in range(0, 4096, 8))
    assert arm64_guest.status() == "running"


def test_info_shows_arch_and_system_registers(arm64_guest) -> None:
    """`vmwatch info qemu:...` names the arch and prints the registers the translation layer needs."""
    result = run_cli("info", arm64_guest.target)
    assert result.status == 0, result.stderr
    assert "Arch: aarch64" in result.stdout
    for name in ("PC", "SP_EL0", "TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "X30", "EL"):
        assert re.search(rf"\b{name}: ", result.stdout), name
    data = json.loads(run_cli("info", "--json", arm64_guest.target).stdout)
    assert data["metadata"]["arch"] == "aarch64"
    assert {"x0", "x30", "pc", "pstate", "el", "ttbr1_el1", "tcr_el1", "sp_el0"} <= set(data["registers"][0])


def test_dump_guest_memory_is_an_aarch64_core(arm64_guest, tmp_path) -> None:
    """QMP dump-guest-memory writes an ELF64 core, EM_AARCH64, RAM at 0x40000000 holding the banner."""
    banner = arm64_guest.shell("cat /proc/version", check=True).strip().encode()
    path = arm64_guest.dump(tmp_path / "arm64.elf")
    with open(path, "rb") as f:
        header = f.read(64)
        assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1  # ELF64, little-endian
        e_type, e_machine = struct.unpack_from("<HH", header, 16)
        assert (e_type, e_machine) == (4, EM_AARCH64)  # ET_CORE
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        phdrs = [struct.unpack("<IIQQQQQQ", f.read(phentsize)[:56]) for _ in range(phnum)]
        loads = [(ph[4], ph[2], ph[5]) for ph in phdrs if ph[0] == 1]  # (paddr, file offset, size)
        notes = [(ph[2], ph[5]) for ph in phdrs if ph[0] == 4]
        assert loads[0][0] == 0x40000000 and sum(size for *_, size in loads) == 256 << 20
        f.seek(notes[0][0])
        assert b"CORE\0" in f.read(notes[0][1])  # NT_PRSTATUS of the vCPU
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            found = [view.find(banner, offset, offset + size) for _, offset, size in loads]
    assert max(found) >= 0, "the guest's /proc/version banner is not in the dumped RAM"


@pytest.fixture(scope="module")
def arm64_dump(arm64_guest, tmp_path_factory):
    """A dump taken while paused in EL1, with the gdbstub's registers of that same moment."""

    async def paused_dump():
        async with attach_qemu(str(arm64_guest.qmp_path)) as vm:
            for _ in range(20):
                await vm.pause()
                regs = await vm.registers()
                if regs.el == 1:
                    break
                await vm.resume()
            path = arm64_guest.dump(tmp_path_factory.mktemp("arm64") / "paused.elf")
            await vm.resume()
            return path, regs

    return trio.run(paused_dump)


def test_dump_registers_and_scanned_tables(arm64_guest, arm64_dump) -> None:
    """NT_PRSTATUS gives the gdbstub's x0..x30/sp/pc/pstate; the swapper_pg_dir scan finds the
    gdbstub's TTBR1 base; through it _stext (from /proc/kallsyms) is the iomem "Kernel code" start."""
    from vmwatch.images import open_image
    from vmwatch.memory import GuestMemory
    from vmwatch.os.linux.swapper import find_kernel_tables

    path, live = arm64_dump
    stext = kallsyms(arm64_guest, "_stext")
    code = next(int(line.split("-")[0], 16) for line in arm64_guest.shell("cat /proc/iomem", check=True).splitlines()
                if line.endswith(": Kernel code"))
    with open_image(path) as image:
        (cpu,) = image.cpus
        assert (cpu.x, cpu.sp, cpu.pc, cpu.pstate) == (live.x, live.sp, live.pc, live.pstate)
        assert cpu.ttbr1_el1 is None and cpu.tcr_el1 is None  # QEMU writes no system registers
        found = find_kernel_tables(image)
        assert found.ttbr1 == live.ttbr1_el1 & TABLE_BASE
        assert (found.tcr >> 16 & 0x3F, found.tcr >> 30 & 3) == (live.tcr_el1 >> 16 & 0x3F, live.tcr_el1 >> 30 & 3)
        mem = GuestMemory(image, registers=found.registers(cpu))
        assert mem.translate(stext) == code
        # The gdbstub's own TCR and TTBR1 walk the dump to the same frames.
        exact = GuestMemory(image, registers=live)
        assert exact.read(stext, 4096) == mem.read(stext, 4096)
    info = run_cli("info", str(path))
    assert info.status == 0 and f"TTBR1 {found.ttbr1:#x}" in info.stdout and "found by scanning" in info.stdout
    read = run_cli("read", "--json", str(path), hex(stext), "--length", "16")
    assert read.status == 0, read.stderr
    assert json.loads(read.stdout)["chunks"][0]["physical_address"] == code
