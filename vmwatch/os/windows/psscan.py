"""Processes found by their pool tag: a second view beside ActiveProcessLinks (it sees DKOM hiding).

Every EPROCESS is allocated from nonpaged pool: a 16-byte aligned _POOL_HEADER (8-byte on x86)
whose PoolTag (at +4) reads ``Proc`` (``Pro\\xe3`` with the protected bit Windows 7 sets), then
optional headers and the _OBJECT_HEADER (0x30 bytes, 0x18 on x86), then the body. As Volatility's psscan does, physical memory is searched for
the tag and each 16-byte step after it is tried as an EPROCESS body; one is kept only when it
looks alive and whole: _DISPATCHER_HEADER.Type 3 (ProcessObject), a pid that is a non-zero
multiple of 4, a printable ImageFileName, both ActiveProcessLinks pointers in kernel space, a
page-table root, and ExitTime 0 (where the profile has no ExitTime, an exited process whose
block is not reused yet is counted too). The body is read physically contiguous: it sits in
one pool block. The whole of RAM is read once per scan (about as long as one regex pass over
it: see benchmarks/bench_windows.py), so rules run it rarely.
"""

from __future__ import annotations

import re
import struct

import attrs

from vmwatch.errors import UnsupportedOperation, VmwatchError
from vmwatch.os.linux.tasks import Listing
from vmwatch.os.windows.scan import find_regex
from vmwatch.os.windows.kdbg import KERNEL_SPACE, KERNEL_SPACE_X86
from vmwatch.os.windows.tasks import Process, _field, _process, dtb_mask

TAG = re.compile(b"Pro[c\xe3]")
BODY_OFFSETS = {64: range(0x40, 0x140, 0x10), 32: range(0x20, 0xA0, 8)}
"""Where the body may start in its block: pool header + optional headers + object header."""
POOL_ALIGN = {64: 16, 32: 8}
MAX_HITS = 1 << 16


@attrs.frozen
class PoolProcess:
    """An EPROCESS found in pool memory."""

    paddr: int
    """Physical address of the body."""
    process: Process
    """Its fields; ``address`` is None when no ActiveProcessLinks pointer leads back to it."""


def scan_processes(win) -> Listing:
    """Every live-looking EPROCESS in physical memory (:class:`PoolProcess`); ``.skipped`` says
    when the scan stopped early (more than MAX_HITS tags: hostile or huge memory).

    Raises:
        UnsupportedOperation: the memory is read through a gdbstub (minutes per GiB).
    """
    o = win.profile.eprocess
    phys = win.memory.phys.inner  # bulk reads bypass (and do not flush) the page cache
    if getattr(phys, "slow_bulk_reads", False):
        raise UnsupportedOperation("the pool scan reads all guest RAM: not through the gdbstub "
                                   "(let vmwatch map the guest's RAM file)")
    span = max(v for v in o.values() if v is not None) + 16
    bits = win.profile.bits
    skipped: list[str] = []
    found: list[PoolProcess] = []
    for hits, tag in enumerate(find_regex(phys, TAG, 4, POOL_ALIGN[bits], 4)):
        if hits >= MAX_HITS:
            skipped.append(f"pool scan stopped after {MAX_HITS} process pool tags")
            break
        for off in BODY_OFFSETS[bits]:
            paddr = tag - 4 + off
            try:
                raw = phys.read(paddr, span)
            except VmwatchError:  # past the end of a run: no body fits here
                break
            if _alive(raw, o, bits):
                address = _vaddr(win, raw, paddr, o["ActiveProcessLinks"])
                found.append(PoolProcess(paddr, _process(raw, address, o, bits)))
                break
    return Listing(found, skipped)


def _links(raw: bytes, links: int, bits: int) -> tuple[int, int]:
    return struct.unpack_from("<QQ" if bits == 64 else "<II", raw, links)


def _alive(raw: bytes, o: dict[str, int | None], bits: int) -> bool:
    if raw[0] != 3:
        return False
    ptr = "<Q" if bits == 64 else "<I"
    pid = _field(raw, o["UniqueProcessId"], ptr)
    if not pid or pid % 4 or pid >= 1 << 32:
        return False
    flink, blink = _links(raw, o["ActiveProcessLinks"], bits)
    space = KERNEL_SPACE if bits == 64 else KERNEL_SPACE_X86
    if flink < space or blink < space:
        return False
    if o["DirectoryTableBase"] is not None and not _field(raw, o["DirectoryTableBase"], ptr) & dtb_mask(bits):
        return False
    if o.get("ExitTime") is not None and _field(raw, o["ExitTime"]):
        return False
    name = raw[o["ImageFileName"]:o["ImageFileName"] + 15].split(b"\0", 1)[0]
    return bool(name) and all(0x20 <= b < 0x7F for b in name)


def _vaddr(win, raw: bytes, paddr: int, links: int) -> int | None:
    """The body's virtual address, from a pointer that leads back to it: its own links (an
    unlinked process points to itself) or a neighbour's links to it."""
    flink, blink = _links(raw, links, win.profile.bits)
    candidates = [flink, blink]
    for address in (blink, flink + win.memory.pointer_size):
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
