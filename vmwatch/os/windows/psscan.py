"""Processes found by their pool tag, a second view beside ActiveProcessLinks (DKOM finds no hiding).

Every EPROCESS is allocated from nonpaged pool: a _POOL_HEADER whose PoolTag (at +4) reads
``Proc`` (``Pro\\xe3`` with the protected bit Windows 7 sets), then optional headers and the
_OBJECT_HEADER, then the body. As Volatility's psscan does, physical memory is searched for the
tag and each 16-byte aligned spot after it is tried as an EPROCESS body; one is kept only when it
looks alive and whole: _DISPATCHER_HEADER.Type 3 (ProcessObject), a pid that is a non-zero
multiple of 4, a printable ImageFileName, ActiveProcessLinks pointing into kernel space, a
page-table root, and ExitTime 0 where the profile knows its offset (else an exited process whose
block was not reused yet may be counted: not checked on builds whose ExitTime is not built in).
The body is read physically contiguous, as it sits in one pool block.
"""

from __future__ import annotations

import struct

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.tasks import Listing
from vmwatch.os.windows.scan import find_all
from vmwatch.os.windows.tasks import _CR3_MASK, Process, _field, _process

TAGS = (b"Proc", b"Pro\xe3")
BODY_OFFSETS = range(0x40, 0x140, 0x10)
"""Where the body may start in its block: pool header + optional headers + object header."""
MAX_HITS = 1 << 16
_KERNEL_SPACE = 0xFFFF800000000000


def scan_processes(win) -> Listing:
    """Every live-looking EPROCESS in physical memory, with ``paddr`` set; ``.skipped`` says when it stopped."""
    o = win.profile.eprocess
    span = max(v for v in o.values() if v is not None) + 16
    skipped: list[str] = []
    found: list[Process] = []
    seen: set[int] = set()
    hits = 0
    for tag in TAGS:
        for hit in find_all(win.memory.phys, tag, 4, 0):
            hits += 1
            if hits > MAX_HITS:
                skipped.append(f"pool scan stopped after {MAX_HITS} {TAGS[0].decode()} tags")
                return Listing(found, skipped)
            block = hit - 4
            for off in BODY_OFFSETS:
                paddr = block + off
                if paddr in seen:
                    continue
                try:
                    raw = win.memory.phys.read(paddr, span)
                except VmwatchError:
                    break
                if _alive(raw, o):
                    seen.add(paddr)
                    proc = _process(raw, _vaddr(win, raw, paddr, o), o)
                    found.append(attrs_evolve(proc, paddr=paddr))
                    break
    return Listing(found, skipped)


def _alive(raw: bytes, o: dict[str, int | None]) -> bool:
    if raw[0] != 3:
        return False
    pid = _field(raw, o["UniqueProcessId"])
    if not pid or pid % 4 or pid >= 1 << 24:
        return False
    links = o["ActiveProcessLinks"]
    flink, blink = struct.unpack_from("<QQ", raw, links)
    if flink < _KERNEL_SPACE or blink < _KERNEL_SPACE:
        return False
    if o["DirectoryTableBase"] is not None and not _field(raw, o["DirectoryTableBase"]) & _CR3_MASK:
        return False
    if o.get("ExitTime") is not None and _field(raw, o["ExitTime"]):
        return False
    name = raw[o["ImageFileName"]:o["ImageFileName"] + 15].split(b"\0", 1)[0]
    return bool(name) and all(0x20 <= b < 0x7F for b in name)


def _vaddr(win, raw: bytes, paddr: int, o: dict[str, int | None]) -> int | None:
    """The body's virtual address, from a link that leads back to it (its own, or a neighbour's)."""
    links = o["ActiveProcessLinks"]
    flink, blink = struct.unpack_from("<QQ", raw, links)
    candidates = [flink, blink]
    for address in (blink, flink + 8):
        try:
            candidates.append(win.memory.pointer(address))
        except VmwatchError:
            pass
    for node in candidates:
        try:
            if win.memory.translate(node) == paddr + links:
                return node - links
        except VmwatchError:
            continue
    return None


def attrs_evolve(proc: Process, **changes) -> Process:
    import attrs

    return attrs.evolve(proc, **changes)
