"""What the debugger needs to know of AArch64: register names, PAC bits, calls and the frame-record walk.

Backtraces: arm64 kernels keep frame pointers (the kernel's own unwinder, arch/arm64/kernel/stacktrace.c,
walks them): x29 points to a 16-byte frame record ``{previous x29, return address}`` on the stack,
each record above the last. The return address there was signed by ``paciasp`` (pointer
authentication, ``CONFIG_ARM64_PTR_AUTH_KERNEL``): its PAC sits in the bits above the virtual-address
size and is stripped before the address is looked up. A function stopped before its own record is
pushed (at its entry, or a leaf) has its caller in x30 only; that frame comes from x30.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from vmwatch.cpu_aarch64 import SYSTEM_REGISTERS, Aarch64Registers
from vmwatch.memory.aarch64 import strip_pac

KERNEL_BIT = 1 << 55
"""Bit 55 selects TTBR1 (the kernel half) whatever the tag and PAC bits above it hold."""
VA_BITS = 48
THREAD_SIZE = 16 << 10
"""arm64 kernel stacks (THREAD_SIZE with KASAN off): a walk stops at their top."""
MAX_FRAMES_WALKED = 256
CALLS = frozenset(("bl", "blr", "blraa", "blraaz", "blrab", "blrabz"))
ALIASES = {"lr": "x30", "fp": "x29", "cpsr": "pstate"}
"""gdb's other names of AArch64 registers."""
_BRANCH_WITH_TARGET = frozenset(("b", "bl", "cbz", "cbnz", "tbz", "tbnz"))


def is_kernel(address: int) -> bool:
    return bool(address & KERNEL_BIT)


def va_bits(regs: Aarch64Registers) -> int:
    """The kernel half's virtual-address size, from TCR_EL1.T1SZ (48 when the source has no TCR)."""
    return VA_BITS if regs.tcr_el1 is None else 64 - (regs.tcr_el1 >> 16 & 0x3F)


def register_names() -> list[str]:
    return [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate", *SYSTEM_REGISTERS]


def register_value(regs: Aarch64Registers, name: str) -> int | None:
    """A register by its name (x0..x30, sp, pc, pstate, a system register, or lr/fp/cpsr); None if unknown.

    Raises:
        KeyError: no AArch64 register has that name.
    """
    name = ALIASES.get(name, name)
    if name.startswith("x") and name[1:].isdigit() and int(name[1:]) <= 30:
        return None if regs.x is None else regs.x[int(name[1:])]
    if name == "el":
        return regs.el
    if name in ("sp", "pc", "pstate", *SYSTEM_REGISTERS):
        return getattr(regs, name)
    raise KeyError(name)


def register_lines(regs: Aarch64Registers) -> list[str]:
    """``info registers``: x0..x30, sp, pc, pstate with its EL, then the system registers known."""
    lines = []
    for name in register_names():
        value = register_value(regs, name)
        if value is not None:
            extra = f"  [EL{regs.el}]" if name == "pstate" and regs.el is not None else ""
            lines.append(f"{name:<15}{value:#018x}{extra}")
    return lines


def branch_target(insn: Any) -> int | None:
    """The constant target of ``b``/``bl``/``b.cond``/``cbz``/``tbz`` (the last operand), else None."""
    from capstone.arm64 import ARM64_OP_IMM

    if insn.mnemonic not in _BRANCH_WITH_TARGET and not insn.mnemonic.startswith("b."):
        return None
    ops = insn.operands
    if ops and ops[-1].type == ARM64_OP_IMM:
        return ops[-1].imm & 0xFFFFFFFFFFFFFFFF
    return None


async def frame_records(regs: Aarch64Registers, read_u64: Callable[[int], Awaitable[int | None]],
                        in_text: Callable[[int], bool], same_function: Callable[[int, int], bool],
                        limit: int) -> list[tuple[int, int | None]]:
    """``(return address, where on the stack it was read)`` of each caller, PAC bits stripped: x30
    first (where ``None``) unless it is the first record's or points back into the function at pc
    (a call made and returned), then the frame-record chain from x29.

    The walk stops at a null or unreadable record, a return address outside kernel text, a record
    that does not move up the stack, or one outside the task's stack.
    """
    if regs.x is None or regs.sp is None or regs.pc is None or not is_kernel(regs.sp) or not is_kernel(regs.pc):
        return []  # a user-mode vCPU: no kernel stack to walk
    bits = va_bits(regs)
    sp = regs.sp
    top = (sp | (THREAD_SIZE - 1)) + 1  # stacks are THREAD_SIZE long at a 2 x THREAD_SIZE-aligned base
    chain: list[tuple[int, int | None]] = []
    at = regs.fp
    while at and sp <= at <= top - 16 and len(chain) < min(limit, MAX_FRAMES_WALKED):
        following, ret = await read_u64(at), await read_u64(at + 8)
        if following is None or ret is None or not in_text(address := strip_pac(ret, bits)):
            break
        chain.append((address, at + 8))
        if following <= at:
            break
        at = following
    lr = strip_pac(regs.lr, bits)
    if in_text(lr) and (not chain or chain[0][0] != lr) and not same_function(lr, regs.pc):
        chain.insert(0, (lr, None))
    return chain[:limit]
