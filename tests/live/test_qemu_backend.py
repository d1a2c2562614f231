"""The QEMU live backend against the real lab guest (TCG). Truth comes from inside the guest."""

from __future__ import annotations

import os
import signal

import capstone
import pytest
import trio

from vmwatch.events import Access, Breakpoint, MemoryAccess, SourceEnded
from vmwatch.live.qemu import attach_qemu
from vmwatch.errors import PhysicalReadError, UnsupportedOperation
from vmwatch.live.qemu_ram import GdbMemory, SharedRam

pytestmark = pytest.mark.guest


def kallsyms(guest, name: str) -> int:
    """Address of a kernel symbol as the guest itself reports it."""
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    out = guest.shell(f"grep ' {name}$' /proc/kallsyms", check=True).split()
    assert len(out) == 3 and out[2] == name, out
    return int(out[0], 16)


async def shell(guest, command: str, timeout: float = 60) -> str:
    """Run a guest shell command in a thread (the guest must be running for it to answer)."""
    return await trio.to_thread.run_sync(lambda: guest.shell(command, timeout=timeout))


async def test_mapped_ram_equals_gdbstub(lab_guest) -> None:
    """Bytes read from the shared RAM file equal what QEMU's gdbstub reads in physical mode."""
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        assert isinstance(vm.memory, SharedRam) and vm.memory.volatile and not vm.memory.writable
        await vm.pause()
        regs = await vm.registers()
        compared = 0
        for run in vm.memory.runs:
            for paddr in (run.start, run.start + run.size // 2 & ~0xFFF, run.end - 0x1800):
                stub = await vm.read_memory(paddr, 0x1800, physical=True)
                assert vm.memory.read(paddr, 0x1800) == stub, hex(paddr)
                compared += 1
        # the page the CPU's page tables start at, a page that is surely in use
        cr3 = regs.cr3 & ~0xFFF
        assert vm.memory.read(cr3, 4096) == await vm.read_memory(cr3, 4096, physical=True)
        assert any(vm.memory.read(cr3, 4096))
        assert compared >= 3
        await vm.resume()
    assert lab_guest.status() == "running"


async def test_breakpoint_fires_with_rip(lab_guest) -> None:
    """A breakpoint on the write syscall fires once per `scenario writes` write, at its address."""
    target = kallsyms(lab_guest, "__x64_sys_write")
    writes = 25
    hits = 0
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        await vm.add_breakpoint(target)
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()

            async def trigger() -> None:
                out = await shell(lab_guest, f"scenario writes {writes}")
                assert f"scenario writes {writes}" in out
                watching.cancel()

            nursery.start_soon(trigger)
            with trio.fail_after(120), watching:
                async for event in vm.events():
                    assert isinstance(event, Breakpoint), event
                    assert event.address == target and event.vcpu == 0
                    regs = await vm.registers(event.vcpu)
                    assert regs.rip == target and regs.cr3 and regs.gdtr_base and regs.idtr_base
                    hits += 1
        await vm.remove_breakpoint(target)
        await vm.resume()
    # dd writes `writes` bytes one at a time; the shell's own output adds a few more writes
    assert hits >= writes


async def test_write_watchpoint_fires_with_address(lab_guest) -> None:
    """Writing a sysctl from the guest shell trips a write watchpoint on its kernel variable."""
    variable = kallsyms(lab_guest, "dmesg_restrict")
    before = lab_guest.shell("cat /proc/sys/kernel/dmesg_restrict").strip()
    new = "0" if before == "1" else "1"
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        await vm.add_watchpoint(variable, 4, Access.WRITE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shell, lab_guest, f"echo {new} > /proc/sys/kernel/dmesg_restrict")
            with trio.fail_after(60):
                async for event in vm.events():
                    assert isinstance(event, MemoryAccess), event
                    assert event.address == variable and event.access is Access.WRITE and event.size == 4
                    assert int.from_bytes(event.value, "little") == int(new)
                    break
            await vm.remove_watchpoint(variable, 4, Access.WRITE)
            await vm.resume()
    assert lab_guest.shell("cat /proc/sys/kernel/dmesg_restrict").strip() == new
    lab_guest.shell(f"echo {before} > /proc/sys/kernel/dmesg_restrict", check=True)


async def test_read_watchpoint_over_a_range(lab_guest) -> None:
    """Reading a sysctl trips a read watchpoint on a 64-byte range starting at its variable."""
    variable = kallsyms(lab_guest, "dmesg_restrict")
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        await vm.add_watchpoint(variable, 64, Access.READ)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shell, lab_guest, "cat /proc/sys/kernel/dmesg_restrict")
            with trio.fail_after(60):
                async for event in vm.events():
                    assert isinstance(event, MemoryAccess), event
                    assert event.address == variable and event.access is Access.READ and event.size == 64
                    break
            await vm.remove_watchpoint(variable, 64, Access.READ)
            await vm.resume()


async def test_single_steps_follow_instruction_lengths(lab_guest) -> None:
    """Each single step moves RIP by the capstone length of the instruction (when not a branch)."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    branch = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_IRET,
              capstone.CS_GRP_INT)
    target = kallsyms(lab_guest, "__x64_sys_write")
    checked = 0
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        await vm.add_breakpoint(target)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shell, lab_guest, "scenario writes 3")
            with trio.fail_after(60):
                async for event in vm.events():
                    break
            await vm.remove_breakpoint(target)
            rip = (await vm.registers()).rip
            assert rip == target
            for _ in range(40):
                insn = next(md.disasm(await vm.read_memory(rip, 16), rip))
                stepped = await vm.step(0)
                if not any(insn.group(g) for g in branch):
                    assert stepped.rip == rip + insn.size, f"{insn.mnemonic} {insn.op_str} at {rip:#x}"
                    checked += 1
                rip = stepped.rip
                assert (await vm.registers()).rip == rip
            await vm.resume()
    assert checked >= 20


async def test_pause_resume_leaves_guest_running(lab_guest) -> None:
    """A paused guest stands still (RIP unchanged); register writes read back; every resume runs
    the on_resume hooks; after resume the shell answers."""
    resumes = []
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        vm.on_resume.append(lambda: resumes.append(1))
        for _ in range(3):
            await vm.pause()
            assert await vm.status() in ("paused", "debug")
            first = await vm.registers()
            await trio.sleep(0.2)
            assert (await vm.registers()).rip == first.rip
            await vm.set_registers(0, r15=first.r15 ^ 0x5A5A)
            assert (await vm.registers()).r15 == first.r15 ^ 0x5A5A
            await vm.set_registers(0, r15=first.r15)
            assert (await vm.registers()).r15 == first.r15
            with pytest.raises(ValueError):
                await vm.set_registers(0, no_such_register=1)
            await vm.resume()
            assert await vm.status() == "running"
    assert len(resumes) == 3
    assert lab_guest.status() == "running"
    assert lab_guest.shell("echo still-alive").strip() == "still-alive"


async def test_no_shared_ram_smp_and_qemu_death(lab_guest_factory) -> None:
    """Without shared RAM memory comes through the gdbstub; on 2 vCPUs a write loop pinned to
    CPU 1 hits as vCPU 1; killing QEMU ends the stream."""
    guest = await trio.to_thread.run_sync(lambda: lab_guest_factory(cpus=2, shared_ram=False))
    target = kallsyms(guest, "ksys_write")
    banner = kallsyms(guest, "linux_banner")
    version = guest.shell("cat /proc/version", check=True).encode()
    gpa = guest.qmp().execute("human-monitor-command", {"command-line": f"gva2gpa {banner:#x}"})
    gpa = int(gpa.split()[-1], 16)
    guest.shell("taskset 2 dd if=/dev/zero of=/dev/null bs=1 </dev/null >/dev/null 2>&1 &", check=True)
    seen = []
    async with attach_qemu(str(guest.qmp_path)) as vm:
        assert isinstance(vm.memory, GdbMemory) and vm.vcpu_count == 2
        assert vm.running
        assert vm.memory.read(gpa, len(version)) == version  # the guest is stopped just for the read
        assert vm.running and await vm.status() == "running"
        with pytest.raises(PhysicalReadError):
            vm.memory.read(vm.memory.size + 0x1000, 16)
        await vm.add_breakpoint(target)
        with trio.fail_after(60):
            async for event in vm.events():
                if isinstance(event, SourceEnded):
                    seen.append(event)
                    break
                assert isinstance(event, Breakpoint) and event.address == target
                seen.append(event)
                if len(seen) == 30:
                    os.kill(guest.pid, signal.SIGKILL)
    assert isinstance(seen[-1], SourceEnded)
    assert sum(e.vcpu == 1 for e in seen[:-1]) >= 20, [e.vcpu for e in seen]


async def test_writable_ram_changes_what_the_guest_sees(lab_guest) -> None:
    """A write through the mapped RAM file (writable attach) is what the guest's /proc shows."""
    variable = kallsyms(lab_guest, "dmesg_restrict")
    before = int(lab_guest.shell("cat /proc/sys/kernel/dmesg_restrict"))
    gpa = int(lab_guest.qmp().execute("human-monitor-command", {"command-line": f"gva2gpa {variable:#x}"}).split()[-1], 16)
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        with pytest.raises(UnsupportedOperation):
            vm.memory.write(gpa, b"\0")
    async with attach_qemu(str(lab_guest.qmp_path), writable=True) as vm:
        assert vm.memory.writable
        assert int.from_bytes(vm.memory.read(gpa, 4), "little") == before
        vm.memory.write(gpa, (1 - before).to_bytes(4, "little"))
    assert int(lab_guest.shell("cat /proc/sys/kernel/dmesg_restrict")) == 1 - before
    lab_guest.shell(f"echo {before} > /proc/sys/kernel/dmesg_restrict", check=True)
