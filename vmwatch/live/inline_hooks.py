"""Inline hooks: execution breakpoints that cost a TCG guest no translation-cache flush.

Theory of operation: QEMU (through 10.1) flushes its whole translation cache at every gdbstub
breakpoint or single-step stop (``tb_flush`` in ``gdb_vm_state_change``), and a busy guest then
spends milliseconds re-translating: about 120 breakpoint events/s at best. Watchpoint stops skip
that flush. So a hook turns "execution reached X" into "a data read of Y happened":

* X is a 5-byte NOP (the ftrace ``nop5`` that opens every kernel function). It becomes
  ``call T``, so the return address on the stack is X + 5, as it would be for ftrace.
* T is a 12-byte trampoline in dead padding of kernel text: ``push qword [T]`` (a data read of
  the trampoline's own first bytes), ``lea rsp, [rsp + 8]``, ``ret``. No register and no flag
  changes; the guest goes on at X + 5 exactly as if the NOP ran.
* A gdbstub read watchpoint on T's first 8 bytes stops the guest right after the ``push``, with
  RIP = T + 6 and two extra stack slots; the stop names T, so T names the hook.

X may also be a ``mov crN, reg`` followed by NOPs, 5 bytes in all (Linux's
``native_write_cr0``/``native_write_cr4``: ``mov cr0, rdi`` and the 2-byte NOP of a jump label,
with no ftrace NOP in the function). The ``mov`` is then moved into the trampoline, between the
``lea`` and the ``ret`` (15 bytes), and the stop comes before it runs: the old value still in
CRn, the new one in its source register. Its NOPs are skipped. The caller vouches that nothing
jumps into those 5 bytes but to X itself (a jump to X runs the call, the mov and a new stop).
Stepping or continuing from X by hand writes CRn from the source register, as the ``mov``
would. Such a hook left behind by a watch that died is taken over from its trampoline, which
names the ``mov``; the NOPs after it are put back as x86 Linux writes its own (:data:`NOPS`:
what a jump label holds). A hook removed for a while (governance) gets the same trampoline
back when re-armed: the same bytes, so safe with a vCPU still inside.

Dead padding is recognised without symbols: after an unconditional ``ret``/``jmp`` comes the
``int3`` that straight-line-speculation hardening puts there (``-mharden-sls``), then alignment
NOPs up to the next function. Nothing ever executes them. Code reached only through a jump
label that the kernel may flip into a NOP is never followed by that ``int3``. Functions start
at 16-byte boundaries, and the next one may well open with a NOP (ftrace's): a slot never
crosses a 16-byte boundary (first seen as a module load that crashed the lab guest).

Trampolines stay in place after their hook is removed (a vCPU may be inside one, or interrupted
in one); they are unreachable once the call site holds its NOP again. A watch that died without
detaching leaves its calls behind (harmless: QEMU drops the watchpoints, the trampoline just
returns); the next hook of that function takes its trampoline over and puts the NOP back after.

The same trick reads model-specific registers, which gdbstub does not expose: a vCPU stopped
in kernel mode is pointed (RCX = the MSR, interrupts masked) at an 8-byte probe in dead padding
of the page it stopped in, ``rdmsr; push qword [probe]``, resumed alone, and stops on the
probe's read watchpoint with the value in EDX:EAX; then every register it touched is put back.
No single step, so no flush either. Writes (asked for) run ``wrmsr`` the same way.
"""

from __future__ import annotations

import struct
from typing import Iterable

import attrs
import capstone

TRAMPOLINE_SIZE = 12
RIP_AFTER_PUSH = 6
"""A stop on the trampoline's read watchpoint leaves RIP this far into it."""
STACK_DEPTH = 16
"""Bytes the call and the push put on the stack by the time of that stop."""
SITE_SIZE = 5
FTRACE_NOP = bytes.fromhex("0f1f440000")
"""The 5-byte NOP x86-64 kernels put at every function entry (a site found calling a trampoline
held it)."""
ALIGNMENT = 16
"""Functions start at multiples of this: padding never runs past one."""
CALL_REL32 = 0xE8
NOPS = {1: b"\x90", 2: b"\x66\x90", 3: b"\x0f\x1f\x00", 4: b"\x0f\x1f\x40\x00"}
"""x86 Linux's NOPs by length (arch/x86/include/asm/nops.h), the kernel's jump labels' too."""

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_sweep = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_sweep.skipdata = True  # bytes capstone cannot decode (".byte") break a pattern, not the sweep


@attrs.frozen
class Hook:
    """One inline hook: breakpoint ``address`` (what the user asked for), patched ``site``
    (``address``, or just after an ``endbr64`` there), trampoline ``slot``, original bytes."""

    address: int
    site: int
    slot: int
    site_original: bytes
    slot_original: bytes
    moved: bytes = b""
    """The instruction the trampoline runs in the site's place (empty: the site held a NOP)."""
    stop_offset: int = RIP_AFTER_PUSH
    """RIP at a stop on the trampoline's read, from ``slot``."""
    depth: int = STACK_DEPTH
    """Bytes the call and the trampoline put on the stack by the time of that stop."""
    flags_at: int | None = None
    """Where the trampoline saved the caller's RFLAGS at that stop, from RSP (a guarded one,
    :mod:`vmwatch.live.hook_guards`); None: it changes no flag."""
    guard: object = None
    """The :class:`~vmwatch.live.hook_guards.Guard` of a guarded hook."""


def trampoline(slot: int, moved: bytes = b"") -> bytes:
    """The trampoline placed at ``slot``: push qword [slot]; lea rsp, [rsp+8]; ``moved``; ret."""
    return b"\xff\x35" + struct.pack("<i", slot - (slot + 6)) + b"\x48\x8d\x64\x24\x08" + moved + b"\xc3"


def displaced(address: int, code: bytes) -> bytes | None:
    """The ``mov crN, reg`` a hook at ``address`` moves into its trampoline, given the code bytes
    found there: None unless a ``mov`` to a control register comes first and NOPs fill the rest
    of the 5 bytes exactly."""
    insns = list(_md.disasm_lite(code[:16], address, 4))
    if not insns or insns[0][2] != "mov" or not insns[0][3].startswith("cr"):
        return None
    end = insns[0][1]
    for _, size, mnemonic, _ in insns[1:]:
        if end >= SITE_SIZE or mnemonic != "nop":
            break
        end += size
    return code[: insns[0][1]] if end == SITE_SIZE else None


def left_moved(slot: int, code: bytes) -> bytes | None:
    """The ``mov crN, reg`` a trampoline found at ``slot`` runs (``code``: 16 bytes read there),
    for a hook a watch left behind; None when those bytes are no such trampoline."""
    for size in (3, 4):  # mov crN, reg: 0F 22 /r, and a REX prefix for r8-r15
        moved = code[11 : 11 + size]
        if code[: 12 + size] == trampoline(slot, moved) and displaced(0, moved + NOPS[SITE_SIZE - size]) == moved:
            return moved
    return None


def original_site(moved: bytes) -> bytes:
    """The 5 bytes a hook that moved ``moved`` into its trampoline had found at its site."""
    return moved + NOPS[SITE_SIZE - len(moved)] if moved else FTRACE_NOP


def moved_write(moved: bytes) -> tuple[str, str]:
    """``(control register, source register)`` of a moved ``mov crN, reg``: ``("cr0", "rdi")``."""
    (_, _, _, operands), = _md.disasm_lite(moved, 0)
    dest, _, src = operands.partition(",")
    return dest.strip(), src.strip()


PROBE_SIZE = 8
RIP_AFTER_PROBE = 8
RDMSR = b"\x0f\x32"
WRMSR = b"\x0f\x30"


def msr_probe(slot: int, instruction: bytes = RDMSR) -> bytes:
    """The probe placed at ``slot``: rdmsr (or wrmsr); push qword [slot]."""
    return instruction + b"\xff\x35" + struct.pack("<i", slot - (slot + PROBE_SIZE))


def call_to(site: int, slot: int) -> bytes:
    """``call slot`` encoded at ``site`` (rel32: both must lie within 2 GiB of each other)."""
    delta = slot - (site + SITE_SIZE)
    if not -(1 << 31) <= delta < 1 << 31:
        raise ValueError(f"trampoline {slot:#x} is out of call range of {site:#x}")
    return bytes([CALL_REL32]) + struct.pack("<i", delta)


def patch_site(address: int, code: bytes) -> int | None:
    """Where a hook for a breakpoint at ``address`` goes, given the code bytes found there:
    ``address`` itself when it holds a 5-byte NOP, the next instruction when an ``endbr64``
    comes first (an IBT kernel), None when neither (the caller uses a plain breakpoint)."""
    insns = list(_md.disasm_lite(code[:16], address, 2))
    if not insns:
        return None
    first = insns[0]
    if first[2] == "nop" and first[1] == SITE_SIZE:
        return address
    if first[2] == "endbr64" and len(insns) > 1 and insns[1][2] == "nop" and insns[1][1] == SITE_SIZE:
        return insns[1][0]
    return None


def left_behind(address: int, code: bytes) -> tuple[int, int] | None:
    """``(site, slot)`` when the code at ``address`` (after an ``endbr64``) calls a trampoline
    candidate: a ``call rel32`` where the ftrace NOP belongs. The caller checks the slot holds
    :func:`trampoline` bytes before believing it."""
    insns = list(_md.disasm_lite(code[:16], address, 2))
    if insns and insns[0][2] == "endbr64":
        insns = insns[1:]
    if not insns or insns[0][1] != SITE_SIZE or code[insns[0][0] - address] != CALL_REL32:
        return None
    site = insns[0][0]
    return site, site + SITE_SIZE + struct.unpack_from("<i", code, site - address + 1)[0]


def sweep(code: bytes, base: int) -> Iterable[tuple[int, int, str, str]]:
    """``(address, size, mnemonic, operands)`` of a linear sweep of ``code`` at ``base``."""
    return _sweep.disasm_lite(code, base)


def free_slots(code: bytes, base: int, taken: Iterable[tuple[int, int]], count: int = 1,
               size: int = TRAMPOLINE_SIZE) -> list[int]:
    """Up to ``count`` trampoline slots in dead padding of ``code`` (which is at ``base``, an
    instruction boundary), none overlapping the ``taken`` (start, size) ranges.

    A slot is a run of ``int3``/NOP instructions, starting with an ``int3``, right after an
    unconditional ``ret`` or ``jmp``, at least ``size`` bytes long and inside one 16-byte block.
    """
    busy = sorted(taken)
    found: list[int] = []
    previous = ""
    run_start = None
    run_len = run_limit = 0
    for address, length, mnemonic, _ in _sweep.disasm_lite(code, base):
        if run_start is not None and mnemonic in ("int3", "nop") and address + length <= run_limit:
            run_len += length
        elif mnemonic == "int3" and previous in ("ret", "jmp"):
            run_start, run_len, run_limit = address, length, (address | ALIGNMENT - 1) + 1
        else:
            run_start, run_len = None, 0
        if run_start is not None and run_len >= size:
            end = run_start + size
            if not any(s < end and run_start < s + n for s, n in busy):
                found.append(run_start)
                busy.append((run_start, size))
                if len(found) == count:
                    break
            run_start, run_len = None, 0
        previous = mnemonic
    return found
