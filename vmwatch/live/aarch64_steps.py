"""AArch64 facts for continuing past a breakpoint (``qemu_stepping``): what can be emulated, what falls through.

Linux arm64 kernels built with ``-fpatchable-function-entry=2`` (Debian's, ftrace on) open every
function with two patchable slots that ftrace initialises to ``mov x9, x30`` and ``nop``; the
``paciasp`` (pointer authentication) comes after them. A breakpoint on a function's kallsyms address
sits on that ``mov x9, x30``: done by hand (``P`` writes of x9 and pc) it costs no second stop. A
``paciasp`` cannot be done by hand (it signs x30 with a key the guest holds), nor can a
``bti``-guarded landing be skipped safely in general; only NOPs and plain register moves are.
"""

from __future__ import annotations

import re

import capstone

_MOV = re.compile(r"x(\d+), x(\d+)")
_NO_FALL_THROUGH = frozenset(("eret", "svc", "hvc", "smc", "brk", "hlt", "wfi", "wfe", "isb", "msr", "ldaxr",
                              "ldxr", "ldaxp", "ldxp", "stxr", "stlxr"))
"""Instructions after which a hop's breakpoint on the next address may never be reached in time
(exceptions, waits, system-register writes) or whose exclusive monitor a stop between them could clear."""
_BRANCH_GROUPS = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_INT,
                  capstone.CS_GRP_IRET, capstone.CS_GRP_BRANCH_RELATIVE)


def register_move(insn: capstone.CsInsn) -> tuple[int, int] | None:
    """``(destination, source)`` x-register numbers of ``mov xD, xN`` (an ``orr`` with xzr), else None."""
    if insn.mnemonic != "mov":
        return None
    match = _MOV.fullmatch(insn.op_str)
    if match is None or int.from_bytes(insn.bytes, "little") & 0xFFE0FFE0 != 0xAA0003E0:
        return None  # not the register form (an immediate, sp, a w register)
    return int(match.group(1)), int(match.group(2))


def emulates_as_nop(insn: capstone.CsInsn) -> bool:
    return insn.mnemonic == "nop"


def falls_through(insn: capstone.CsInsn) -> bool:
    """True if the next instruction after ``insn`` surely runs next (no branch, no exception, no wait)."""
    return not any(insn.group(g) for g in _BRANCH_GROUPS) and insn.mnemonic not in _NO_FALL_THROUGH
