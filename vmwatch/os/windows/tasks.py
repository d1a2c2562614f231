"""Processes: the EPROCESS list on PsActiveProcessHead (ActiveProcessLinks).

Without a KDBG (an encoded one and no keys), the head is found from the exported
PsInitialSystemProcess: walk the System process's links to the one node inside ntoskrnl's
image, which is PsActiveProcessHead. Every walk is bounded and cycle-safe (objects.walk_list).
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux.objects import c_string, walk_list
from vmwatch.os.linux.tasks import Listing

_CR3_MASK = 0x000FFFFFFFFFF000
_CR3_MASK_X86 = 0xFFFFFFE0
"""An x86 DirectoryTableBase is a ULONG: a PAE root is only 32-byte aligned."""
MAX_PROCESSES = 1 << 16


@attrs.frozen(kw_only=True)
class Process:
    """One EPROCESS."""

    pid: int
    ppid: int | None
    name: str
    """ImageFileName (15 bytes, undecodable bytes escaped)."""
    dtb: int | None
    create_time: int | None
    """CreateTime: 100 ns units since 1601-01-01 UTC (a FILETIME)."""
    peb: int | None
    address: int | None
    """Virtual address of the EPROCESS (None: found by the pool scan, and no link leads back to it)."""

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def process_head(win, skipped: list[str]) -> int:
    """PsActiveProcessHead: from KDBG/the profile, else found from PsInitialSystemProcess.

    Raises:
        SymbolError: neither is known, or the System process's list never reaches ntoskrnl.
    """
    if "PsActiveProcessHead" in win.symbols:
        return win.symbols["PsActiveProcessHead"]
    if "PsInitialSystemProcess" not in win.symbols:
        raise SymbolError("no PsActiveProcessHead (no KDBG) and no PsInitialSystemProcess export")
    links = win.profile.eprocess["ActiveProcessLinks"]
    system = win.memory.pointer(win.symbols["PsInitialSystemProcess"])
    start = system + links
    for node in walk_list(win.memory, start, 0, name="System ActiveProcessLinks", skipped=skipped, limit=MAX_PROCESSES):
        if win.in_kernel(node):
            return node
    raise SymbolError(f"the System process at {system:#x}: no ActiveProcessLinks node inside ntoskrnl "
                      "(PsActiveProcessHead not found)")


def walk_processes(win) -> Listing:
    """Every process on the list; problems (unreadable, cycles) go to ``.skipped``."""
    offsets = win.profile.eprocess
    links = offsets["ActiveProcessLinks"]
    skipped: list[str] = []
    head = process_head(win, skipped)
    found = []
    for address in walk_list(win.memory, head, links, name="PsActiveProcessHead", skipped=skipped, limit=MAX_PROCESSES):
        try:
            found.append(read_process(win, address))
        except VmwatchError as exc:
            skipped.append(f"process at {address:#x}: {exc}")
    return Listing(found, skipped)


def read_process(win, address: int) -> Process:
    """The EPROCESS at virtual ``address``.

    Raises:
        VmwatchError: it is not readable.
    """
    offsets = win.profile.eprocess
    span = max(v for v in offsets.values() if v is not None) + 16
    return _process(win.memory.read(address, span), address, offsets, win.profile.bits)


def _field(buf: bytes, offset: int | None, fmt: str = "<Q") -> int | None:
    return None if offset is None else struct.unpack_from(fmt, buf, offset)[0]


def dtb_mask(bits: int) -> int:
    """The bits of a DirectoryTableBase that address the page-table root."""
    return _CR3_MASK if bits == 64 else _CR3_MASK_X86


def _process(buf: bytes, address: int | None, o: dict[str, int | None], bits: int = 64) -> Process:
    """The fields of the EPROCESS body in ``buf``: pointers (pid, ppid, Peb) and the x86
    DirectoryTableBase are 4 bytes on a 32-bit kernel; CreateTime is a LARGE_INTEGER on both."""
    ptr = "<Q" if bits == 64 else "<I"
    dtb = _field(buf, o["DirectoryTableBase"], ptr)
    return Process(
        pid=_field(buf, o["UniqueProcessId"], ptr), ppid=_field(buf, o["InheritedFromUniqueProcessId"], ptr),
        name=c_string(buf[o["ImageFileName"]:o["ImageFileName"] + 15]),
        dtb=None if dtb is None else dtb & dtb_mask(bits), create_time=_field(buf, o["CreateTime"], "<q"),
        peb=_field(buf, o["Peb"], ptr), address=address)
