"""Record a monitoring session: the events, and every guest page and register read per event.

Theory of operation: the recorder wraps an engine Source (vmwatch/engine/sources.py). Its physical memory
sits *under* every cache (GuestMemory's page cache, TLB), so it sees exactly the reads that reach
the source. Reads are grouped by context: the setup phase (everything before the first event),
then one context per event, which opens when the event source hands out that event and closes
when the next one is asked for. The first read of a page in a context reads the whole page from
the source, stores it (content-addressed, so an unchanged page costs 12 bytes in the index) and
serves the caller from that very copy, so what a rule saw is byte for byte what is recorded.
Later reads of that page in the same context go straight to the source: the engine keeps the
vCPUs paused while rules run, so the page cannot have changed.

A frame the source reports unmapped is recorded as unmapped and raises the same
:class:`PhysicalReadError` live and in replay.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import structlog
import trio
import zstandard

import vmwatch
from vmwatch.cpu import Registers
from vmwatch.errors import PhysicalReadError, UnsupportedOperation
from vmwatch.events import Event, Tick
from vmwatch.images.base import PhysicalReads
from vmwatch.replay import _codec
from vmwatch.replay.base_image import file_digest
from vmwatch.replay.format import (
    CLOCK_ENTRY,
    GOVERN,
    MAX_READS_PER_RECORD,
    PAGE_HEAD,
    PAGE_SHIFT,
    PAGE_SIZE,
    READ_ENTRY,
    READS_HEAD,
    REGISTERS_HEAD,
    SETUP,
    UNMAPPED,
    VERDICTS,
    PageEncoding,
    RecordType,
    RecordWriter,
    page_digest,
)

log = structlog.get_logger()


class Recorder:
    """Writes one recording file (docs/recording-format.md).

    Args:
        path: the file to create (truncated if it exists).
        meta: JSON-able facts about the source (``source``, ``volatile``, ``runs``, ...).
        level: zstd compression level for pages.
    """

    def __init__(self, path: str | os.PathLike[str], *, meta: dict[str, Any], level: int = 3) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "wb")
        self._writer = RecordWriter(self._file)
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._ordinals: dict[bytes, int] = {}
        self._context = SETUP
        self._reads: dict[int, int] = {}
        self._registers: set[int] = set()
        self.events = 0
        self.handled: int | None = None
        """Events (from the first) whose rules ran, when the consumer says (the engine does): the
        last one may have been cut by the end of the watch. None: all of them."""
        self.page_reads = 0
        self.closed = False
        self._writer.write_json(RecordType.META, {
            "format": "vmwatch-recording",
            "vmwatch_version": vmwatch.__version__,
            "created_unix_ns": time.time_ns(),
            "page_size": PAGE_SIZE,
            **meta,
        })

    @property
    def pages(self) -> int:
        """Distinct page contents stored so far."""
        return len(self._ordinals)

    @property
    def bytes_written(self) -> int:
        return self._writer.bytes_written

    def ordinal_of(self, pfn: int) -> int | None:
        """Frame ``pfn``'s page ordinal in the current context, UNMAPPED, or None if not read yet."""
        return self._reads.get(pfn)

    def add_page(self, pfn: int, data: bytes | None) -> None:
        """Record the content of frame ``pfn`` for the current context (``None``: unmapped)."""
        if data is None:
            self._reads[pfn] = UNMAPPED
            return
        digest = page_digest(data)
        ordinal = self._ordinals.get(digest)
        if ordinal is None:
            ordinal = self._ordinals[digest] = len(self._ordinals)
            packed = self._compressor.compress(data)
            if len(packed) < PAGE_SIZE:
                self._writer.write(RecordType.PAGE, PAGE_HEAD.pack(PageEncoding.ZSTD, digest) + packed)
            else:
                self._writer.write(RecordType.PAGE, PAGE_HEAD.pack(PageEncoding.RAW, digest) + data)
        self._reads[pfn] = ordinal

    def add_clock(self, value: int) -> None:
        """Record a clock reading taken in the current context."""
        self._writer.write(RecordType.CLOCK, CLOCK_ENTRY.pack(self._context, value))

    def add_verdict(self, verdict: str, hits: int = 0, seconds: float = 0.0, sample_every: int = 0) -> None:
        """Record the overhead governor's verdict on the current event's trap hit (see VERDICTS)."""
        self._writer.write(RecordType.GOVERN, GOVERN.pack(self._context, VERDICTS.index(verdict), hits, seconds,
                                                          sample_every))

    def add_registers(self, registers: Registers) -> None:
        """Record a vCPU's registers as read in the current context (the first read wins)."""
        if registers.vcpu in self._registers:
            return
        self._registers.add(registers.vcpu)
        payload = _codec.encode_registers(registers)
        self._writer.write(RecordType.REGISTERS, REGISTERS_HEAD.pack(self._context, registers.vcpu) + payload)

    def begin_event(self, event: Event) -> None:
        """Close the current context and open the one of ``event`` (the next ordinal)."""
        self._flush_reads()
        self._writer.write(RecordType.EVENT, _codec.encode_event(event))
        self._context = self.events
        self.events += 1

    def _flush_reads(self) -> None:
        items = sorted(self._reads.items())
        self.page_reads += len(items)
        for start in range(0, len(items), MAX_READS_PER_RECORD):
            chunk = items[start:start + MAX_READS_PER_RECORD]
            body = b"".join(READ_ENTRY.pack(pfn, ordinal) for pfn, ordinal in chunk)
            self._writer.write(RecordType.READS, READS_HEAD.pack(self._context, len(chunk)) + body)
        self._reads = {}
        self._registers = set()

    def close(self) -> None:
        """Write the END record and close the file (idempotent)."""
        if self.closed:
            return
        self._flush_reads()
        self._writer.write_json(RecordType.END, {
            "events": self.events, "pages": self.pages, "page_reads": self.page_reads,
            **({} if self.handled is None else {"handled": self.handled}),
        })
        self._file.close()
        self.closed = True
        log.info("recording written", path=self.path, events=self.events, pages=self.pages,
                 bytes=self.bytes_written)

    def abort(self) -> None:
        """Close without an END record: readers will call the recording truncated."""
        if not self.closed:
            self._file.close()
            self.closed = True


class RecordingPhysicalMemory(PhysicalReads):
    """A PhysicalMemory that records what it serves into a :class:`Recorder`."""

    def __init__(self, inner: Any, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.volatile = bool(getattr(inner, "volatile", False))
        self.writable = bool(getattr(inner, "writable", False))
        self.runs = getattr(inner, "runs", ())

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        size = len(buf)
        if size == 0:
            return
        first = paddr >> PAGE_SHIFT
        last = (paddr + size - 1) >> PAGE_SHIFT
        recorder = self.recorder
        if first == last and recorder.ordinal_of(first) not in (None, UNMAPPED):
            self.inner.read_into(paddr, buf, pad=pad)
            return
        out = memoryview(buf)
        for pfn in range(first, last + 1):
            page_start = pfn << PAGE_SHIFT
            lo = max(paddr, page_start)
            hi = min(paddr + size, page_start + PAGE_SIZE)
            part = out[lo - paddr:hi - paddr]
            ordinal = recorder.ordinal_of(pfn)
            if ordinal == UNMAPPED:
                self._unmapped(paddr, size, part, pad)
                continue
            if ordinal is not None:
                self.inner.read_into(lo, part)
                continue
            try:
                page = self.inner.read(page_start, PAGE_SIZE)
            except PhysicalReadError:
                recorder.add_page(pfn, None)
                self._unmapped(paddr, size, part, pad)
                continue
            recorder.add_page(pfn, page)
            part[:] = page[lo - page_start:hi - page_start]

    @staticmethod
    def _unmapped(paddr: int, size: int, part: memoryview, pad: bool) -> None:
        if not pad:
            raise PhysicalReadError(paddr, size)
        part[:] = bytes(len(part))

    def write(self, paddr: int, data: bytes) -> None:
        """Writes are not replayable: refuse them while recording."""
        raise UnsupportedOperation(f"cannot write guest memory at {paddr:#x} while recording")


class _RecordingEvents:
    """Async iterator over the inner source's events that opens a context per event."""

    def __init__(self, inner: Any, source: RecordingSource) -> None:
        self._inner = inner
        self._source = source

    def __aiter__(self) -> _RecordingEvents:
        return self

    async def __anext__(self) -> Event:
        event = await self._inner.__anext__()
        while self._source._ticking is not None:  # the tick's reads stay in the tick's context
            await self._source._ticking.wait()
        self._source.recorder.begin_event(event)
        return event

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class RecordingSource:
    """An engine Source (vmwatch/engine/sources.py) that records what passes through it.

    Everything not overridden is the inner source's. It offers ``events()`` only, never
    ``event_batches()``: each event must be its own context, and a batch would mix the reads of
    several events. For the same reason it is never ``realtime``.

    The engine's periodic ticks run inside :meth:`on_tick`: each is recorded as a Tick event (a
    context of its own, naming the rules that ran) where it fell between the events. The overhead
    governor's verdicts (hits sampled out, traps demoted) come through :meth:`on_governed` and are
    recorded with the event they concern, so a replay handles exactly the hits the live run did.
    """

    realtime = False

    def __init__(self, inner: Any, recorder: Recorder) -> None:
        self._inner = inner
        self.recorder = recorder
        self.name = getattr(inner, "name", "guest")
        memory = getattr(inner, "memory", None)
        self.memory = RecordingPhysicalMemory(memory, recorder) if memory is not None else None
        self.capabilities = frozenset(getattr(inner, "capabilities", ())) - {"write"}
        self._ticking: trio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "event_batches":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def events(self) -> _RecordingEvents:
        return _RecordingEvents(aiter(self._inner.events()), self)

    @contextlib.contextmanager
    def on_tick(self, tick: Tick) -> Iterator[None]:
        """The engine runs periodic rules at ``tick``: what they read is recorded for it.

        An event the inner source hands out meanwhile opens its context only when the tick ends.
        """
        done = self._ticking = trio.Event()
        self.recorder.begin_event(tick)
        try:
            yield
            self.recorder.handled = self.recorder.events
        finally:
            self._ticking = None
            done.set()

    def on_handled(self) -> None:
        """The engine ran the rules of the event handed out last (or decided none run)."""
        self.recorder.handled = self.recorder.events

    def on_governed(self, decision: Any) -> None:
        """The engine's governor sampled out this event's hit (``None``) or demoted its trap."""
        if decision is None:
            self.recorder.add_verdict("skip")
        else:
            self.recorder.add_verdict(decision.action, decision.hits, decision.seconds, decision.sample_every)

    async def registers(self, vcpu: int = 0) -> Registers:
        registers = await self._inner.registers(vcpu)
        self.recorder.add_registers(registers)
        return registers

    async def all_registers(self) -> tuple[Registers, ...]:
        every = tuple(await self._inner.all_registers())
        for registers in every:
            self.recorder.add_registers(registers)
        return every

    def clock_ns(self) -> int:
        """The source's clock (wall clock unless the source has its own), recorded for replay."""
        inner = getattr(self._inner, "clock_ns", None)
        value = inner() if inner is not None else time.time_ns()
        self.recorder.add_clock(value)
        return value


def source_meta(source: Any) -> dict[str, Any]:
    """What a recording says about the source it came from."""
    memory = getattr(source, "memory", None)
    return {
        "source": getattr(source, "name", "guest"),
        "capabilities": sorted(set(getattr(source, "capabilities", ())) - {"write"}),
        "memory": memory is not None,
        "volatile": bool(getattr(memory, "volatile", False)),
        "vcpu_count": getattr(source, "vcpu_count", None),
        "arch": getattr(source, "arch", "x86"),
        "on_resume": hasattr(source, "on_resume"),
        "runs": [[run.start, run.size] for run in getattr(memory, "runs", ())],
        "base": None,
    }


@contextlib.contextmanager
def recording_source(source: Any, path: str | os.PathLike[str], *,
                     base: str | os.PathLike[str] | None = None) -> Iterator[RecordingSource]:
    """A Source like ``source`` whose events, memory reads, register reads and clock are recorded.

    ``base`` names a memory image of the guest taken just before (a dump): the recording keeps
    its path, size and BLAKE2b digest, and replay reads pages the recording never saw from it.

    The recording is finished (END record) when the block exits normally or on a KeyboardInterrupt
    or trio cancellation (a stopped watch is a complete session); any other exception leaves it
    without END, so a reader calls it truncated.
    """
    meta = source_meta(source)
    if base is not None:
        meta["base"] = {"path": os.path.abspath(base), "size": os.path.getsize(base), "blake2b": file_digest(base)}
    recorder = Recorder(path, meta=meta)
    try:
        yield RecordingSource(source, recorder)
    except BaseException as exc:
        if _is_stop(exc):
            recorder.close()
        else:
            recorder.abort()
        raise
    recorder.close()


def _is_stop(exc: BaseException) -> bool:
    if isinstance(exc, (KeyboardInterrupt, trio.Cancelled)):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_stop(e) for e in exc.exceptions)
    return False
