"""A recording file parsed and checked: events, pages, registers, clocks, governor verdicts.

Theory of operation: opening a recording checks every record (CRC, order, references) once, up
front, so a corrupt file fails before the first alert rather than halfway. Then, for each frame,
the list of (context, page ordinal) in recording order is kept, so :meth:`Recording.lookup` finds
the page as recorded in the latest context <= N with one bisection (the player's reads use it).
Pages and registers stay in the file until first asked for (decoded, checked, cached then).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from typing import Any

import zstandard

from vmwatch.cpu import Registers
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import RecordingError
from vmwatch.events import Event
from vmwatch.replay import _codec
from vmwatch.replay.format import (
    CLOCK_ENTRY,
    GOVERN,
    PAGE_HEAD,
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

    def registers(self, context: int, vcpu: int) -> Registers | Aarch64Registers | None:
        """The registers of ``vcpu`` recorded in ``context``, or None.

        Raises:
            RecordingError: the record does not hold that vCPU's registers.
        """
        found = self._registers.get((context, vcpu))
        if found is None:
            return None
        if isinstance(found, (Registers, Aarch64Registers)):
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
