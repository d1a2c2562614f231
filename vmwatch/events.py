"""Events that sources emit and the engine dispatches (DESIGN.md "Events").

Low in the import graph on purpose: live backends and replayed recordings produce them, the
engine and rules consume them. Every event carries a sequence number and a guest timestamp
(nanoseconds, from the source's clock) so timelines and replays are ordered.
"""

from __future__ import annotations

import enum

import attrs


class Access(enum.Flag):
    """Kind of memory access a watchpoint reports."""

    READ = 1
    WRITE = 2
    EXECUTE = 4
    READ_WRITE = READ | WRITE


@attrs.frozen(kw_only=True)
class Event:
    """Base of every event."""

    seq: int = 0
    """Position in the source's stream, from 0; strictly increasing."""
    time_ns: int = 0
    """Guest or source timestamp in nanoseconds."""
    vcpu: int = 0
    """The vCPU that raised the event."""


@attrs.frozen(kw_only=True)
class Breakpoint(Event):
    """Execution reached ``address`` (a guest virtual address)."""

    address: int


@attrs.frozen(kw_only=True)
class MemoryAccess(Event):
    """A watched range was accessed. ``address`` is the watched range's start as gdbstub reports it."""

    access: Access
    address: int
    size: int = 0
    value: bytes | None = None


@attrs.frozen(kw_only=True)
class RegisterWrite(Event):
    """A control register or MSR was written (derived from breakpoints after the writing instruction)."""

    register: str
    old: int | None
    new: int
    rip: int = 0


@attrs.frozen(kw_only=True)
class Interrupt(Event):
    """The guest entered the handler of interrupt ``vector``."""

    vector: int


@attrs.frozen(kw_only=True)
class Fault(Event):
    """The guest took CPU exception ``vector`` (``#PF``, ``#GP``, ``#UD``...) on ``vcpu``.

    Derived from a stop at the exception's handler (vmwatch/engine/exceptions.py): ``rip`` and
    ``user`` are those of the interrupted code, read from the exception frame the CPU pushed.
    """

    vector: int
    name: str
    """``page_fault``, ``general_protection``... (``vmwatch.cpu.EXCEPTION_NAMES``)."""
    rip: int
    """The faulting (or, for traps such as ``#BP``, the next) instruction."""
    user: bool
    """Taken in user mode (CPL 3 in the frame's CS)."""
    error_code: int | None = None
    """The CPU's error code, for the vectors that push one; else None."""
    cr2: int | None = None
    """For page faults: the address whose access faulted."""

    @property
    def selector(self) -> tuple[int, bool]:
        """What dispatch indexes listeners by: the vector and the mode."""
        return (self.vector, self.user)


@attrs.frozen(kw_only=True)
class MmioAccess(Event):
    """The guest accessed a watched guest-physical device range (``@rule.on_mmio``).

    Derived from a watchpoint on the kernel's mapping of the range (vmwatch/engine/mmio.py).
    ``paddr``, ``size`` and ``value`` are those of the access when the instruction that made it
    could be decoded; otherwise ``paddr`` is the watched page's start, ``size`` 0, ``value`` None.
    """

    access: Access
    paddr: int
    size: int = 0
    value: int | None = None
    """The value written (writes only: a read's value is not known without reading the device)."""
    rip: int = 0
    """The instruction after the access (the CPU reports a data watchpoint once it completed)."""
    watched: tuple[int | str, int] = (0, 0)
    """What the rule asked for, ``(start, size)`` or ``(device name, 0)``: what dispatch indexes
    listeners by."""


@attrs.frozen(kw_only=True)
class SingleStep(Event):
    """One instruction was executed; ``rip`` is the next one."""

    rip: int = 0


@attrs.frozen(kw_only=True)
class Tick(Event):
    """A periodic timer tick of the engine, not from the guest."""

    periodic: tuple[tuple[str, float], ...] | None = None
    """For the engine's own ticks: the ``(rule, period)`` of the periodic listeners that ran
    (a recording keeps them, so a replay runs the same ones). None: a source's tick, for every
    periodic rule."""


@attrs.frozen(kw_only=True)
class ProcessStart(Event):
    pid: int
    ppid: int = 0
    comm: str = ""


@attrs.frozen(kw_only=True)
class ProcessExit(Event):
    pid: int
    comm: str = ""
    exit_code: int | None = None


@attrs.frozen(kw_only=True)
class Exec(Event):
    pid: int
    filename: str
    comm: str = ""


@attrs.frozen(kw_only=True)
class ModuleLoad(Event):
    name: str
    base: int = 0
    size: int = 0


@attrs.frozen(kw_only=True)
class Demotion(Event):
    """The engine unhooked or sampled a trap that cost too much (overhead governance)."""

    trap: str
    hits: int
    action: str


@attrs.frozen(kw_only=True)
class SourceEnded(Event):
    """The source ended (QEMU died, the recording ran out); ``reason`` says why."""

    reason: str
