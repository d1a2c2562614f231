"""Exception events (``#PF``, ``#GP``, ``#UD``...) derived from breakpoints on the IDT's handler entries.

Theory of operation (Intel SDM vol. 3A 6.12-6.14): on an exception the CPU pushes, on the stack
it switches to, the interrupted SS, RSP, RFLAGS, CS and RIP -- in 64-bit mode always, in 32-bit
mode SS and ESP only on a change of privilege -- and then, for the vectors in
:data:`~vmwatch.cpu.ERROR_CODE_VECTORS`, an error code. At the first instruction of the handler
the IDT names (Linux: ``asm_exc_page_fault``...), before it pushes anything, RSP points at the
error code, or at RIP when there is none. That holds on the KPTI entry stack, on the IST stacks
(#DB, NMI, #DF, #MC) and on the task stack alike. CS & 3 is the mode the exception came from;
CR2 holds a page fault's address until the next page fault, and the handler has not run yet.

Page faults on x86-64 Linux under TCG are taken further on instead, by guarded inline hooks on
the kernel's C fault path that filter in the guest (vmwatch/engine/page_fault_hooks.py); the
breakpoint below is their fallback. The handler entries are gdbstub breakpoints, never inline
hooks: they are assembly stubs without the ftrace NOP a hook needs, and with KPTI they run on
the entry stack before the kernel's page tables are in CR3, where a trampoline in ordinary
kernel text is not mapped.

Page faults are the guest's hottest event. Where this breakpoint serves them (the guarded hooks
could not be placed: KVM, no ftrace NOP, another kernel) a stop cannot be avoided (gdbstub has
no conditional breakpoints), so the mode filter runs first at the stop: one read of the frame
(at most 48 bytes, through the page cache), and a fault of a mode nobody listens to ends there.
What such a stop costs a TCG guest is the breakpoint's flush of translated code, ~12-20 ms:
page faults come at ~90/s at best and the guest runs ~126x slower (benchmarks/bench_sensors.py),
and the default budget unhooks the trap. A read watchpoint on the vector's IDT gate (the CPU
reads it to deliver; watchpoint stops flush nothing) was tried: QEMU 7.2 TCG aborts at the
first delivery (``qemu_mutex_lock_iothread_impl: assertion failed``), a watchpoint hit inside
interrupt delivery being a path it does not expect. The trap is governed like any other (a hot
one is unhooked for a cooldown, or sampled on a replay), and every demotion is reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import structlog

from vmwatch.cpu import ERROR_CODE_VECTORS, exception_name
from vmwatch.errors import VmwatchError
from vmwatch.events import Breakpoint, Fault

if TYPE_CHECKING:
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

PAGE_FAULT = 14
EXCEPTION_COUNT = 32
"""Vectors 0-31 are the CPU's exceptions; 32-255 are interrupts (``on_interrupt``)."""


@attrs.frozen
class Frame:
    """What the CPU pushed for one exception."""

    rip: int
    cs: int
    rflags: int
    error_code: int | None
    rsp: int | None
    """The interrupted stack pointer (None: 32-bit, no privilege change, the CPU did not push it)."""

    @property
    def user(self) -> bool:
        return self.cs & 3 == 3


def frame_size(vector: int, width: int) -> int:
    """Bytes of the frame to read at RSP for ``vector`` (``width``: 8 for 64-bit, 4 for 32-bit)."""
    return width * (5 + (vector in ERROR_CODE_VECTORS))


def mode_of(vector: int, data: bytes, width: int) -> bool:
    """True when the frame in ``data`` (read at the handler's RSP) came from user mode."""
    cs_at = width * (1 + (vector in ERROR_CODE_VECTORS))
    return int.from_bytes(data[cs_at : cs_at + 2], "little") & 3 == 3


def decode_frame(vector: int, data: bytes, width: int = 8) -> Frame:
    """The exception frame at the handler's RSP.

    Args:
        data: at least :func:`frame_size` bytes from RSP on (32-bit: the last two words are
            only meaningful when the frame came from user mode).
        width: 8 (64-bit mode) or 4 (32-bit protected mode).

    Raises:
        ValueError: ``data`` is shorter than the frame, or ``width`` is neither 4 nor 8.
    """
    if width not in (4, 8):
        raise ValueError(f"frame width must be 4 or 8, not {width!r}")
    if len(data) < frame_size(vector, width):
        raise ValueError(f"exception frame needs {frame_size(vector, width)} bytes, got {len(data)}")
    words = [int.from_bytes(data[i : i + width], "little") for i in range(0, frame_size(vector, width), width)]
    error_code = words.pop(0) if vector in ERROR_CODE_VECTORS else None
    rip, cs, rflags, rsp = words[0], words[1] & 0xFFFF, words[2], words[3]
    if width == 4 and cs & 3 != 3:
        rsp = None  # 32-bit, same privilege: the CPU pushed no ESP/SS (the words are the handler's)
    return Frame(rip=rip, cs=cs, rflags=rflags, error_code=error_code & 0xFFFFFFFF if error_code is not None else None,
                 rsp=rsp)


class ExceptionSensor:
    """Breakpoint at an exception handler's entry -> :class:`Fault`, for the modes listened to."""

    def __init__(self, vectors: dict[int, int], modes: dict[int, frozenset[bool]], width: int = 8) -> None:
        self.vectors = vectors
        """Handler address -> vector."""
        self.modes = modes
        """Vector -> the modes (user True, kernel False) some rule listens to."""
        self.width = width

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        vector = self.vectors.get(event.address)
        regs = guest.registers
        if vector is None or regs is None or regs.rsp is None:
            return
        memory = guest.linux.memory
        width = self.width
        size = frame_size(vector, width)
        data = memory.read(regs.rsp, size)
        user = mode_of(vector, data, width)
        if user not in self.modes[vector]:
            return  # a mode nobody listens to: decided before decoding the rest
        frame = decode_frame(vector, data, width)
        guest.emit(Fault(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, vector=vector,
                         name=exception_name(vector), rip=frame.rip, user=user, error_code=frame.error_code,
                         cr2=regs.cr2 if vector == PAGE_FAULT else None))


def wanted_modes(wanted: dict[str, list]) -> dict[int, frozenset[bool]]:
    """``{"exception:14:kernel": [...], ...}`` -> ``{14: frozenset({False})}``."""
    modes: dict[int, set[bool]] = {}
    for key in wanted:
        if key.startswith("exception:"):
            _, vector, mode = key.split(":")
            modes.setdefault(int(vector), set()).add(mode == "user")
    return {v: frozenset(m) for v, m in modes.items()}


async def plan(engine: SensorHost, wanted: dict[str, list]) -> None:
    """Arm a breakpoint at the IDT handler of every exception vector a rule listens to."""
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler, Trap

    from vmwatch.engine import page_fault_hooks

    modes = wanted_modes(wanted)
    if PAGE_FAULT in modes:
        handlers = [h for key, hs in wanted.items() if key.startswith(f"exception:{PAGE_FAULT}:") for h in hs]
        if await page_fault_hooks.plan(engine, modes[PAGE_FAULT], handlers):
            del modes[PAGE_FAULT]  # served in the guest's C fault path, filtered before any stop
    if not modes:
        return
    what = f"exception sensor (vectors {sorted(modes)})"
    if caps.BREAKPOINTS not in engine.capabilities:
        engine.inactive(what, "the source has no breakpoints")  # a source of Fault events still delivers them
        return
    try:
        cpus = tuple(await engine.source.all_registers()) if caps.REGISTERS in engine.capabilities else ()
        if not cpus:
            raise VmwatchError("the source gives no registers (IDTR, RSP)")
        linux = engine.guest.linux
        entries = {e.vector: e for e in linux.idt(cpus[0])}
        width = linux.memory.pointer_size
    except VmwatchError as exc:
        engine.inactive(what, str(exc))
        return
    by_address: dict[int, int] = {}
    for vector in sorted(modes):
        entry = entries.get(vector)
        if entry is None or not entry.present or not entry.address:
            engine.inactive(f"exception sensor ({exception_name(vector)}, vector {vector})", "no handler in the IDT")
            continue
        if by_address.setdefault(entry.address, vector) != vector:
            engine.inactive(f"exception sensor ({exception_name(vector)}, vector {vector})",
                            f"shares its handler {entry.address:#x} with vector {by_address[entry.address]}")
    run = engine.sensor_run("sensor.exceptions")
    run.func = ExceptionSensor(by_address, modes, width)
    for address, vector in by_address.items():
        await engine.add_trap(Trap("breakpoint", address, 1, f"{exception_name(vector)} entry"), Handler(run, None))
    log.info("exception sensor armed", vectors=sorted(by_address.values()))
