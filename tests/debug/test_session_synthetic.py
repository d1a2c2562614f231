"""DebugSession on a synthetic guest (FakeGuest page tables + hand-placed code): no VM needed."""

from __future__ import annotations

import attrs
import pytest

from vmwatch.cpu import PagingMode
from vmwatch.debug import DebugSession
from vmwatch.errors import DebugError, PageNotPresent, UnsupportedOperation
from vmwatch.target import Target
from vmwatch.testing.fakeguest import FakeGuest

TEXT = 0xFFFFFFFF81000000
STACK = 0xFFFFC90000004000
# push rbp; mov rbp, rsp; call TEXT+0x20; xor eax, eax; pop rbp; ret
CODE = bytes.fromhex("55 4889e5 e817000000 31c0 5d c3".replace(" ", ""))


@pytest.fixture
def session():
    guest = FakeGuest(PagingMode.LEVEL4, seed=3, memory_size=4 << 20)
    code_frame, stack_frame = 0x100000, 0x101000
    guest.map(TEXT, code_frame, 0x1000)
    guest.map(STACK, stack_frame, 0x1000)
    guest.buffer[code_frame:code_frame + len(CODE)] = CODE
    guest.buffer[stack_frame + 0x800:stack_frame + 0x810] = b"hello, stack!\0\0\0"
    regs = attrs.evolve(guest.registers, rip=TEXT + 1, rsp=STACK + 0x800, rbp=STACK + 0xF00)
    return DebugSession(Target(spec="fake", memory=guest.memory, saved_cpus=(regs,)), linux=False)


class TestReadOnlySession:
    async def test_expressions(self, session):
        """Numbers, registers with aliases, + and - combine; junk is a DebugError."""
        assert await session.evaluate("$rip") == TEXT + 1
        assert await session.evaluate("$pc - 1 + 0x10") == TEXT + 0x10
        assert await session.evaluate("  $rsp+8") == STACK + 0x808
        for bad in ("", "$nosuchreg", "1 +", "no_symbols_here"):
            with pytest.raises(DebugError):
                await session.evaluate(bad)

    async def test_disassembly_follows_the_bytes(self, session):
        """Capstone decodes the placed code; the call's constant target is resolved."""
        insns = await session.disassemble(TEXT, 6)
        assert [i.mnemonic for i in insns] == ["push", "mov", "call", "xor", "pop", "ret"]
        assert insns[2].target == TEXT + 4 + 5 + 0x17
        assert b"".join(i.raw for i in insns) == CODE
        assert (await session.current_instruction()).mnemonic == "mov"

    async def test_reads(self, session):
        """Virtual reads through the vCPU's page tables; unmapped addresses raise PageNotPresent."""
        assert await session.read(STACK + 0x800, 13) == b"hello, stack!"
        with pytest.raises(PageNotPresent):
            await session.read(0xFFFFFFFF90000000, 8)

    async def test_control_is_refused(self, session):
        """An image session cannot step, continue or set traps."""
        for call in (session.step(), session.cont(), session.add_breakpoint("$rip"), session.next()):
            with pytest.raises(UnsupportedOperation, match="read-only"):
                await call

    async def test_backtrace_without_symbols(self, session):
        """Without kernel symbols the backtrace is just RIP (no text range to trust)."""
        frames = await session.backtrace()
        assert [f.address for f in frames] == [TEXT + 1]
