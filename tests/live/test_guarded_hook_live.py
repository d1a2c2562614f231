"""A guarded inline hook on the lab guest, through the QEMU backend alone.

``vfs_write(file, buf, count, pos)`` with a guard on RDX (count): ``dd bs=4242 count=7`` makes
exactly seven writes of 4242 bytes, the shell and everything else other sizes. Truth: dd's own
record count, QEMU's HMP ``x`` (the bytes the guest executes) and ``info jit`` (flushes).
"""

from __future__ import annotations

import pytest
import trio

from tests.live.test_inline_hooks import NOP5, decode, executed_bytes, kallsyms, tb_flushes
from vmwatch.events import Breakpoint
from vmwatch.live import inline_hooks as ih
from vmwatch.live.hook_guards import Guard
from vmwatch.live.qemu import attach_qemu

pytestmark = pytest.mark.guest
SIZE = 4242
COUNT = 7


async def test_a_guarded_hook_stops_only_where_its_guard_holds(lab_guest) -> None:
    target = kallsyms(lab_guest, "vfs_write")
    stops: list = []
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        assert await vm.add_breakpoint(target, inline=True, guard=Guard(address=("rdx", SIZE, SIZE + 1))) is True
        assert (await executed_bytes(vm, target, 5))[0] == ih.CALL_REL32 and await vm.read_memory(target, 5) == NOP5
        flushes = await tb_flushes(vm)
        out = ""
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()

            async def trigger() -> None:
                nonlocal out
                out = await trio.to_thread.run_sync(lambda: lab_guest.shell(
                    f"dd if=/dev/zero of=/dev/null bs={SIZE} count={COUNT}; echo written", timeout=60))
                watching.cancel()

            nursery.start_soon(trigger)
            with trio.fail_after(120), watching:
                async for event in vm.events():
                    assert isinstance(event, Breakpoint) and event.address == target
                    regs = await vm.registers(event.vcpu)
                    ret = int.from_bytes(await vm.read_memory(regs.rsp, 8), "little")
                    call = decode(await vm.read_memory(ret - 5, 5), ret - 5)
                    stops.append((regs.rip, regs.rdx, call[0].split()[0] if call else None, regs.rflags))
                    if len(stops) == 2:  # out of the trampoline for real: RIP, RSP and RFLAGS put back
                        await vm.set_registers(event.vcpu, rbx=regs.rbx)
                        assert await vm.registers(event.vcpu) == regs
                    await vm.resume()
        assert f"{COUNT}+0 records out" in out and "written" in out, out
        assert [s[:3] for s in stops] == [(target, SIZE, "call")] * COUNT, stops
        assert all(s[3] & 0x202 == 0x202 for s in stops)  # the caller's flags: bit 1, interrupts on
        assert await tb_flushes(vm) == flushes
        await vm.remove_breakpoint(target)
        assert await executed_bytes(vm, target, 5) == NOP5
        await vm.resume()
    assert lab_guest.shell("echo alive", check=True).strip().endswith("alive")
