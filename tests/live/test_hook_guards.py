"""Guarded trampolines: their bytes disassembled, then run on this host, and their slots.

On the host (guarded_trampoline_runner.py, in a child process) the watched read points at a
page with no access: a filter that matches dies of SIGSEGV there, one that does not returns
with every register and flag as it was.
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from pathlib import Path

import capstone
import pytest

from vmwatch.engine.page_fault_hooks import (BAD_AREA, HANDLE_MM_FAULT, KERNEL_ADDRESS, TASK_SIZE_MAX,
                                             FAULT_FLAGS_6_1, guards)
from vmwatch.errors import RuleError
from vmwatch.live import hook_guards as hg
from vmwatch.rules import rule

MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
SLOT = 0xFFFFFFFFA025AB00
FULL = hg.Guard(nonnull="rcx", skip_bits=("rdx", 0x20), mode=("rcx", 0x88, True),
                address=("rsi", 0x1000, TASK_SIZE_MAX), pid=(0x1FB80, 0x5A0, 1234))
RUNNER = Path(__file__).with_name("guarded_trampoline_runner.py")
ON_HOST = pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux",
                             reason="runs x86-64 code on a Linux host")
FLAGS = 0x8D7 | 0x400  # CF PF AF ZF SF OF and DF set: a filter that changed any would show


def listing(guard: hg.Guard, slot: int = SLOT) -> tuple[hg.Trampoline, list]:
    tramp = hg.guarded_trampoline(guard, slot)
    return tramp, list(MD.disasm(tramp.code, slot))


class TestBytes:
    def test_the_full_guard_reads_as_its_listing(self) -> None:
        tramp, insns = listing(FULL)
        code = [f"{i.mnemonic} {i.op_str}".strip() for i in insns][:20]
        out = f"{SLOT + 0x4B:#x}"
        assert code == ["pushfq", "test rcx, rcx", f"je {out}", "test edx, 0x20", f"jne {out}",
                        "test byte ptr [rcx + 0x88], 3", f"je {out}",
                        "cmp rsi, qword ptr [rip + 0x32]", f"jb {out}", "cmp rsi, qword ptr [rip + 0x31]", f"jae {out}",
                        "push rax", "mov rax, qword ptr gs:[0x1fb80]", "cmp dword ptr [rax + 0x5a0], 0x4d2", "pop rax",
                        f"jne {out}", "push qword ptr [rip - 0x46]", "lea rsp, [rsp + 8]", "popfq", "ret"]
        assert tramp.stop_offset == 0x46 and len(tramp.code) == 96
        assert tramp.code[0x50:] == (0x1000).to_bytes(8, "little") + TASK_SIZE_MAX.to_bytes(8, "little")

    @pytest.mark.parametrize("guard", [FULL, hg.Guard(), hg.Guard(mode=("rdi", 0x88, False)),
                                       hg.Guard(address=("r9", 0, 1 << 47)),
                                       hg.Guard(address=("r12", 1 << 63, 1 << 64)),
                                       hg.Guard(nonnull="r12", skip_bits=("r8", 0x20)), hg.Guard(pid=(0, 0, 0))])
    def test_every_path_leaves_registers_and_flags_as_found(self, guard: hg.Guard) -> None:
        """Every jump goes to the popfq; only rax is pushed and popped; nothing else writes a
        register; the one read of the watched 8 bytes is the push on the fall-through path."""
        tramp, insns = listing(guard)
        end = next(k for k, i in enumerate(insns) if i.mnemonic == "ret")
        body = insns[: end + 1]
        out = next(i.address for i in body if i.mnemonic == "popfq")
        assert body[0].mnemonic == "pushfq" and body[-2].address == out and body[-1].mnemonic == "ret"
        allowed = {"pushfq", "test", "cmp", "je", "jne", "jb", "jae", "push", "pop", "mov", "lea", "popfq", "ret"}
        assert {i.mnemonic for i in body} <= allowed
        for i in body:
            if i.mnemonic.startswith("j"):
                assert int(i.op_str, 16) == out, i
            if i.mnemonic in ("push", "pop") and "ptr" not in i.op_str:
                assert i.op_str == "rax"
            if i.mnemonic == "mov":
                assert i.op_str.startswith("rax, qword ptr gs:")
        pushes = [i for i in body if i.mnemonic == "push" and "rip" in i.op_str]
        assert len(pushes) == 1 and pushes[0].address + pushes[0].size == SLOT + tramp.stop_offset
        assert int(pushes[0].op_str.split("rip ")[1].strip("]").replace(" ", ""), 16) + SLOT + tramp.stop_offset == SLOT
        assert [i.mnemonic for i in body if i.address > pushes[0].address] == ["lea", "popfq", "ret"]
        assert [i.mnemonic for i in body].count("push") - [i.mnemonic for i in body].count("pop") == 1

    @pytest.mark.parametrize("reg", [r for r in hg.REGS if r != "rsp"])
    def test_every_register_is_encoded_as_itself(self, reg: str) -> None:
        _, insns = listing(hg.Guard(nonnull=reg, skip_bits=(reg, 1), mode=(reg, 0x88, True), address=(reg, 1, 2)))
        low = {"rax": "eax", "rcx": "ecx", "rdx": "edx", "rbx": "ebx", "rbp": "ebp", "rsi": "esi",
               "rdi": "edi"}.get(reg, reg + "d")
        tests = [f"{i.mnemonic} {i.op_str}" for i in insns if i.mnemonic in ("test", "cmp")]
        assert tests[:3] == [f"test {reg}, {reg}", f"test {low}, 1", f"test byte ptr [{reg} + 0x88], 3"]
        assert [t.split("[")[0] for t in tests[3:]] == [f"cmp {reg}, qword ptr "] * 2

    @pytest.mark.parametrize("bad", [{"nonnull": "rsp"}, {"nonnull": "eax"}, {"mode": ("rip", 0, True)},
                                     {"address": ("rsi", 5, 5)}, {"address": ("rsi", 0, (1 << 64) + 1)},
                                     {"pid": (0, 0, 1 << 32)}, {"pid": (-1, 0, 1)}, {"mode": ("rcx", 1 << 31, True)}])
    def test_bad_guards_are_refused(self, bad: dict) -> None:
        with pytest.raises(ValueError):
            hg.Guard(**bad)


def run_on_host(guard: hg.Guard, registers: dict, cs: int = 0x33, tgid: int = 0) -> subprocess.CompletedProcess:
    case = {"guard": {k: getattr(guard, k) for k in ("nonnull", "skip_bits", "mode", "address", "pid")},
            "registers": registers, "cs": cs, "tgid": tgid, "rflags": FLAGS}
    return subprocess.run([sys.executable, str(RUNNER), json.dumps(case)], capture_output=True, text=True,
                          timeout=60)


@ON_HOST
class TestOnTheHost:
    MATCH = {"rcx": "frame", "rdx": 0x40, "rsi": 0x5000}

    def test_a_matching_filter_makes_the_watched_read(self) -> None:
        done = run_on_host(FULL, self.MATCH, tgid=1234)
        assert done.returncode == -signal.SIGSEGV, done

    @pytest.mark.parametrize(("registers", "cs", "tgid"), [
        ({"rcx": 0}, 0x33, 1234),                   # regs NULL: get_user_pages
        ({"rdx": 0x60}, 0x33, 1234),                # FAULT_FLAG_TRIED: a retry
        ({}, 0x10, 1234),                           # kernel mode
        ({"rsi": 0xFFF}, 0x33, 1234),               # below the range
        ({"rsi": TASK_SIZE_MAX}, 0x33, 1234),       # at its end
        ({}, 0x33, 1235),                           # another process
    ], ids=["null-regs", "retry", "kernel", "below", "end", "other-pid"])
    def test_a_filter_that_fails_returns_with_nothing_changed(self, registers, cs, tgid) -> None:
        done = run_on_host(FULL, {**self.MATCH, **registers}, cs=cs, tgid=tgid)
        assert done.returncode == 0, done
        result = json.loads(done.stdout)
        assert result["after"] == result["before"] and result["rsp_moved"] == 0
        assert result["rflags"] == FLAGS | 0x200  # IF: always set in user mode (popfq cannot clear it)


class TestLeftBehind:
    @pytest.mark.parametrize("guard", [FULL, hg.Guard(), hg.Guard(pid=(0, 0, 0)), hg.Guard(mode=("rdi", 0x88, False))])
    def test_any_guards_trampoline_is_recognised_at_its_own_slot(self, guard: hg.Guard) -> None:
        code = hg.guarded_trampoline(guard, SLOT).code + b"\xcc" * 64
        assert len(code) - 64 <= hg.LARGEST
        assert hg.left_guarded(code[: hg.LARGEST], SLOT)  # (rip-relative: any slot reads itself)

    @pytest.mark.parametrize("code", [
        b"", b"\xcc" * 128, hg.guarded_trampoline(FULL, SLOT).code[1:],    # no pushfq first
        hg.guarded_trampoline(hg.Guard(), SLOT, SLOT + 0x100).code,          # it watches another read
        bytes.fromhex("ff35faffffff488d642408c3"),                          # a plain trampoline
        b"\x9c\x48\x8d\x64\x24\x08\x9d\xc3",                                    # the tail, no push
    ])
    def test_nothing_else_is(self, code: bytes) -> None:
        assert not hg.left_guarded(code, SLOT)


class TestSlots:
    def test_slots_lie_in_long_int3_runs_only(self) -> None:
        base = 0xFFFFFFFF81000000
        code = b"\xc3" + b"\xcc" * 15 + b"\x90" * 200 + b"\xc3" + b"\xcc" * 300 + b"\x55"
        run = 216 + 1
        found = hg.int3_slots(code, base, 96, [], count=4)
        assert found == [(base + run + hg.MARGIN + 15) & ~15, ((base + run + hg.MARGIN + 15) & ~15) + 96]
        assert all(code[s - base : s - base + 96] == b"\xcc" * 96 for s in found)
        assert all(s + 96 <= base + len(code) - 1 - hg.MARGIN for s in found)
        assert hg.int3_slots(code, base, 96, [(found[0], 96), (found[1], 96)]) == []
        assert hg.int3_slots(b"\xcc" * (hg.MIN_RUN - 1), base, 8, []) == []


    def test_the_lab_kernel_has_room_for_thousands(self) -> None:
        """Debian's 6.1 text: padding between functions holds at most 15 bytes (a 16-byte block
        after ``ret; int3``), a guarded trampoline needs up to 96; the linker's int3 fill (the
        SRSO thunks' alignment gaps: ~1 and ~1.7 MiB) holds tens of thousands."""
        from vmwatch.lab.kernel import _elf_section, ensure_kernel

        text = _elf_section(ensure_kernel("amd64").vmlinux().read_bytes(), ".text")
        base = 0xFFFFFFFF81000000
        slots = hg.int3_slots(text, base, 96, [], count=10**6)
        assert len(slots) > 30_000, len(slots)
        assert all(text[s - base : s - base + 96] == b"\xcc" * 96 for s in slots[:: 997])
        from vmwatch.live.inline_hooks import free_slots

        assert free_slots(b"\xc3" + b"\xcc" * 15 + b"\x90" * 16, base, [], size=15) == [base + 1]
        assert free_slots(b"\xc3" + b"\xcc" * 15 + b"\x90" * 16, base, [], size=16) == []


class TestPageFaultGuards:
    def test_the_paths_split_the_address_space(self) -> None:
        every = guards(frozenset({True, False}), None, None, FAULT_FLAGS_6_1)
        assert set(every) == {HANDLE_MM_FAULT, KERNEL_ADDRESS, BAD_AREA}
        assert every[HANDLE_MM_FAULT].nonnull == "rcx" and every[HANDLE_MM_FAULT].skip_bits == ("rdx", 0x20)
        assert every[KERNEL_ADDRESS].address == ("rdx", TASK_SIZE_MAX, 1 << 64)
        assert every[BAD_AREA].address == ("rdx", 0, TASK_SIZE_MAX)
        assert all(g.mode is None for g in every.values())
        user = guards(frozenset({True}), (0x1000, 0x2000), (0x1FB80, 0x5A0, 7), FAULT_FLAGS_6_1)
        assert set(user) == {HANDLE_MM_FAULT, BAD_AREA}
        assert user[HANDLE_MM_FAULT].mode == ("rcx", 0x88, True) and user[BAD_AREA].mode == ("rdi", 0x88, True)
        assert user[HANDLE_MM_FAULT].address == ("rsi", 0x1000, 0x2000) and user[BAD_AREA].pid == (0x1FB80, 0x5A0, 7)
        assert set(guards(frozenset({False}), (1 << 63, 1 << 64), None, FAULT_FLAGS_6_1)) == {KERNEL_ADDRESS}

    @pytest.mark.parametrize(("vector", "address"), [
        (14, (5, 5)), (14, (0, (1 << 64) + 1)), (14, [0, 10]), (14, (True, 3)), (13, (0, 10)), (14, (-1, 4))])
    def test_bad_address_filters_are_refused(self, vector, address) -> None:
        with pytest.raises(RuleError):
            rule.on_exception(vector, address=address)
