"""Replay a recording: its events, and a physical memory that serves the recorded pages.

Theory of operation: the recording (recording.py) is checked whole when opened. A read while
replaying event N gets the page as recorded in the latest context <= N. With the same rules that
is always the page recorded for event N itself (identical reads, identical alerts). With other
rules it is the last content the recording saw, which may be older than the live guest's was at
that moment; ``strict=True`` refuses anything but the event's own pages. A frame never recorded
raises :class:`PageNotRecorded` naming the address: never a silent zero.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from vmwatch.cpu import Registers
from vmwatch.errors import PageNotRecorded, PhysicalReadError, RecordingError, UnsupportedOperation
from vmwatch.events import Event
from vmwatch.images.base import PhysicalReads, Run
from vmwatch.replay.base_image import check_base
from vmwatch.replay.format import PAGE_SHIFT, PAGE_SIZE, SETUP, UNMAPPED
from vmwatch.replay.recording import Recording


def _runs(recording: Recording) -> tuple[Run, ...]:
    try:
        return tuple(Run(start=int(a), size=int(b), file_offset=None) for a, b in recording.meta.get("runs", ()))
    except (TypeError, ValueError):
        raise RecordingError(f"{recording.path}: META runs are not [start, size] pairs") from None


class ReplayPhysicalMemory(PhysicalReads):
    """PhysicalMemory serving the pages a recording holds for the event being replayed."""

    writable = False

    def __init__(self, recording: Recording, *, strict: bool = False, base: Any = None) -> None:
        if strict and base is not None:
            raise ValueError("strict replay serves only recorded pages: it takes no base image")
        self.recording = recording
        self.strict = strict
        self.base = base
        """Physical memory (an image of the guest from before the recording) for pages never recorded."""
        self.context = SETUP
        """The event being replayed (its ordinal), or SETUP before the first."""
        # The same volatility as the recorded source, so caches are flushed exactly as they were.
        self.volatile = bool(recording.meta.get("volatile", False))
        self.runs = _runs(recording)
        self.missing: PageNotRecorded | None = None
        """The first read outside the recording (kept in case a caller swallowed the exception)."""

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        size = len(buf)
        if size == 0:
            return
        out = memoryview(buf)
        recording, context, strict = self.recording, self.context, self.strict
        first = paddr >> PAGE_SHIFT
        last = (paddr + size - 1) >> PAGE_SHIFT
        for pfn in range(first, last + 1):
            page_start = pfn << PAGE_SHIFT
            lo = max(paddr, page_start)
            hi = min(paddr + size, page_start + PAGE_SIZE)
            ordinal = recording.lookup(pfn, context, strict=strict)
            if ordinal is None and self.base is not None:
                try:
                    self.base.read_into(lo, out[lo - paddr:hi - paddr])
                except PhysicalReadError:
                    if not pad:
                        raise PhysicalReadError(paddr, size) from None
                    out[lo - paddr:hi - paddr] = bytes(hi - lo)
                continue
            if ordinal is None:
                error = PageNotRecorded(lo, context)
                if self.missing is None:
                    self.missing = error
                raise error
            if ordinal == UNMAPPED:
                if not pad:
                    raise PhysicalReadError(paddr, size)
                out[lo - paddr:hi - paddr] = bytes(hi - lo)
                continue
            out[lo - paddr:hi - paddr] = recording.page(ordinal)[lo - page_start:hi - page_start]

    def write(self, paddr: int, data: bytes) -> None:
        raise UnsupportedOperation(f"a recording is read-only (write at {paddr:#x})")


class ReplaySource:
    """An engine Source (vmwatch/engine/sources.py) replaying a recording: no hypervisor.

    It declares the recorded source's capabilities, so the engine behaves as it did live (in
    particular "pause": the engine resumes after each event and flushes its caches, exactly as
    it did while recording). Breakpoints and watchpoints are accepted and ignored: the recording
    already holds every event the live run trapped, and nothing else can happen. Stepping and
    writing are refused. The engine's recorded periodic ticks come back as Tick events in the
    stream (``replays_ticks``): the engine runs the rules that ran at them, not its timer. The
    overhead governor's recorded verdicts come back through :meth:`governed`, so the hits the live
    run sampled out are skipped and its demotions happen at the same events.
    """

    realtime = False
    replays_ticks = True
    replays_traps = True

    def __init__(self, recording: Recording, *, strict: bool = False, base: Any = None) -> None:
        meta = recording.meta
        self.recording = recording
        self.name = str(meta.get("source", recording.path))
        self.memory = (ReplayPhysicalMemory(recording, strict=strict, base=base) if meta.get("memory", True)
                       else None)
        caps = meta.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise RecordingError(f"{recording.path}: META capabilities are not a list of names")
        self.capabilities = frozenset(caps)
        self.vcpu_count = int(meta.get("vcpu_count") or 1)
        self.arch = meta.get("arch", "x86")
        if self.arch not in ("x86", "aarch64"):
            raise RecordingError(f"{recording.path}: META arch {self.arch!r} is neither x86 nor aarch64")
        self.position = 0
        """How many events were handed out."""
        if meta.get("on_resume"):
            # The live source told the engine when the guest ran (it flushed its caches then).
            # A replayed guest "runs" before every event; flushing at least as often as live did
            # only sends more reads to the recording, which serves them from the same event.
            self.on_resume: list[Callable[[], None]] = []
        self.context = SETUP
        self._clock_used = 0
        self.failure: RecordingError | None = None
        """The first thing asked of the recording that it does not hold (kept in case the engine
        swallowed the exception, as it does for rules that raise)."""

    def first_failure(self) -> RecordingError | None:
        """The first register or memory request the recording could not serve, if any."""
        return self.failure or (self.memory.missing if self.memory is not None else None)

    def events(self) -> ReplaySource:
        """The recorded events, from where the last iteration stopped.

        Handing out event N switches memory, registers and clock to what was recorded for it.
        (An iterator object rather than an async generator: nothing to finalize if abandoned.)
        """
        return self

    def __aiter__(self) -> ReplaySource:
        return self

    async def __anext__(self) -> Event:
        index = self.position
        if index >= self.recording.handled or self.first_failure() is not None:
            raise StopAsyncIteration  # a replay that cannot be faithful stops at once
        self._ran()
        self.context = index
        if self.memory is not None:
            self.memory.context = index
        self._clock_used = 0
        self.position = index + 1
        return self.recording.events[index]

    async def aclose(self) -> None:
        """Nothing to release (the recording is closed by :func:`open_replay`)."""

    async def registers(self, vcpu: int = 0) -> Registers:
        """The registers of ``vcpu`` as recorded for the current event.

        Raises:
            RecordingError: the live run did not read them for this event.
        """
        try:
            registers = self.recording.registers(self.context, vcpu)
        except RecordingError as exc:
            self.failure = self.failure or exc
            raise
        if registers is None:
            when = "before the first event" if self.context < 0 else f"for event {self.context}"
            error = RecordingError(f"registers of vCPU {vcpu} were not recorded {when}")
            self.failure = self.failure or error
            raise error
        return registers

    async def all_registers(self) -> tuple[Registers, ...]:
        return tuple([await self.registers(vcpu) for vcpu in range(self.vcpu_count)])

    def clock_ns(self) -> int:
        """The clock readings of the live run, in order; past them, the current event's time."""
        values = self.recording.clocks.get(self.context, ())
        if self._clock_used < len(values):
            self._clock_used += 1
            return values[self._clock_used - 1]
        if self.context >= 0:
            return self.recording.events[self.context].time_ns
        return 0

    def governed(self) -> tuple[str, int, float, int] | None:
        """The live governor's verdict on the current event's hit (engine/governance.py), or None."""
        return self.recording.verdicts.get(self.context)

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        self._ran()

    def _ran(self) -> None:
        for hook in getattr(self, "on_resume", ()):
            hook()

    async def status(self) -> str:
        return "replay"

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False) -> None:
        pass

    async def remove_breakpoint(self, vaddr: int) -> None:
        pass

    async def add_watchpoint(self, vaddr: int, size: int, access: Any) -> None:
        pass

    async def remove_watchpoint(self, vaddr: int, size: int, access: Any) -> None:
        pass

    async def step(self, vcpu: int = 0, **_: Any) -> Any:
        raise UnsupportedOperation("cannot single-step a recording")

    async def set_registers(self, vcpu: int, **values: int) -> None:
        raise UnsupportedOperation("a recording is read-only (set registers)")


@contextlib.contextmanager
def open_replay(path: str | os.PathLike[str], *, strict: bool = False,
                base: str | os.PathLike[str] | None = None) -> Iterator[ReplaySource]:
    """A Source replaying the recording at ``path``.

    Args:
        strict: serve only the pages recorded for the event being replayed.
        base: a memory image of the guest taken before the recording (``watch --record-base``,
            or any dump): pages the recording never saw are read from it. If the recording names
            its base, the file must be that one (same size and BLAKE2b digest).

    Raises:
        RecordingError: see :meth:`Recording.open`; or the base image is not the recorded one.
        ImageFormatError: the base is not a memory image.
    """
    with Recording.open(path) as recording, contextlib.ExitStack() as stack:
        if base is None and not strict:
            named = recording.meta.get("base")
            base = named.get("path") if isinstance(named, dict) and os.path.exists(str(named.get("path"))) else None
        image = None
        if base:
            from vmwatch.images import open_image

            check_base(recording, base)
            image = stack.enter_context(open_image(base))
        yield ReplaySource(recording, strict=strict, base=image)

