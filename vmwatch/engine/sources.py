"""Event sources: what the pump consumes.

A source is an async stream of events plus optional capabilities, each declared by name in
``capabilities`` so a caller asks what a source can do and a memory image never pretends to
support breakpoints (DESIGN.md "Capabilities")::

    name: str                       # the VM, as stored in sinks
    memory: PhysicalMemory | None
    capabilities: frozenset[str]    # any of the names below
    realtime: bool                  # events arrive at their own pace (the engine may drop them)
    replays_traps: bool             # optional: the stream carries recorded trap events (a replay):
                                    # trap listeners are indexed without arming anything
    trap_overhead: float            # optional: seconds a stop + resume costs the guest (governance)
    overhead_of(event) -> float     # optional: the same, per event (live: cheap hooks, costly breakpoints)
    on_tick(tick) -> ContextManager # optional: the engine's timer runs periodic rules inside it (a
                                    # recorder makes the tick a context of its own)
    replays_ticks: bool             # optional: the stream carries the engine ticks of a recording
                                    # (Tick with ``periodic``): no timer, those rules run at them
    arch: str                       # optional: ``x86`` (the default) or ``aarch64``; rules and
                                    # sensors of the other architecture are set aside
    events() -> AsyncIterator[Event]
    event_batches() -> AsyncIterator[list[Event]]    # optional, faster for synthetic/replay streams

    "registers":   async registers(vcpu) -> Registers; async all_registers() -> tuple[Registers, ...]
    "breakpoints": async add_breakpoint(vaddr, *, entry=False); async remove_breakpoint(vaddr)
                   (``entry``: vaddr is a kernel function's first instruction, the source may
                   hook it inline, see vmwatch/live/inline_hooks.py)
                   optional: async add_guarded_hook(vaddr, guard) -> bool (live/hook_guards.py)
    "watchpoints": async add_watchpoint(vaddr, size, access); async remove_watchpoint(vaddr, size, access)
    "pause":       async pause(); async resume()  -- every event the stream yields holds the guest
                   paused until the pump asks for the next one; pause() holds it (ticks, tampers)
                   until resume(). Optional ``on_resume``: a list of callbacks the source calls
                   whenever the guest runs again (the engine drops its caches there).
    "write":       the memory is writable (tamper tests, the debugger)

The live QEMU adapter is in :mod:`vmwatch.engine.live`; the replay source (issue 7) implements
the same protocol.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable, Iterable, Protocol

import attrs
import structlog
import trio

from vmwatch.cpu import Registers, msr_name
from vmwatch.errors import ProtocolError
from vmwatch.events import Access, Breakpoint, Event, MemoryAccess, SourceEnded, Tick
from vmwatch.live.hook_guards import Guard

log = structlog.get_logger()

_WALL_CLOCK_FLOOR = 10**18  # 2001-09-09 in ns since the epoch: anything lower is another clock

BREAKPOINTS = "breakpoints"
WATCHPOINTS = "watchpoints"
REGISTERS = "registers"
PAUSE = "pause"
WRITE = "write"


class Source(Protocol):
    name: str
    memory: object | None
    capabilities: frozenset[str]
    realtime: bool

    def events(self) -> AsyncIterator[Event]: ...


class SyntheticSource:
    """Events from a list or generator: engine tests and benchmarks, and users testing rules.

    With ``honour_traps`` (the default) it behaves like a hypervisor: breakpoint and watchpoint
    events are only delivered for armed traps, so unhooking a trap silences it.

    Args:
        events: the events (a list, or any iterable; consumed once).
        memory: physical memory rules read.
        registers: registers per vCPU (``{0: Registers(...)}``) or a function of the vCPU.
        realtime: pace the stream at ``rate`` events/s whatever the consumer does (an event
            storm); the pump then queues and, when full, drops.
        rate: events per second (realtime only).
        batch: events per ``event_batches()`` item.
    """

    def __init__(
        self,
        events: Iterable[Event],
        *,
        name: str = "synthetic",
        memory: object | None = None,
        registers: dict[int, Registers] | Callable[[int], Registers] | None = None,
        honour_traps: bool = True,
        realtime: bool = False,
        rate: float = 10_000.0,
        batch: int = 256,
        end_reason: str = "stream ended",
    ) -> None:
        self.name = name
        self.memory = memory
        self.realtime = realtime
        self.replays_traps = not honour_traps
        self._events = events
        self._registers = registers
        self._honour = honour_traps
        self._rate = rate
        self._batch = batch
        self._end_reason = end_reason
        caps = {BREAKPOINTS, WATCHPOINTS} if honour_traps else set()
        if registers is not None:
            caps.add(REGISTERS)
        if memory is not None and getattr(memory, "writable", False):
            caps.add(WRITE)
        self.capabilities = frozenset(caps)
        self.breakpoints: set[int] = set()
        self.watchpoints: set[int] = set()
        self.arm_log: list[tuple[str, int]] = []
        """Every add/remove in order (tests check unhook and re-arm)."""
        self.delivered = 0
        self.suppressed = 0

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False) -> None:
        self.breakpoints.add(vaddr)
        self.arm_log.append(("add_breakpoint", vaddr))

    async def remove_breakpoint(self, vaddr: int) -> None:
        self.breakpoints.discard(vaddr)
        self.arm_log.append(("remove_breakpoint", vaddr))

    async def add_watchpoint(self, vaddr: int, size: int, access: Access) -> None:
        self.watchpoints.add(vaddr)
        self.arm_log.append(("add_watchpoint", vaddr))

    async def remove_watchpoint(self, vaddr: int, size: int, access: Access) -> None:
        self.watchpoints.discard(vaddr)
        self.arm_log.append(("remove_watchpoint", vaddr))

    async def registers(self, vcpu: int) -> Registers:
        regs = self._registers
        return regs(vcpu) if callable(regs) else regs[vcpu]  # type: ignore[index]

    async def all_registers(self) -> tuple[Registers, ...]:
        regs = self._registers
        if callable(regs):
            return (regs(0),)
        return tuple(regs[k] for k in sorted(regs))  # type: ignore[union-attr]

    def _armed(self, event: Event) -> bool:
        if not self._honour:
            return True
        cls = type(event)
        if cls is Breakpoint:
            return event.address in self.breakpoints  # type: ignore[attr-defined]
        if cls is MemoryAccess:
            return event.address in self.watchpoints  # type: ignore[attr-defined]
        return True

    async def event_batches(self) -> AsyncIterator[list[Event]]:
        batch: list[Event] = []
        size = self._batch
        pause = size / self._rate if self.realtime else 0.0
        armed = self._armed
        for event in self._events:
            if not armed(event):
                self.suppressed += 1
                continue
            batch.append(event)
            if len(batch) >= size:
                self.delivered += len(batch)
                yield batch
                batch = []
                if pause:
                    await trio.sleep(pause)
        if batch:
            self.delivered += len(batch)
            yield batch
        yield [SourceEnded(reason=self._end_reason)]

    async def events(self) -> AsyncIterator[Event]:
        async for batch in self.event_batches():
            for event in batch:
                yield event


class ImageSource:
    """A memory image: no events of its own; state-inspecting rules run once on a single tick."""

    realtime = False

    def __init__(self, image: object, *, name: str | None = None, cpus: tuple[Registers, ...] = ()) -> None:
        self.name = name or str(getattr(image, "path", "image"))
        self.memory = image
        self._cpus = cpus
        self.arch = "aarch64" if any(getattr(c, "arch", None) == "aarch64" for c in cpus) else "x86"
        self.capabilities = frozenset({REGISTERS} if cpus else ())

    async def registers(self, vcpu: int) -> Registers:
        return self._cpus[vcpu]

    async def all_registers(self) -> tuple[Registers, ...]:
        return self._cpus

    async def events(self) -> AsyncIterator[Event]:
        yield Tick(seq=1)
        yield SourceEnded(seq=2, reason="image inspected")


class LiveSource:
    """A live hypervisor (``vmwatch.live.qemu``) as an engine source.

    Each event ``vm.events()`` yields leaves the guest paused until the pump asks for the next
    one. Ticks and trap changes pause the guest through :meth:`pause` / :meth:`resume`, from
    another task, also while the pump waits for an event; if that stop turned out to be an event
    (a trap hit racing the interrupt), :meth:`resume` leaves the guest stopped for it and the
    pump's request for the next event lets it run.
    """

    realtime = False
    trap_overhead = 0.02
    """Seconds a stop + resume costs the guest beyond the engine's handling: governance charges
    it. Measured on the lab guest (TCG, loaded 2-core host): 30-50 stops/s made a syscall loop
    timed by the guest's own clock ~10x slower, i.e. ~20 ms of guest time per stop (TCG
    re-translates after the breakpoint swaps of a step-over); the round trip itself is <1 ms."""
    cheap_overhead = 0.001
    """The same for a stop that flushes nothing (an inline hook, a watchpoint): the round trip
    and the re-translation of one small block."""

    def __init__(self, vm: object, *, name: str) -> None:
        self.vm = vm
        self.name = name
        self.arch = "aarch64" if getattr(vm, "arch", None) == "aarch64" else "x86"
        """``x86`` or ``aarch64``: rules and sensors of one architecture are set aside on the other."""
        self.memory = vm.memory  # type: ignore[attr-defined]
        self.vcpu_count = getattr(vm, "vcpu_count", None)
        self.on_resume = vm.on_resume  # type: ignore[attr-defined]
        caps = {BREAKPOINTS, WATCHPOINTS, REGISTERS, PAUSE}
        if getattr(self.memory, "writable", False):
            caps.add(WRITE)
        self.capabilities = frozenset(caps)
        self._handed_out = False
        """An event was yielded and the next one not yet asked for: the guest must stay stopped."""
        self._resume_owed = False
        self._msrs: tuple[int, ...] = ()
        self._msrs_period = 1.0
        self._msrs_due = 0.0
        self._msrs_seen: tuple[int, dict[int, int]] | None = None
        """MSRs a trap stop read since the last tick: (vcpu, values)."""

    async def events(self) -> AsyncIterator[Event]:
        """The backend's events with ``time_ns`` on the wall clock (it stamps them with the
        monotonic clock; the timeline, ``--since 15m ago`` and trends need wall-clock time)."""
        offset = time.time_ns() - time.monotonic_ns()
        try:
            async for event in self.vm.events():  # type: ignore[attr-defined]
                if event.time_ns < _WALL_CLOCK_FLOOR:
                    event = attrs.evolve(event, time_ns=event.time_ns + offset)
                self._handed_out = True
                yield event
                self._handed_out = False
                if self._resume_owed:  # a pause() taken meanwhile still holds the backend
                    self._resume_owed = False
                    await self.vm.resume()  # type: ignore[attr-defined]
        finally:
            self._handed_out = self._resume_owed = False

    def clock_ns(self) -> int:
        return time.time_ns()

    async def pause(self) -> None:
        await self.vm.pause()  # type: ignore[attr-defined]

    async def resume(self) -> None:
        if self._handed_out:
            self._resume_owed = True
            return
        await self.vm.resume()  # type: ignore[attr-defined]

    async def registers(self, vcpu: int) -> Registers:
        """Registers of ``vcpu`` at an event. With :meth:`poll_msrs`, a trap stop (kernel mode,
        awake: the probe always runs there) also takes the MSRs when a poll is due; they ride
        with the next tick's registers."""
        regs = await self.vm.registers(vcpu)  # type: ignore[attr-defined]
        if self._msrs and time.monotonic() >= self._msrs_due:
            values = await self._read_msrs(vcpu)
            if values is not None:
                self._msrs_seen = (vcpu, values)
        return regs

    async def all_registers(self) -> tuple[Registers, ...]:
        """Registers of every vCPU; with :meth:`poll_msrs`, the first vCPU that can run the MSR
        probe (kernel mode, not halted) also carries those MSRs in ``msrs`` (else the vCPU whose
        trap stop read them since the last tick)."""
        every = tuple(await self.vm.all_registers())  # type: ignore[attr-defined]
        if not self._msrs:
            return every
        seen, self._msrs_seen = self._msrs_seen, None
        for i in range(len(every)) if seen is None and time.monotonic() >= self._msrs_due else ():
            values = await self._read_msrs(i)
            if values is not None:
                seen = (i, values)
                break
        if seen is None:
            return every
        i, values = seen
        msrs = {**every[i].msrs, **{msr_name(n): v for n, v in values.items()}}
        return every[:i] + (attrs.evolve(every[i], msrs=msrs),) + every[i + 1:]

    async def _read_msrs(self, vcpu: int) -> dict[int, int] | None:
        try:
            values = await self.vm.read_msrs(self._msrs, vcpu)  # type: ignore[attr-defined]
        except ProtocolError as exc:  # a probe that did not come back: not again
            log.warning("msr polling stopped", reason=str(exc))
            self._msrs = ()
            return None
        if values is not None:
            self._msrs_due = time.monotonic() + self._msrs_period
        return values

    def overhead_of(self, event: Event) -> float:
        """What a stop for ``event`` cost the guest: only gdbstub breakpoints flush TCG's code."""
        if isinstance(event, Breakpoint) and not self.vm.is_inline(event.address):  # type: ignore[attr-defined]
            return self.trap_overhead
        return self.cheap_overhead

    def poll_msrs(self, numbers: Iterable[int], period: float) -> None:
        """Read these MSRs with the registers, about every ``period`` seconds (the live backend's
        ``read_msrs``: no flush)."""
        self._msrs = tuple(numbers)
        self._msrs_period = period

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False, guard: Guard | None = None) -> bool:
        """True when the breakpoint is an inline hook; with ``guard``, False when nothing was armed.
        Inline hooks patch x86 code: an aarch64 entry gets a gdbstub breakpoint, a guard nothing."""
        if self.arch != "x86":
            if guard is not None:
                return False
            entry = False
        return await self.vm.add_breakpoint(vaddr, inline=entry, guard=guard)  # type: ignore[attr-defined]

    async def add_guarded_hook(self, vaddr: int, guard: Guard) -> bool:
        """A guarded inline hook at kernel function ``vaddr`` (vmwatch/live/hook_guards.py): the
        guest stops there only when ``guard`` holds. False, nothing armed, when none fits."""
        return await self.add_breakpoint(vaddr, entry=True, guard=guard)

    async def restore_left_hooks(self, start: int, size: int) -> int:
        """``mov crN`` hooks a watch that died left in ``size`` bytes at ``start``, put back (x86)."""
        if self.arch != "x86":
            return 0
        return await self.vm.restore_left_hooks(start, size)  # type: ignore[attr-defined]

    async def remove_breakpoint(self, vaddr: int) -> None:
        await self.vm.remove_breakpoint(vaddr)  # type: ignore[attr-defined]

    async def add_watchpoint(self, vaddr: int, size: int, access: Access) -> None:
        await self.vm.add_watchpoint(vaddr, size, access)  # type: ignore[attr-defined]

    async def remove_watchpoint(self, vaddr: int, size: int, access: Access) -> None:
        await self.vm.remove_watchpoint(vaddr, size, access)  # type: ignore[attr-defined]


def source_for(target: object, *, name: str | None = None) -> object:
    """The engine source for an opened :class:`vmwatch.target.Target`: live or image, named
    ``name`` in sinks (default: the target spec)."""
    live = getattr(target, "live", None)
    name = name or target.spec  # type: ignore[attr-defined]
    if live is not None:
        return LiveSource(live, name=name)
    return ImageSource(target.memory, name=name, cpus=tuple(target.saved_cpus))  # type: ignore[attr-defined]
