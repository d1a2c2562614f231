"""What the live backend does by hand at an aarch64 breakpoint, on instruction words as gcc emits them."""

from __future__ import annotations

import capstone
import pytest

from vmwatch.live import aarch64_steps as a64


def decoded(word: int) -> capstone.CsInsn:
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    md.detail = True
    return next(md.disasm(word.to_bytes(4, "little"), 0xFFFF800008010000))


@pytest.mark.parametrize(("word", "move"), [
    (0xAA1E03E9, (9, 30)),  # mov x9, x30: ftrace's first patched slot at every function entry
    (0xAA0103E0, (0, 1)),  # mov x0, x1
    (0xD2800020, None),  # mov x0, #1: an immediate
    (0x910003FD, None),  # mov x29, sp: an add to/from sp, not an orr
    (0x2A0103E0, None),  # mov w0, w1: 32 bits (zero-extends: not a plain copy of the x register)
    (0xAA1F03E0, None),  # mov x0, xzr
    (0xD503233F, None),  # paciasp: signs x30 with the guest's key
])
def test_register_moves(word, move) -> None:
    """Only the 64-bit register-to-register orr with xzr is stepped over by hand."""
    assert a64.register_move(decoded(word)) == move


@pytest.mark.parametrize(("word", "through"), [
    (0xD503201F, True),  # nop
    (0xD503233F, True),  # paciasp
    (0xA9BF7BFD, True),  # stp x29, x30, [sp, #-0x10]!
    (0x94000010, False),  # bl
    (0x14000010, False),  # b
    (0xD65F03C0, False),  # ret
    (0xD65F0BFF, False),  # retaa
    (0xB4000040, False),  # cbz x0
    (0xD4000001, False),  # svc #0
    (0xD69F03E0, False),  # eret
    (0xD503207F, False),  # wfi
    (0xC85FFC20, False),  # ldaxr x0, [x1]: a stop inside an exclusive pair may clear the monitor
    (0xD51B4200, False),  # msr nzcv, x0
])
def test_falls_through(word, through) -> None:
    """A hop's breakpoint goes on the next word only after instructions that surely reach it."""
    assert a64.falls_through(decoded(word)) is through


def test_nop_is_emulated() -> None:
    assert a64.emulates_as_nop(decoded(0xD503201F)) and not a64.emulates_as_nop(decoded(0xD503233F))
