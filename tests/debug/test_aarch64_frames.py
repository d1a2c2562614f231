"""The AArch64 frame-record walk on hostile stacks, and PAC stripping, with no guest: memory is a dict of words."""

from __future__ import annotations

import pytest

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.debug import aarch64 as a64

TEXT = (0xFFFF800008010000, 0xFFFF800009000000)
STACK = 0xFFFF800008A00000
"""A 16 KiB stack at a 32 KiB-aligned base, as VMAP stacks are."""
SIGNED = 0x3D7F000000000000
"""PAC bits over a kernel return address (bits 63:56 and 54:48; bit 55 is the half's)."""


def walk(regs: Aarch64Registers, memory: dict[int, int], limit: int = 32):
    async def read_u64(address: int) -> int | None:
        return memory.get(address)

    def in_text(address: int) -> bool:
        return TEXT[0] <= address < TEXT[1]

    def same_function(a: int, b: int) -> bool:
        return a >> 12 == b >> 12  # "functions" of one page each

    return a64.frame_records(regs, read_u64, in_text, same_function, limit)


def regs(fp: int, lr: int, sp: int = STACK + 0x100, pc: int = TEXT[0] + 0x10) -> Aarch64Registers:
    x = [0] * 31
    x[29], x[30] = fp, lr
    return Aarch64Registers(x=tuple(x), sp=sp, pc=pc, pstate=0x3C5)


def kernel_ret(n: int) -> int:
    return TEXT[0] + 0x1000 * (n + 1) + 4


@pytest.mark.parametrize(("address", "stripped"), [
    (kernel_ret(0) & ~(0xFF7F << 48) | SIGNED, kernel_ret(0)),  # a signed kernel return address
    (kernel_ret(0), kernel_ret(0)),  # already plain
    (0x0012_0000_0040_1000, 0x0000_0000_0040_1000),  # a signed user address: bit 55 clear
])
def test_strip_pac(address, stripped) -> None:
    assert a64.strip_pac(address, 48) == stripped


async def test_chain_with_signed_returns_and_an_unpushed_caller() -> None:
    """x30 first (the function has not pushed its record yet), then each record's return, stripped."""
    records = {STACK + 0x200: (STACK + 0x300, kernel_ret(1) & ~(0xFF7F << 48) | SIGNED),
               STACK + 0x300: (0, kernel_ret(2))}
    memory = {a: w for at, (fp, ret) in records.items() for a, w in ((at, fp), (at + 8, ret))}
    frames = await walk(regs(STACK + 0x200, kernel_ret(0)), memory)
    assert frames == [(kernel_ret(0), None), (kernel_ret(1), STACK + 0x208), (kernel_ret(2), STACK + 0x308)]


@pytest.mark.parametrize("memory", [
    {STACK + 0x200: STACK + 0x200, STACK + 0x208: kernel_ret(1)},  # a record pointing at itself
    {STACK + 0x200: STACK + 0x100, STACK + 0x208: kernel_ret(1)},  # one pointing down the stack
    {STACK + 0x200: STACK + 0x9000, STACK + 0x208: kernel_ret(1)},  # one leaving the task's stack
    {STACK + 0x200: STACK + 0x300, STACK + 0x208: kernel_ret(1)},  # the next record unreadable
    {STACK + 0x200: STACK + 0x300, STACK + 0x208: kernel_ret(1), STACK + 0x300: 0,
     STACK + 0x308: 0x4141414141414141},  # a return address outside kernel text
])
async def test_hostile_chains_stop_after_the_last_good_record(memory) -> None:
    frames = await walk(regs(STACK + 0x200, kernel_ret(1)), memory)
    assert frames == [(kernel_ret(1), STACK + 0x208)]


async def test_long_chain_is_bounded() -> None:
    """A thousand records climbing the whole stack: at most ``limit`` frames, and never more than MAX_FRAMES_WALKED."""
    memory = {}
    for i in range(0x3F0):
        at = STACK + 0x100 + 16 * i
        memory[at], memory[at + 8] = at + 16, kernel_ret(i % 100)
    assert len(await walk(regs(STACK + 0x100, 0), memory, limit=20)) == 20
    assert len(await walk(regs(STACK + 0x100, 0), memory, limit=10_000)) == a64.MAX_FRAMES_WALKED


async def test_user_mode_vcpu_has_no_kernel_frames() -> None:
    assert await walk(regs(0x7FFF0000, kernel_ret(0), sp=0x7FFF0000, pc=0x400000), {}) == []
