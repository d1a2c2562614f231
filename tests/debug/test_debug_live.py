"""The debugger on the live lab guest: break on a kernel function the scenario calls, step, examine.

Truth comes from inside the guest: /proc/kallsyms (kptr_restrict off) for addresses, the kernel's
call chain for the return address, capstone's decode of the bytes for where each step must land.
"""

from __future__ import annotations

import re

import pytest

from vmwatch.debug import Debugger
from vmwatch.events import Access, Breakpoint, MemoryAccess
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

SLEEPER = "sh -c 'while :; do sleep 0.1; done' >/dev/null 2>&1 & echo $!"


@pytest.fixture
def sleeper(lab_guest):
    """A guest process that keeps calling nanosleep; killed afterwards (the guest is shared)."""
    lab_guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict")
    text = lab_guest.shell(r"grep -E ' [Tt] (do_nanosleep|hrtimer_nanosleep)$' /proc/kallsyms")
    truth = {m.group(2): int(m.group(1), 16) for m in re.finditer(r"([0-9a-f]{16}) [Tt] (\w+)", text)}
    pid = int(lab_guest.shell(SLEEPER).split()[-1])
    yield truth
    lab_guest.shell(f"kill {pid}")


def _landing(insn) -> set[int] | None:
    """Where executing ``insn`` may leave RIP (None: an indirect branch or return, not predictable)."""
    after = insn.address + insn.size
    if insn.mnemonic in ("ret", "iretq", "sysretq") or (insn.mnemonic in ("call", "jmp") and insn.target is None):
        return None
    if insn.mnemonic in ("call", "jmp"):
        return {insn.target}
    if insn.mnemonic.startswith("j") or insn.mnemonic.startswith("loop"):
        return {after, insn.target}
    return {after}


class TestLiveSession:
    def test_break_step_examine(self, lab_guest, sleeper):
        """Stop at do_nanosleep, step 12 instructions checking RIP against the decode, read memory."""
        with Debugger.open(lab_guest.target) as dbg:
            assert not dbg.read_only
            bp = dbg.add_breakpoint("do_nanosleep")
            assert bp.address == sleeper["do_nanosleep"]
            event = dbg.cont(timeout=60)
            assert isinstance(event, Breakpoint) and event.address == sleeper["do_nanosleep"]
            regs = dbg.registers()
            assert regs.rip == sleeper["do_nanosleep"]
            assert dbg.current_task().comm == "sleep"
            # the return address on top of the stack is in the caller, hrtimer_nanosleep
            ret = int.from_bytes(dbg.read(regs.rsp, 8), "little")
            assert dbg.symbolize(ret).startswith("hrtimer_nanosleep+")
            assert sleeper["hrtimer_nanosleep"] < ret < sleeper["hrtimer_nanosleep"] + 0x400
            dbg.delete(bp.number)
            checked = 0
            for _ in range(12):
                insn = dbg.disassemble("$rip", 1)[0]
                rip = dbg.step()
                assert rip == dbg.registers().rip
                allowed = _landing(insn)
                if allowed is not None:
                    assert rip in allowed, f"{insn.mnemonic} {insn.op_str} at {insn.address:#x} -> {rip:#x}"
                    checked += 1
            assert checked >= 8
            frames = dbg.backtrace()
            assert any(f.symbol and f.symbol.startswith("hrtimer_nanosleep") for f in frames[1:])
        assert lab_guest.shell("echo alive").strip() == "alive"  # detached: the guest runs again

    def test_watch_memory(self, lab_guest, sleeper):
        """A write watchpoint on jiffies_64 stops the guest when the timer tick updates it."""
        address = int(lab_guest.shell(r"grep -E ' [DdBb] jiffies_64$' /proc/kallsyms").split()[0], 16)
        with Debugger.open(lab_guest.target) as dbg:
            before = int.from_bytes(dbg.read("jiffies_64", 8), "little")
            wp = dbg.add_watchpoint("jiffies_64", 8, Access.WRITE)
            assert wp.address == address
            event = dbg.cont(timeout=60)
            assert isinstance(event, MemoryAccess) and event.address == address
            dbg.delete(wp.number)
            dbg.step()  # finish the writing instruction if the stop came before it retired
            assert int.from_bytes(dbg.read("jiffies_64", 8), "little") > before

    def test_next_steps_over_a_call(self, lab_guest, sleeper):
        """Step over from the breakpoint until a call: RIP lands right after the call instruction."""
        with Debugger.open(lab_guest.target) as dbg:
            dbg.add_breakpoint("do_nanosleep")
            dbg.cont(timeout=60)
            dbg.delete(1)
            for _ in range(40):
                insn = dbg.disassemble("$rip", 1)[0]
                if insn.mnemonic == "call":
                    assert dbg.next(timeout=30) == insn.address + insn.size
                    break
                dbg.step()
            else:
                pytest.fail("no call within 40 instructions of do_nanosleep")

    def test_scripted_session(self, lab_guest, sleeper, tmp_path):
        """`vmwatch debug --break do_nanosleep --script` runs to the break, steps, examines, with one bad line."""
        script = tmp_path / "script.txt"
        script.write_text("continue 60\ntask\nstep 3\nx/2g $rsp\nx/8b 0x10\nx/s linux_banner\nbt\nquit\n")
        result = run_cli("debug", lab_guest.target, "--break", "do_nanosleep", "--script", script)
        out = result.stdout
        assert f"breakpoint 1 at {sleeper['do_nanosleep']:#x} <do_nanosleep>" in out
        assert "breakpoint 1 hit on vCPU 0" in out
        assert "comm 'sleep'" in out
        assert "Linux version" in out
        assert result.stderr.count("error:") == 1 and "0x10" in result.stderr  # x/8b 0x10: unmapped
        assert result.status == 1
        assert lab_guest.shell("echo alive").strip() == "alive"
