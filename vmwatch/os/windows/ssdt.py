"""The system service table (SSDT) behind KeServiceDescriptorTable, x64 and x86 encodings.

KSERVICE_TABLE_DESCRIPTOR: Base (pointer), Count (pointer), Limit (ULONG), Number: Limit at
0x10 on x64, 0x8 on x86. On x64 each entry is a 32-bit value whose upper 28 bits,
arithmetic-shifted right by 4, are the handler's offset from Base (the low 4 bits count stack
arguments); on x86 KiServiceTable holds each handler's absolute 32-bit address.
"""

from __future__ import annotations

import struct

from vmwatch.errors import GuestDataError, SymbolError
from vmwatch.os.linux.syscalls import Syscall

MAX_SERVICES = 4096


def read_ssdt(win) -> list[Syscall]:
    """Every service of the first descriptor (nt's table); ``in_text`` is False outside ntoskrnl.

    Raises:
        SymbolError: no KeServiceDescriptorTable symbol.
        GuestDataError: an absurd Limit.
    """
    if "KeServiceDescriptorTable" not in win.symbols:
        raise SymbolError("no KeServiceDescriptorTable (not exported on x64 Windows: pass --symbols with an ISF)",
                          name="KeServiceDescriptorTable")
    descriptor = win.symbols["KeServiceDescriptorTable"]
    wide = win.memory.pointer_size == 8
    base, _count, limit = struct.unpack("<QQI" if wide else "<III", win.memory.read(descriptor, 20 if wide else 12))
    if limit > MAX_SERVICES:
        raise GuestDataError(f"KeServiceDescriptorTable at {descriptor:#x}: absurd Limit {limit}")
    raw = win.memory.read(base, 4 * limit) if limit else b""
    out = []
    for i, entry in enumerate(struct.unpack(f"<{limit}{'i' if wide else 'I'}", raw)):
        address = (base + (entry >> 4)) & ((1 << 64) - 1) if wide else entry
        inside = win.in_kernel(address)
        found = win.symbols.lookup(address) if inside else None
        symbol = None
        if found is not None:
            symbol = found[0] if found[1] == 0 else f"{found[0]}+{found[1]:#x}"
        out.append(Syscall(i, address, symbol, inside))
    return out
