"""Replay a recording: its events, and a physical memory that serves the recorded pages.

Theory of operation: opening a recording checks every record (CRC, order, references) once, up
front, so a corrupt file fails before the first alert rather than halfway. Then, for each frame,
the list of (context, page ordinal) in recording order is kept; a read while replaying event N
gets the page as recorded in the latest context <= N. With the same rules that is always the
page recorded for event N itself (identical reads, identical alerts). With other rules it is the
last content the recording saw, which may be older than the live guest's was at that moment;
``strict=True`` refuses anything but the event's own pages. A frame never recorded raises
:class:`PageNotRecorded` naming the address: never a silent zero.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
from typing import Any, Callable, Iterator

import structlog
import zstandard

from vmwatch.cpu import Registers
from vmwatch.errors import PageNotRecorded, PhysicalReadError, RecordingError, UnsupportedOperation
from vmwatch.events import Event
from vmwatch.images.base import PhysicalReads, Run
from vmwatch.replay import _codec
from vmwatch.replay.format import (
    CLOCK_ENTRY,
    GOVERN,
    PAGE_HEAD,
    PAGE_SHIFT,
    PAGE_SIZE,
    READ_ENTRY,
    READS_HEAD,
    RECORD_HEAD,
    REGISTERS_HEAD,
    SETUP,
    UNMAPPED,
    VERDICTS,
    RecordType,
    decompress_page,
    iter_records,
    open_mapped,
    page_digest,
)

log = structlog.get_logger()


class Recording:
    """A parsed, validated recording file (the pages stay in the file until read).

    Use :meth:`open`; close with :meth:`close` or as a context manager.
    """

    def __init__(self, path: str, data: Any) -> None:
        self.path = path
        self._data = data
        self.meta: dict[str, Any] = {}
        self.end: dict[str, Any] | None = None
        self.events: list[Event] = []
        self._pages: list[tuple[int, int, int]] = []  # (encoding, payload offset, payload length)
        self._digests: list[bytes] = []
        self.history: dict[int, tuple[list[int], list[int]]] = {}  # pfn -> (contexts, ordinals)
        self._registers: dict[tuple[int, int], tuple[int, memoryview]] = {}
        """(context, vCPU) -> where the record is and its JSON, decoded on first use."""
        self.clocks: dict[int, list[int]] = {}
        self.verdicts: dict[int, tuple[str, int, float, int]] = {}
        """Event ordinal -> the live overhead governor's verdict on its hit (action, hits, seconds, 1 in N)."""
        self._decompressor = zstandard.ZstdDecompressor()
        self._cache: dict[int, bytes] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Recording:
        """Read and check a whole recording.

        Raises:
            RecordingError: not a recording, newer format, truncated, corrupted, or inconsistent.
            OSError: the file cannot be read.
        """
        path = os.fspath(path)
        data = open_mapped(path)
        recording = cls(path, data)
        try:
            recording._load()
        except BaseException:
            recording.close()
            raise
        return recording

    def _load(self) -> None:
        where = self.path
        records = iter_records(self._data, where)
        context = SETUP
        last_context_with_reads = SETUP - 1
        for record in records:
            kind, payload, at = record.kind, record.payload, f"{where}: record at file offset {record.offset:#x}"
            if self.end is not None:
                raise RecordingError(f"{at}: data after the END record")
            if not self.meta and kind != RecordType.META:
                raise RecordingError(f"{at}: first record must be META, not type {kind:#x}")
            if kind == RecordType.META:
                if self.meta:
                    raise RecordingError(f"{at}: second META record")
                self.meta = _json_object(payload, at)
                if self.meta.get("page_size") != PAGE_SIZE:
                    raise RecordingError(f"{at}: page size {self.meta.get('page_size')!r} is not {PAGE_SIZE}")
            elif kind == RecordType.PAGE:
                if len(payload) < PAGE_HEAD.size:
                    raise RecordingError(f"{at}: page record too short")
                encoding, digest = PAGE_HEAD.unpack_from(payload, 0)
                start = record.offset + RECORD_HEAD.size + PAGE_HEAD.size
                self._pages.append((encoding, start, len(payload) - PAGE_HEAD.size))
                self._digests.append(digest)
            elif kind == RecordType.EVENT:
                self.events.append(_codec.decode_event(bytes(payload)))
                context = len(self.events) - 1
            elif kind == RecordType.READS:
                if len(payload) < READS_HEAD.size:
                    raise RecordingError(f"{at}: reads record too short")
                ctx, count = READS_HEAD.unpack_from(payload, 0)
                if ctx != context or ctx < last_context_with_reads:
                    raise RecordingError(f"{at}: reads for event {ctx} out of order (current event {context})")
                last_context_with_reads = ctx
                if len(payload) != READS_HEAD.size + count * READ_ENTRY.size:
                    raise RecordingError(f"{at}: reads record length does not match its {count} entries")
                npages = len(self._pages)
                for pfn, ordinal in READ_ENTRY.iter_unpack(payload[READS_HEAD.size:]):
                    if ordinal != UNMAPPED and ordinal >= npages:
                        raise RecordingError(f"{at}: frame {pfn:#x} refers to page {ordinal}, not yet stored")
                    contexts, ordinals = self.history.setdefault(pfn, ([], []))
                    if contexts and contexts[-1] == ctx:
                        raise RecordingError(f"{at}: frame {pfn:#x} recorded twice for event {ctx}")
                    contexts.append(ctx)
                    ordinals.append(ordinal)
            elif kind == RecordType.REGISTERS:
                if len(payload) < REGISTERS_HEAD.size:
                    raise RecordingError(f"{at}: registers record too short")
                ctx, vcpu = REGISTERS_HEAD.unpack_from(payload, 0)
                if ctx != context:
                    raise RecordingError(f"{at}: registers for event {ctx} out of order (current event {context})")
                self._registers[(ctx, vcpu)] = (record.offset, payload[REGISTERS_HEAD.size:])
            elif kind == RecordType.CLOCK:
                if len(payload) != CLOCK_ENTRY.size:
                    raise RecordingError(f"{at}: clock record has the wrong size")
                ctx, value = CLOCK_ENTRY.unpack_from(payload, 0)
                if ctx != context:
                    raise RecordingError(f"{at}: clock for event {ctx} out of order (current event {context})")
                self.clocks.setdefault(ctx, []).append(value)
            elif kind == RecordType.GOVERN:
                self.verdicts[context] = _verdict(payload, context, self.verdicts, at)
            elif kind == RecordType.END:
                self.end = _json_object(payload, at)
            elif kind < 0x80:
                raise RecordingError(f"{at}: unknown record type {kind:#x}")
        if not self.meta:
            raise RecordingError(f"{where}: recording holds no META record")
        if self.end is None:
            raise RecordingError(f"{where}: recording is truncated (no END record)")
        handled = self.end.get("handled", len(self.events))
        if not isinstance(handled, int) or not 0 <= handled <= len(self.events):
            raise RecordingError(f"{where}: END record says {handled!r} events were handled, of {len(self.events)}")
        self.handled: int = handled
        """Events the live run handled: the ones after it were cut by the end of the watch."""
        if self.end.get("events") != len(self.events) or self.end.get("pages") != len(self._pages):
            raise RecordingError(
                f"{where}: END record says {self.end.get('events')} events and {self.end.get('pages')} pages,"
                f" the file holds {len(self.events)} and {len(self._pages)}"
            )

    def registers(self, context: int, vcpu: int) -> Registers | None:
        """The registers of ``vcpu`` recorded in ``context``, or None.

        Raises:
            RecordingError: the record does not hold that vCPU's registers.
        """
        found = self._registers.get((context, vcpu))
        if found is None:
            return None
        if isinstance(found, Registers):
            return found
        offset, payload = found
        registers = _codec.decode_registers(bytes(payload))
        if registers.vcpu != vcpu:
            raise RecordingError(f"{self.path}: registers record at file offset {offset:#x} of vCPU {vcpu}"
                                 f" holds vCPU {registers.vcpu}")
        self._registers[(context, vcpu)] = registers  # type: ignore[assignment]
        return registers

    @property
    def page_count(self) -> int:
        return len(self._pages)

    def page(self, ordinal: int) -> bytes:
        """The content of stored page ``ordinal`` (digest checked on first use, then cached)."""
        page = self._cache.get(ordinal)
        if page is not None:
            return page
        encoding, start, length = self._pages[ordinal]
        where = f"{self.path}: page {ordinal}"
        page = decompress_page(self._decompressor, encoding, memoryview(self._data)[start:start + length], where)
        if page_digest(page) != self._digests[ordinal]:
            raise RecordingError(f"{where}: content does not match its BLAKE2b digest")
        if len(self._cache) >= 8192:
            self._cache.pop(next(iter(self._cache)))
        self._cache[ordinal] = page
        return page

    def lookup(self, pfn: int, context: int, *, strict: bool = False) -> int | None:
        """Page ordinal (or UNMAPPED) for frame ``pfn`` as seen in ``context``; None if never seen."""
        entry = self.history.get(pfn)
        if entry is None:
            return None
        contexts, ordinals = entry
        if contexts[-1] <= context:
            index = len(contexts) - 1
        else:
            index = bisect.bisect_right(contexts, context) - 1
            if index < 0:
                return None
        if strict and contexts[index] != context:
            return None
        return ordinals[index]

    def close(self) -> None:
        close = getattr(self._data, "close", None)
        self._cache.clear()
        if close is not None:
            try:
                close()
            except BufferError:  # a memoryview of a page is still alive somewhere; the GC closes it
                pass

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_object(payload: memoryview, where: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordingError(f"{where}: payload is not valid JSON") from None
    if not isinstance(value, dict):
        raise RecordingError(f"{where}: payload is not a JSON object")
    return value


def _verdict(payload: memoryview, context: int, seen: dict[int, Any], at: str) -> tuple[str, int, float, int]:
    if len(payload) != GOVERN.size:
        raise RecordingError(f"{at}: governor record has the wrong size")
    ctx, code, hits, seconds, sample_every = GOVERN.unpack_from(payload, 0)
    if ctx != context or ctx < 0:
        raise RecordingError(f"{at}: governor verdict for event {ctx} out of place (current event {context})")
    if ctx in seen:
        raise RecordingError(f"{at}: two governor verdicts for event {ctx}")
    if code >= len(VERDICTS) or not (math.isfinite(seconds) and seconds >= 0) or (code and sample_every < 1):
        raise RecordingError(f"{at}: bad governor verdict {code} ({hits} hits, {seconds}s, 1/{sample_every})")
    return VERDICTS[code], hits, seconds, sample_every


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


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-256 of a whole file, hex (how a recording names its base image)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_base(recording: Recording, path: str | os.PathLike[str]) -> None:
    """Refuse a base image other than the one the recording was made on top of (if it names one)."""
    wanted = recording.meta.get("base")
    if not wanted:
        return
    if not isinstance(wanted, dict):
        raise RecordingError(f"{recording.path}: META base is not an object")
    size = os.path.getsize(path)
    if size != wanted.get("size") or file_digest(path) != wanted.get("blake2b"):
        raise RecordingError(f"{path} is not the base image this recording was made on "
                             f"(expected {wanted.get('size')} bytes, BLAKE2b {str(wanted.get('blake2b'))[:16]}...)")
