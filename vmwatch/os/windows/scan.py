"""Fast scans of physical memory: page-aligned signatures and byte patterns, chunk by chunk.

A multi-GB image is never read page by page from Python: for a page-aligned signature, one
strided copy takes the first bytes of every page of a 64 MiB chunk at once (a C loop), and
byte patterns are searched with ``re`` directly on the image's mmap view (no copy).
"""

from __future__ import annotations

import re
from typing import Iterator

PAGE = 4096
CHUNK = 64 << 20


def _chunks(phys) -> Iterator[tuple[int, object]]:
    """(paddr, buffer) pieces of every backed run; zero-filled runs hold nothing to find."""
    view = getattr(phys, "view", None)
    for run in phys.runs:
        if getattr(run, "file_offset", 0) is None:
            continue
        for start in range(run.start, run.start + run.size, CHUNK):
            size = min(CHUNK, run.start + run.size - start)
            yield start, view(start, size) if view is not None else phys.read(start, size, pad=True)


def page_signatures(phys, signature: bytes) -> Iterator[int]:
    """Physical addresses of pages that begin with ``signature`` (two bytes), lowest first."""
    first, second = signature[0], signature[1]
    for start, buf in _chunks(phys):
        mv = memoryview(buf)
        lead = mv[0::PAGE].tobytes()
        follow = mv[1::PAGE].tobytes()
        i = lead.find(first)
        while i >= 0:
            if i < len(follow) and follow[i] == second:
                yield start + i * PAGE
            i = lead.find(first, i + 1)
        mv.release()
        if isinstance(buf, memoryview):
            buf.release()


def find_all(phys, pattern: bytes, align: int = 1, phase: int = 0) -> Iterator[int]:
    """Physical addresses where ``pattern`` starts with ``paddr % align == phase``."""
    return find_regex(phys, re.compile(re.escape(pattern)), len(pattern), align, phase)


def find_regex(phys, regex: re.Pattern, length: int, align: int = 1, phase: int = 0) -> Iterator[int]:
    """Physical addresses where ``regex`` (matching ``length`` bytes) matches, ``paddr % align == phase``.

    A match split across two chunks is not found: CHUNK is a multiple of every ``align`` used
    here and the patterns sit at aligned offsets, so none straddles a chunk boundary.
    """
    for start, buf in _chunks(phys):
        for m in regex.finditer(buf):
            paddr = start + m.start()
            if paddr % align == phase:
                yield paddr
        if length > 1 and isinstance(buf, memoryview):
            buf.release()
