"""Drivers: the KLDR_DATA_TABLE_ENTRY list on PsLoadedModuleList, names as UNICODE_STRINGs."""

from __future__ import annotations

import struct

import attrs

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux.objects import walk_list
from vmwatch.os.linux.tasks import Listing

MAX_MODULES = 8192
MAX_NAME = 1024
"""Bytes of a UNICODE_STRING we read; the kernel caps paths well below this."""


@attrs.frozen
class Driver:
    """One loaded kernel module (ntoskrnl, hal and the drivers)."""

    name: str
    base: int
    size: int
    path: str
    address: int | None
    """Virtual address of the KLDR_DATA_TABLE_ENTRY (None: a triage dump's list, which saves no entry)."""

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def unicode_string(memory, raw: bytes, offset: int) -> str:
    """A UNICODE_STRING (Length, MaximumLength, Buffer) held in ``raw`` at ``offset``.

    Raises:
        VmwatchError: the buffer is unreadable.
    """
    length, _maximum = struct.unpack_from("<HH", raw, offset)
    # Buffer follows at the next pointer-aligned offset: +8 on x64, +4 on x86.
    size = memory.pointer_size
    buffer = int.from_bytes(raw[offset + size:offset + 2 * size], "little")
    if not length or not buffer:
        return ""
    data = memory.read(buffer, min(length & ~1, MAX_NAME))
    return data.decode("utf-16-le", "backslashreplace")


def walk_modules(win) -> Listing:
    """Every entry on PsLoadedModuleList; problems go to ``.skipped``."""
    if "PsLoadedModuleList" not in win.symbols:
        raise SymbolError("no PsLoadedModuleList (not in KDBG, exports or profile)")
    o = win.profile.ldr
    span = max(o.values()) + 16
    skipped: list[str] = []
    found = []
    for address in walk_list(win.memory, win.symbols["PsLoadedModuleList"], o["InLoadOrderLinks"],
                             name="PsLoadedModuleList", skipped=skipped, limit=MAX_MODULES):
        try:
            raw = win.memory.read(address, span)
            base = int.from_bytes(raw[o["DllBase"]:o["DllBase"] + win.memory.pointer_size], "little")
            size = struct.unpack_from("<I", raw, o["SizeOfImage"])[0]
            name = unicode_string(win.memory, raw, o["BaseDllName"])
            path = unicode_string(win.memory, raw, o["FullDllName"])
        except VmwatchError as exc:
            skipped.append(f"module at {address:#x}: {exc}")
            continue
        found.append(Driver(name, base, size, path, address))
    return Listing(found, skipped)
