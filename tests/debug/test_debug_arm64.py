"""``vmwatch debug`` on the arm64 lab guest (TCG, KASLR, pointer authentication on) and on its dump.

Truth: symbol addresses from the guest's /proc/kallsyms, the task from the guest's own shell (the
pid of the busy loop) or QEMU's SP_EL0, registers, stack words and code from QEMU's HMP (its own
MMU and disassembler), never from vmwatch's readers. The syscall path a breakpoint in
``ksys_write`` sits on is the kernel's (arch/arm64/kernel/syscall.c, entry-common.c).
"""

from __future__ import annotations

import re

import pytest

from vmwatch.debug import Debugger
from vmwatch.testing.arm64truth import has_pac, hmp_registers, hmp_words, kallsyms, pac_stripped, stack_words
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

WRITE_PATH = ["__arm64_sys_write", "invoke_syscall", "el0_svc_common.constprop.0", "do_el0_svc", "el0_svc",
              "el0t_64_sync_handler", "el0t_64_sync"]
"""Callers of ksys_write for a write(2) from user space, innermost first."""
def symbol_parts(label: str) -> tuple[str, int]:
    name, _, offset = label.partition("+")
    return name, int(offset, 16) if offset else 0


def test_live_break_bt_step_next(arm64_guest) -> None:
    """Break on ksys_write by name while dd writes: pc, x0..x30 as QEMU has them; bt walks the write path
    from x30 and the stacked return addresses, their PACs (as QEMU reads the stack) stripped; the task is dd; dis shows
    the words QEMU reads; three steps run the entry's straight line; next runs a bl to its return."""
    truth = kallsyms(arm64_guest, "ksys_write", *WRITE_PATH)
    busy = int(arm64_guest.shell("scenario busy start", check=True).split()[-1])
    try:
        with Debugger.open(arm64_guest.target) as dbg:
            bp = dbg.add_breakpoint("ksys_write")
            assert bp.address == truth["ksys_write"]
            dbg.cont(timeout=120)
            regs, hmp = dbg.registers(), hmp_registers(arm64_guest)
            assert regs.pc == hmp["PC"] == truth["ksys_write"] and regs.sp == hmp["SP"]
            assert list(regs.x) == [hmp[f"X{i:02d}"] for i in range(31)]
            frames = dbg.backtrace()
            stack = hmp_words(arm64_guest, regs.sp, stack_words(regs.sp))
            task = dbg.current_task()
            code = dbg.disassemble("$pc", 3)
            words = hmp_words(arm64_guest, regs.pc, 3, "w")
            dbg.delete(bp.number)
            after = dbg.step(3)
            stepped = hmp_registers(arm64_guest)["PC"]
            call = next(i for i in dbg.disassemble("$pc", 40) if i.mnemonic == "bl")
            for _ in range(40):  # ksys_write's code up to its first call (fdget_pos) is straight
                if dbg.registers().pc == call.address:
                    break
                dbg.step()
            sp = dbg.registers().sp
            returned = dbg.next(timeout=60)
            back = hmp_registers(arm64_guest)
    finally:
        arm64_guest.shell("scenario busy stop", check=True)
    # at the entry x30 is the bl's return address, not yet signed (ksys_write's own paciasp does that)
    assert frames[1].address == hmp["X30"] and frames[1].stack_address is None
    names = [symbol_parts(f.symbol)[0] for f in frames[1:len(WRITE_PATH) + 1]]
    assert names == WRITE_PATH, [f.symbol for f in frames]
    for frame in frames[1:]:
        name, offset = symbol_parts(frame.symbol)
        assert name not in truth or truth[name] + offset == frame.address
    signed = [stack[(f.stack_address - regs.sp) // 8] for f in frames[2:] if f.stack_address < regs.sp + 8 * len(stack)]
    assert signed and all(pac_stripped(raw) == f.address for raw, f in zip(signed, frames[2:]))
    assert any(has_pac(raw) for raw in signed)  # paciasp signed the return addresses on the stack
    assert (task.pid, task.comm) == (busy, "dd")
    assert [int.from_bytes(i.raw, "little") for i in code] == words
    assert [i.mnemonic for i in code] == ["mov", "nop", "paciasp"] and code[0].op_str == "x9, x30"
    assert after == stepped == truth["ksys_write"] + 12
    assert returned == back["PC"] == call.address + 4 and back["SP"] == sp
    assert arm64_guest.status() == "running"


def test_dump_registers_bt_task_and_refusals(arm64_guest, arm64_idle_dump) -> None:
    """On the dump (read-only): registers are QEMU's; bt's frames from stacked records are those words
    with the PAC stripped, each at its kallsyms offset; task is the task QEMU's SP_EL0 named (found from
    the stack that holds SP, as the dump has no SP_EL0); step is refused with one error line."""
    path, live, hmp, stack = arm64_idle_dump
    script = "regs pc sp x30 pstate\nbt\ntask\ndis $pc 2\nstep\nx/2gx $sp\n"
    result = run_cli("debug", str(path), stdin=script)
    out = result.stdout
    assert result.status == 1 and result.stderr == "error: cannot step: the target is a memory image (read-only session)\n"
    regs = dict(re.findall(r"^(pc|sp|x30|pstate)\s+(0x[0-9a-f]+)", out, re.M))
    assert {name: int(value, 16) for name, value in regs.items()} == {
        "pc": hmp["PC"], "sp": hmp["SP"], "x30": hmp["X30"], "pstate": hmp["PSTATE"]}
    frames = re.findall(r"^#(\d+)\s+(0x[0-9a-f]+) <([^>]+)>(?:\s+\(stack (0x[0-9a-f]+)\))?", out, re.M)
    assert int(frames[0][1], 16) == hmp["PC"] and len(frames) >= 3
    truth = kallsyms(arm64_guest, *{symbol_parts(label)[0] for _, _, label, _ in frames})
    for _, address, label, where in frames:
        name, offset = symbol_parts(label)
        assert truth[name] + offset == int(address, 16), label
        if where and int(where, 16) < hmp["SP"] + 8 * len(stack):
            assert pac_stripped(stack[(int(where, 16) - hmp["SP"]) // 8]) == int(address, 16)
    task = re.search(r"^pid (\d+) tgid \d+ comm '([^']*)' task_struct (0x[0-9a-f]+)", out, re.M)
    assert task and int(task.group(3), 16) == live.sp_el0
    assert f"{hmp['SP']:#018x}  {stack[0]:#018x} {stack[1]:#018x}" in out
    assert re.search(rf"=> {hmp['PC']:#x} <{re.escape(frames[0][2])}>:", out)


def test_live_watchpoint_stops_after_the_store(arm64_guest) -> None:
    """A write watch on CPU 0's rq->clock (the tick updates it): each stop is just past the store QEMU
    disassembles there, with the value QEMU then reads at the address; the next stop has a new value
    (an aarch64 watchpoint fires before the access: the backend runs that one instruction)."""
    from vmwatch.events import Access
    from vmwatch.testing.arm64truth import hmp

    seen = []
    with Debugger.open(arm64_guest.target) as dbg:
        linux = dbg.session.linux
        address = linux.per_cpu("runqueues", 0) + linux.types.offset("rq", "clock")
        dbg.add_watchpoint(hex(address), 8, Access.WRITE)
        for _ in range(3):
            event = dbg.cont(timeout=60)
            pc = dbg.registers().pc
            store = hmp(arm64_guest, f"x /1i {pc - 4:#x}")
            seen.append((event.address, int.from_bytes(event.value, "little"), hmp_words(arm64_guest, address, 1)[0],
                         pc, hmp_registers(arm64_guest)["PC"], store))
    for at, value, qemu_value, pc, qemu_pc, store in seen:
        assert at == address and value == qemu_value and pc == qemu_pc
        assert re.search(r"\bst(r|p|ur)\b", store), store
    assert len({value for _, value, *_ in seen}) == 3
    assert arm64_guest.status() == "running"
