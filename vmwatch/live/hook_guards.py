"""Guarded inline hooks: a trampoline that tests a filter with guest instructions before it stops.

Theory of operation: a plain inline hook (:mod:`vmwatch.live.inline_hooks`) stops at every call
of its function. On a hot function (``handle_mm_fault``: every page fault) most of those stops
are thrown away by the watch's filters. A guarded trampoline runs the filter in the guest first
and only reaches the watched read when it matches::

    pushfq                               ; the caller's flags, put back on every path
    test  rcx, rcx ;  jz out             ; nonnull: an argument must be a pointer
    test  edx, MASK ; jnz out            ; skip_bits: a flags argument with one of these bits set
    test  byte [rcx + CS], 3 ; jz/jnz out ; mode: user (CPL 3) or kernel, from a saved CS
    cmp   rsi, [rip + LO] ; jb out       ; low <= address < high (constants after the code)
    cmp   rsi, [rip + HI] ; jae out
    push  rax                            ; pid: gs:[current] -> task, its tgid
    mov   rax, gs:[CURRENT] ; cmp dword [rax + TGID], PID ; pop rax ; jne out
    push  qword [rip + slot]             ; the watched read: the stop, RIP = slot + stop_offset
    lea   rsp, [rsp + 8]
    out:  popfq
    ret
    LO, HI                               ; 8 bytes each, read only by the cmp (not watched)

Nothing but RSP (restored) and RFLAGS (pushfq/popfq) changes on either path; ``push``/``pop``
keep RAX. At the stop, the stack holds the call's return address, the saved flags and the
pushed word: 24 bytes; the caller's RFLAGS are the 8 bytes above the pushed word.

Such a trampoline is up to ~90 bytes, more than the 15 a 16-byte block of padding holds. Slots
for it come from long runs of ``int3`` (0xcc) only: linkers fill gaps between sections with it
(x86's vmlinux.lds ``=0xcccc``; Debian's 6.1 has gaps of 1-2 MiB where its SRSO thunks are
aligned), compilers pad functions with NOPs, so no function begins inside such a run. The
slot keeps :data:`MARGIN` bytes off both ends of the run.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable

import attrs

REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
MARGIN = 16
"""Bytes of an int3 run left alone at either end (the tail of an instruction, a patched function start)."""
MIN_RUN = 64
"""Shortest int3 run taken for a slot, margins included."""
STACK_DEPTH = 24
"""Bytes on the stack at the stop: return address, saved flags, pushed word."""
FLAGS_AT = 8
"""Where the caller's RFLAGS are at the stop, from RSP."""


@attrs.frozen(kw_only=True)
class Guard:
    """What a guarded trampoline tests before it stops (every part optional; all must hold).

    Registers are named as in :data:`REGS`, holding the hooked function's arguments at its entry.
    """

    nonnull: str | None = None
    """A pointer argument that must not be NULL."""
    skip_bits: tuple[str, int] | None = None
    """``(register, mask)``: no stop when any of these bits is set in the register's low 32 bits."""
    mode: tuple[str, int, bool] | None = None
    """``(register, offset, user)``: the byte at ``[register + offset]`` is a saved CS; stop only
    when its CPL is 3 (``user`` True) or 0 (False)."""
    address: tuple[str, int, int] | None = None
    """``(register, low, high)``: stop only when low <= register < high (unsigned)."""
    pid: tuple[int, int, int] | None = None
    """``(current, tgid_offset, pid)``: the task pointer at ``gs:[current]`` has ``pid`` at ``tgid_offset``."""

    def __attrs_post_init__(self) -> None:
        for reg in (self.nonnull, *(p[0] for p in (self.skip_bits, self.mode, self.address) if p)):
            if reg is not None and reg not in REGS or reg == "rsp":
                raise ValueError(f"a guard tests a general register other than rsp, not {reg!r}")
        if self.mode is not None and not -(1 << 31) <= self.mode[1] < 1 << 31:
            raise ValueError(f"guard mode offset must fit 32 bits, not {self.mode[1]!r}")
        if self.address is not None and not 0 <= self.address[1] < self.address[2] <= 1 << 64:
            raise ValueError(f"guard address range must be non-empty, not {self.address[1:]!r}")
        if self.pid is not None and not (0 <= self.pid[0] < 1 << 31 and 0 <= self.pid[1] < 1 << 31
                                         and 0 <= self.pid[2] < 1 << 32):
            raise ValueError(f"guard pid test out of range: {self.pid!r}")


def _rm(reg: str, body: bytes) -> bytes:
    """``body`` (its ModRM r/m naming ``reg``) with the REX.B prefix r8-r15 need, 32-bit operands."""
    return (b"\x41" if REGS.index(reg) >= 8 else b"") + body


def _modrm_disp32(reg: str, offset: int) -> bytes:
    """ModRM (/0, +SIB for rsp/r12) + disp32 for ``[reg + offset]``."""
    low = REGS.index(reg) & 7
    return bytes([0x80 | low]) + (b"\x24" if low == 4 else b"") + struct.pack("<i", offset)


@attrs.frozen
class Trampoline:
    """A guarded trampoline's bytes for one slot."""

    code: bytes
    stop_offset: int
    """RIP at the stop on the watched read, from the slot."""


def _build(guard: Guard, slot: int, watched: int) -> Trampoline:
    """Every jump is a short ``jcc out``, its rel8 filled in once ``out`` is known; the cmp's
    rip-relative operands once the constants' place is."""
    body = bytearray(b"\x9c")  # pushfq
    jumps: list[tuple[int, int]] = []  # (offset of the rel8 byte, jcc opcode)
    constants: list[tuple[int, int]] = []  # (offset of the disp32 field, constant index)
    values: list[int] = []

    def jump(opcode: int) -> None:
        body.extend((opcode, 0))
        jumps.append((len(body) - 1, opcode))

    if guard.nonnull is not None:
        n = REGS.index(guard.nonnull)
        body += bytes([0x48 | (5 if n >= 8 else 0), 0x85, 0xC0 | (n & 7) * 9])  # test reg, reg
        jump(0x74)  # jz out
    if guard.skip_bits is not None:
        reg, mask = guard.skip_bits
        body += _rm(reg, bytes([0xF7, 0xC0 | REGS.index(reg) & 7]) + struct.pack("<I", mask & 0xFFFFFFFF))  # test
        jump(0x75)  # jnz out
    if guard.mode is not None:
        reg, offset, user = guard.mode
        body += _rm(reg, b"\xf6" + _modrm_disp32(reg, offset) + b"\x03")  # test byte [reg + offset], 3
        jump(0x74 if user else 0x75)  # user: CPL 0 (ZF) leaves; kernel: CPL 3 leaves
    if guard.address is not None:
        reg, low_value, high_value = guard.address
        n = REGS.index(reg)
        for value, opcode in ((low_value, 0x72), (high_value, 0x73)):  # jb out, jae out
            if value in (0, 1 << 64):
                continue  # no bound on that side
            body += bytes([0x48 | (4 if n >= 8 else 0), 0x3B, 0x05 | (n & 7) << 3]) + b"\0\0\0\0"  # cmp reg, [rip+d]
            constants.append((len(body) - 4, len(values)))
            values.append(value)
            jump(opcode)
    if guard.pid is not None:
        current, tgid_offset, pid = guard.pid
        body += b"\x50" + b"\x65\x48\x8b\x04\x25" + struct.pack("<i", current)  # push rax; mov rax, gs:[current]
        body += b"\x81\xb8" + struct.pack("<iI", tgid_offset, pid) + b"\x58"  # cmp dword [rax+off], pid; pop rax
        jump(0x75)  # jne out
    body += b"\xff\x35\0\0\0\0"  # push qword [rip + watched]
    stop_offset = len(body)
    body[-4:] = struct.pack("<i", watched - (slot + stop_offset))
    body += b"\x48\x8d\x64\x24\x08"  # lea rsp, [rsp + 8]
    out = len(body)
    body += b"\x9d\xc3"  # popfq; ret
    for at, opcode in jumps:
        distance = out - (at + 1)
        if distance > 127:
            raise ValueError("guarded trampoline too long for short jumps")
        body[at] = distance
    while len(body) % 8:
        body += b"\xcc"
    for at, index in constants:
        body[at : at + 4] = struct.pack("<i", len(body) + 8 * index - (at + 4))
    body += b"".join(struct.pack("<Q", v) for v in values)
    return Trampoline(bytes(body), stop_offset)


def guarded_trampoline(guard: Guard, slot: int, watched: int | None = None) -> Trampoline:
    """The trampoline for ``guard`` placed at ``slot``; its stop is a read of ``watched`` (default:
    ``slot`` itself, the first 8 bytes, which no instruction of it reads)."""
    return _build(guard, slot, slot if watched is None else watched)


LARGEST = 128
"""No guarded trampoline is longer (the longest, every test, is ~90 bytes)."""
_TAIL = b"\x48\x8d\x64\x24\x08\x9d\xc3"  # lea rsp, [rsp + 8]; popfq; ret


def left_guarded(code: bytes, slot: int) -> bool:
    """True when ``code``, read at ``slot``, is a guarded trampoline of some guard (left behind
    by a watch that died): pushfq first, then a ``push qword [rip + d]`` of ``slot`` itself
    right before the closing ``lea``, ``popfq``, ``ret``."""
    at = code.find(_TAIL)
    if not code.startswith(b"\x9c") or at < 7 or code[at - 6 : at - 4] != b"\xff\x35":
        return False
    return struct.unpack_from("<i", code, at - 4)[0] == -at


def int3_slots(code: bytes, base: int, size: int, taken: Iterable[tuple[int, int]], count: int = 1) -> list[int]:
    """Up to ``count`` slots of ``size`` bytes (16-byte aligned) in long ``int3`` runs of ``code``
    (at ``base``), :data:`MARGIN` bytes in from both ends, none overlapping ``taken``."""
    busy = sorted(taken)  # slots found here never overlap each other: only these are checked
    found: list[int] = []
    for match in re.finditer(rb"\xcc{%d,}" % max(MIN_RUN, size + 2 * MARGIN), code):
        start = (base + match.start() + MARGIN + 15) & ~15
        end = base + match.end() - MARGIN
        near = [(s, n) for s, n in busy if s < end and start < s + n]
        while start + size <= end and len(found) < count:
            if any(s < start + size and start < s + n for s, n in near):
                start += 16
                continue
            found.append(start)
            start += (size + 15) & ~15
        if len(found) == count:
            break
    return found
