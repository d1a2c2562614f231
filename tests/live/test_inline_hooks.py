"""Inline hooks: the pure pieces on built code, then the real thing on the lab guest.

On the guest, truth comes from QEMU itself (HMP ``x`` shows the bytes the guest executes, ``info
jit`` counts translation-cache flushes) and from the guest's /proc/kallsyms.
"""

from __future__ import annotations

import struct

import capstone
import pytest
import trio
from hypothesis import given, settings, strategies as st

from vmwatch.events import Breakpoint
from vmwatch.live import inline_hooks as ih
from vmwatch.live.qemu import attach_qemu
from vmwatch.live.qemu_ram import SharedRam

NOP5 = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")
RET, JMP8, INT3, NOP1 = b"\xc3", b"\xeb\x10", b"\xcc", b"\x90"
MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
BASE = 0xFFFFFFFF81000000


def decode(code: bytes, address: int) -> list[str]:
    return [f"{i.mnemonic} {i.op_str}".strip() for i in MD.disasm(code, address)]


class TestPieces:
    def test_trampoline_reads_itself_and_returns(self) -> None:
        slot = BASE + 0x1234
        code = ih.trampoline(slot)
        assert len(code) == ih.TRAMPOLINE_SIZE
        assert decode(code, slot) == ["push qword ptr [rip - 6]", "lea rsp, [rsp + 8]", "ret"]
        assert ih.RIP_AFTER_PUSH == len(next(MD.disasm(code, slot)).bytes)

    def test_trampoline_runs_a_moved_mov(self) -> None:
        """native_write_cr0's ``mov cr0, rdi`` and its jump label's 2-byte NOP: the mov moves into
        a 15-byte trampoline, between the stack fix and the ret; the NOP is skipped."""
        slot = BASE + 0x1231
        native_write_cr0 = bytes.fromhex("0f22c7 6690 f7c700000100 742d")
        moved = ih.displaced(BASE, native_write_cr0)
        assert moved == bytes.fromhex("0f22c7") and ih.moved_write(moved) == ("cr0", "rdi")
        code = ih.trampoline(slot, moved)
        assert decode(code, slot) == ["push qword ptr [rip - 6]", "lea rsp, [rsp + 8]", "mov cr0, rdi", "ret"]
        assert len(code) == 15 and ih.free_slots(RET + INT3 * 15, BASE, [], size=15) == [BASE + 1]
        assert ih.moved_write(bytes.fromhex("410f22e0")) == ("cr4", "r8")  # REX.B

    @pytest.mark.parametrize("code", [
        bytes.fromhex("0f22c7 f7c700000100"),   # mov cr0, rdi; test: no NOP fills the 5 bytes
        bytes.fromhex("0f22c7 0f1f440000"),     # a 5-byte NOP after it: 8 bytes, not 5
        bytes.fromhex("31c0 0f22c7 6690"),      # xor first: the mov is not at the address
        bytes.fromhex("0f20c0 6690 c3"),        # mov rax, cr0 reads, does not write
        NOP5 + RET, b"",
    ])
    def test_nothing_else_is_displaced(self, code: bytes) -> None:
        assert ih.displaced(BASE, code) is None

    def test_call_reaches_the_slot(self) -> None:
        site, slot = BASE + 0x100, BASE + 0x40
        call = ih.call_to(site, slot)
        assert len(call) == ih.SITE_SIZE and decode(call, site) == [f"call {slot:#x}"]
        with pytest.raises(ValueError, match="out of call range"):
            ih.call_to(site, site + (1 << 32))

    @pytest.mark.parametrize(("code", "site"), [
        (NOP5 + RET, 0),                                     # ftrace NOP
        (bytes.fromhex("66 0f 1f 44 00 00") + RET, None),    # a 6-byte NOP is not the site
        (ENDBR64 + NOP5 + RET, 4),                           # IBT kernel: after endbr64
        (ENDBR64 + b"\x55" + RET, None),                     # endbr64; push rbp
        (b"\x55\x48\x89\xe5", None),                         # push rbp; mov rbp, rsp
        (b"", None),
    ])
    def test_patch_site(self, code: bytes, site: int | None) -> None:
        assert ih.patch_site(BASE, code) == (None if site is None else BASE + site)

    def test_slots_only_after_the_sls_int3(self) -> None:
        """16-byte blocks, as functions are aligned; only the third and fourth hold a slot."""
        blocks = [
            b"\x48\x89\xc3" + INT3 + NOP1 * 12,  # mov rbx, rax: a c3 byte that is no ret
            RET + NOP1 * 15,                        # a ret, but no int3: a loop's alignment?
            RET + INT3 + NOP1 * 14,                 # the real thing
            JMP8 + INT3 + NOP1 * 13,                # after a jmp too
            NOP1 * 8 + RET + INT3 + NOP1 * 6,       # too short before the next block ...
            NOP5 + b"\x55" + RET + INT3 * 9,       # ... which is a function opening with a NOP
        ]
        code = b"".join(blocks)
        assert all(len(b) == 16 for b in blocks)
        assert ih.free_slots(code, BASE, []) == [BASE + 0x21]
        assert ih.free_slots(code, BASE, [], count=5) == [BASE + 0x21, BASE + 0x32]
        assert ih.free_slots(code, BASE, [(BASE + 0x25, 2)], count=5) == [BASE + 0x32]

    def test_left_behind_call_is_recognised(self) -> None:
        """A site calling a trampoline (a watch that died) names it; a NOP or a push does not."""
        slot = BASE + 0x800
        assert ih.left_behind(BASE, ih.call_to(BASE, slot) + RET) == (BASE, slot)
        assert ih.left_behind(BASE, ENDBR64 + ih.call_to(BASE + 4, slot)) == (BASE + 4, slot)
        assert ih.left_behind(BASE, NOP5 + RET) is None
        assert ih.left_behind(BASE, b"\x55" + RET) is None
        assert ih.FTRACE_NOP == NOP5

    @pytest.mark.parametrize("moved", [bytes.fromhex("0f22c7"), bytes.fromhex("0f22e7"), bytes.fromhex("410f22e0")])
    def test_left_behind_mov_is_read_back_from_its_trampoline(self, moved: bytes) -> None:
        """A ``mov crN`` hook left behind: its trampoline names the mov, the site gets Linux's
        NOP of the rest back (native_write_cr0's own bytes on the lab kernel: 0f22c7 6690)."""
        slot = BASE + 0x1231
        assert ih.left_moved(slot, ih.trampoline(slot, moved) + INT3) == moved
        site = ih.original_site(moved)
        assert len(site) == ih.SITE_SIZE and ih.displaced(BASE, site + RET) == moved
        assert ih.original_site(bytes.fromhex("0f22c7")) == bytes.fromhex("0f22c76690")
        assert ih.original_site(b"") == NOP5

    @pytest.mark.parametrize("code", [
        ih.trampoline(BASE + 0x1231) + INT3 * 4,                                   # a plain one
        ih.trampoline(BASE + 0x1231, bytes.fromhex("0f20c0")) + INT3,             # mov rax, cr0 reads
        ih.trampoline(BASE + 0x1231, bytes.fromhex("0f22c7"))[:-1] + INT3 * 2,    # no ret
        b"",
    ])
    def test_no_mov_is_read_from_anything_else(self, code: bytes) -> None:
        assert ih.left_moved(BASE + 0x1231, code) is None

    def test_probe_fits_a_smaller_slot(self) -> None:
        """The 8-byte MSR probe takes a run too short for a trampoline, never a longer one's end."""
        code = NOP1 * 7 + RET + INT3 + NOP1 * 7 + NOP5 + RET + INT3 * 10
        assert ih.free_slots(code, BASE, []) == []
        assert ih.free_slots(code, BASE, [], size=ih.PROBE_SIZE) == [BASE + 8]
        probe = ih.msr_probe(BASE + 8)
        assert len(probe) == ih.PROBE_SIZE == ih.RIP_AFTER_PROBE
        assert decode(probe, BASE + 8) == ["rdmsr", "push qword ptr [rip - 8]"]

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=600), st.integers(0, 3))
    def test_fuzz_slots_are_dead_padding(self, code: bytes, taken: int) -> None:
        """Any bytes: slots lie inside the code, start with int3, follow ret/jmp, never overlap."""
        busy = [(BASE + 40 * i, 12) for i in range(taken)]
        slots = ih.free_slots(code, BASE, busy, count=4)
        spans = busy + [(s, ih.TRAMPOLINE_SIZE) for s in slots]
        for slot in slots:
            off = slot - BASE
            assert 0 < off and off + ih.TRAMPOLINE_SIZE <= len(code) and code[off] == 0xCC
            assert (slot & 15) + ih.TRAMPOLINE_SIZE <= 16
        for i, (a, n) in enumerate(spans):
            assert all(not (a < b + m and b < a + n) for b, m in spans[i + 1:])
        ih.patch_site(BASE, code)


def test_masks_show_original_bytes(tmp_path) -> None:
    """SharedRam with masks shows the original bytes, across a page boundary, and only there."""
    from vmwatch.images.base import Run

    ram = tmp_path / "ram"
    data = bytearray(range(256)) * 64  # 16 KiB
    ram.write_bytes(bytes(data))
    mem = SharedRam(str(ram), (Run(start=0, size=len(data), file_offset=0),))
    try:
        plain = mem.read(0xFF0, 0x40)
        mem.set_masks({0xFFE: b"ABCD", 0x2000: b"Z"})
        assert mem.read(0xFFE, 4) == b"ABCD"
        got = mem.read(0xFF0, 0x40)
        assert got[:14] == plain[:14] and got[14:18] == b"ABCD" and got[18:] == plain[18:]
        buf = bytearray(0x3000)
        mem.read_into(0, buf)
        assert buf[0xFFE:0x1002] == b"ABCD" and buf[0x2000] == ord("Z") and buf[0x2001] == data[0x2001]
        assert mem.read(0x3000, 8) == bytes(data[0x3000:0x3008])
        mem.set_masks({})
        assert mem.read(0xFF0, 0x40) == plain
    finally:
        mem.close()


# ---------------------------------------------------------------------- on the lab guest

def kallsyms(guest, name: str) -> int:
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    out = guest.shell(f"grep ' {name}$' /proc/kallsyms", check=True).split()
    assert len(out) == 3 and out[2] == name, out
    return int(out[0], 16)


async def hmp(vm, command: str) -> str:
    return str(await vm.qmp.execute("human-monitor-command", command_line=command))


async def executed_bytes(vm, address: int, n: int) -> bytes:
    """What QEMU itself sees at ``address`` (HMP ``x``): the patched bytes, not vmwatch's view."""
    text = await hmp(vm, f"x /{n}xb {address:#x}")
    return bytes(int(tok, 16) for line in text.splitlines() for tok in line.split(":", 1)[1].split())


async def tb_flushes(vm) -> int:
    text = await hmp(vm, "info jit")
    return int(next(line.split()[-1] for line in text.splitlines() if "TB flush count" in line))


@pytest.mark.guest
async def test_inline_hook_fires_like_a_breakpoint(lab_guest) -> None:
    """An inline hook on the write syscall fires per write with the registers of the function
    entry, costs QEMU no translation flush, and shows vmwatch the original bytes."""
    target = kallsyms(lab_guest, "__x64_sys_write")
    writes = 25
    hits = 0
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        assert await vm.add_breakpoint(target, inline=True) is True
        assert (await executed_bytes(vm, target, 5))[0] == ih.CALL_REL32  # the guest runs the call
        assert await vm.read_memory(target, 5) == NOP5                    # vmwatch sees the NOP
        gpa = int((await hmp(vm, f"gva2gpa {target:#x}")).split("gpa:")[1].split()[0], 16)
        assert vm.memory.read(gpa, 5) == NOP5
        flushes = await tb_flushes(vm)
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()

            async def trigger() -> None:
                out = await trio.to_thread.run_sync(lambda: lab_guest.shell(f"scenario writes {writes}", timeout=60))
                assert f"scenario writes {writes}" in out
                watching.cancel()

            nursery.start_soon(trigger)
            with trio.fail_after(120), watching:
                async for event in vm.events():
                    assert isinstance(event, Breakpoint) and event.address == target and event.vcpu == 0
                    regs = await vm.registers(event.vcpu)
                    assert regs.rip == target
                    # RSP as at the entry: it holds the return address, right after a call
                    ret = int.from_bytes(await vm.read_memory(regs.rsp, 8), "little")
                    call = decode(await vm.read_memory(ret - 5, 5), ret - 5)
                    assert call and call[0].startswith("call"), (hex(ret), call)
                    hits += 1
        assert hits >= writes
        assert await tb_flushes(vm) == flushes
        await vm.remove_breakpoint(target)
        assert await executed_bytes(vm, target, 5) == NOP5
        await vm.resume()
    assert lab_guest.shell("echo alive", check=True).strip().endswith("alive")


@pytest.mark.guest
async def test_inline_hook_step_and_detach_inside(lab_guest) -> None:
    """From a hook stop an MSR probe runs, a step moves past the NOP, a register write takes, and
    detaching while a vCPU sits in the trampoline leaves the guest running with its NOP back."""
    target = kallsyms(lab_guest, "__x64_sys_write")
    entry = kallsyms(lab_guest, "entry_SYSCALL_64")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            async with attach_qemu(str(lab_guest.qmp_path)) as vm:
                await vm.add_breakpoint(target, inline=True)
                nursery.start_soon(trio.to_thread.run_sync, lambda: lab_guest.shell("scenario writes 3", timeout=60))
                async for event in vm.events():
                    break
                at_hook = await vm.registers(event.vcpu)
                assert at_hook.rip == target
                # a vCPU stopped in a trampoline runs an MSR probe and is put back inside it
                assert (await vm.read_msrs([0xC0000082], event.vcpu))[0xC0000082] == entry
                assert await vm.registers(event.vcpu) == at_hook
                step = await vm.step(event.vcpu)
                assert step.rip == target + 5
                regs = await vm.registers(event.vcpu)
                assert regs.rip == target + 5
                await vm.set_registers(event.vcpu, rax=regs.rax)  # a write at a plain stop
                await vm.resume()
                async for event in vm.events():  # stopped in the trampoline again
                    break
                shown = await vm.registers(event.vcpu)
                assert shown.rip == target
                await vm.set_registers(event.vcpu, rbx=shown.rbx)  # out of the trampoline for real
                assert (await vm.registers(event.vcpu)).rsp == shown.rsp
                await vm.resume()  # the NOP is skipped by hand
                async for event in vm.events():
                    break
                assert (await vm.registers(event.vcpu)).rip == target
                # leaving now: the vCPU finishes the trampoline after the detach
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        assert await executed_bytes(vm, target, 5) == NOP5
    out = await trio.to_thread.run_sync(lambda: lab_guest.shell("scenario writes 5; echo done", timeout=60))
    assert "done" in out


@pytest.mark.guest
async def test_inline_hook_on_two_vcpus(lab_guest_factory) -> None:
    """On 2 vCPUs a write loop pinned to CPU 1 hits the hook as vCPU 1, with that vCPU's registers."""
    guest = await trio.to_thread.run_sync(lambda: lab_guest_factory(cpus=2))
    target = kallsyms(guest, "ksys_write")
    guest.shell("taskset 2 dd if=/dev/zero of=/dev/null bs=1 </dev/null >/dev/null 2>&1 &", check=True)
    vcpus = []
    async with attach_qemu(str(guest.qmp_path)) as vm:
        assert await vm.add_breakpoint(target, inline=True)
        with trio.fail_after(60):
            async for event in vm.events():
                assert isinstance(event, Breakpoint) and event.address == target
                assert (await vm.registers(event.vcpu)).rip == target
                vcpus.append(event.vcpu)
                if len(vcpus) == 30:
                    break
        await vm.remove_breakpoint(target)
        await vm.resume()
    assert vcpus.count(1) >= 20, vcpus
    guest.shell("kill %1; pkill dd", check=False)
    assert "ok" in guest.shell("echo ok", check=True)


@pytest.mark.guest
async def test_read_msrs_of_a_running_guest(lab_guest) -> None:
    """LSTAR read through the probe is the guest's entry_SYSCALL_64; the vCPU's registers are
    put back exactly; no translation flush; an MSR outside the list is refused."""
    entry = kallsyms(lab_guest, "entry_SYSCALL_64")
    lab_guest.shell("scenario busy start", check=True)  # write syscalls: mostly in kernel mode
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        flushes = await tb_flushes(vm)
        values = None
        for _ in range(100):  # the vCPU must be caught in kernel mode, and not halted
            await vm.pause()
            before = await vm.registers(0)
            values = await vm.read_msrs([0xC0000082, 0xC0000081, 0xC0000080])
            assert await vm.registers(0) == before
            await vm.resume()
            if values is not None:
                break
        assert values is not None
        assert values[0xC0000082] == entry
        assert values[0xC0000081] >> 32 & 0xFFFF == before.cs.selector  # STAR: the kernel's CS
        assert values[0xC0000080] == before.efer
        assert vm.stats["msr_reads"] == 3
        assert await tb_flushes(vm) == flushes
        with pytest.raises(ValueError, match="0x3a"):
            await vm.read_msrs([0x3A])
    lab_guest.shell("scenario busy stop", check=True)
    assert "ok" in lab_guest.shell("echo ok", check=True)


@pytest.mark.guest
async def test_a_mov_hook_placed_again_gets_its_trampoline_back(lab_guest) -> None:
    """native_write_cr0's ``mov cr0, rdi`` hooked, unhooked (as governance does for a cooldown) and
    hooked again: QEMU executes a call to the same trampoline, and the mov and its NOP after."""
    start = kallsyms(lab_guest, "native_write_cr0")
    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        code = await executed_bytes(vm, start, 16)
        mov = start + next(i for i, _, m, o in MD.disasm_lite(code, 0) if m == "mov" and o.startswith("cr0"))
        original = await executed_bytes(vm, mov, 5)
        calls = []
        for _ in range(2):
            assert await vm.add_breakpoint(mov, inline=True) is True
            call = await executed_bytes(vm, mov, 5)
            assert call[0] == ih.CALL_REL32 and await vm.read_memory(mov, 5) == original
            calls.append(call)
            await vm.remove_breakpoint(mov)
            assert await executed_bytes(vm, mov, 5) == original
        assert calls[0] == calls[1]
        assert vm.stats["trampolines_reused"] == 1 and vm.stats["inline_hooks"] == 2
        await vm.resume()
    assert lab_guest.shell("echo alive", check=True).strip().endswith("alive")
