"""``_KDDEBUGGER_DATA64``: the kernel debugger block, plain or encoded (Windows 8+ x64).

Layout (public in the Windows SDK's wdbgexts.h, x64): a DBGKD_DEBUG_DATA_HEADER64 (LIST_ENTRY64,
OwnerTag ``KDBG`` at 0x10, Size at 0x14), then KernBase 0x18, PsLoadedModuleList 0x48,
PsActiveProcessHead 0x50, PspCidTable 0x58, ObpRootDirectoryObject 0x98, MmPfnDatabase 0xC0,
KiProcessorBlock 0x218 (also in Volatility 3's kdbg.json).

A 32-bit (x86) kernel has the same block, its 64-bit fields holding 32-bit pointers: Windows
writes them sign-extended (0xffffffff82a4b000, as the debugger protocol's 64-bit addresses
are); a plain zero-extended one is read too, anything else in the upper half is not a pointer.

Encoded blocks: when no debugger is attached at boot, Windows 8+ x64 scrambles the block with
per-boot keys (``KdEncodeDataBlock``); ``KdCopyDataBlock`` undoes it per 8-byte word as
``KiWaitAlways ^ bswap(&KdpDataBlockEncoded ^ rol(KiWaitNever ^ word, KiWaitNever & 63))``.
The keys are kernel variables with no exports, so decoding needs their addresses from a
profile (an ISF's symbols), as Volatility 3 and rekall also take them from the PDB.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.errors import GuestDataError, VmwatchError

TAG = b"KDBG"
MIN_SIZE, MAX_SIZE = 0x290, 0x1000
"""Windows XP x64's block is 0x290 bytes; later ones grow a little (Win10 ~0x370)."""
FIELDS = {"KernBase": 0x18, "PsLoadedModuleList": 0x48, "PsActiveProcessHead": 0x50,
          "PspCidTable": 0x58, "ObpRootDirectoryObject": 0x98, "MmPfnDatabase": 0xC0, "KiProcessorBlock": 0x218}
OFFSETS = {"OffsetKThreadApcProcess": 0x2A0, "OffsetPrcbCurrentThread": 0x2B4, "OffsetPcrContainedPrcb": 0x2E6}
"""USHORT layout facts the block carries about its own kernel (wdbgexts.h): read when Size covers them."""
READ = 0x2F0
"""Bytes of a candidate block read: every field and offset above."""
_MASK = (1 << 64) - 1
KERNEL_SPACE = 0xFFFF800000000000
KERNEL_SPACE_X86 = 0x80000000
"""Where x86 system space starts (without /3GB: always where ntoskrnl is loaded)."""


@attrs.frozen
class Kdbg:
    """A validated debugger block."""

    vaddr: int | None
    """Its virtual address (None when only its physical address is known)."""
    paddr: int | None
    size: int
    encoded: bool
    fields: dict[str, int]
    offsets: dict[str, int] = attrs.field(factory=dict)
    """The OFFSETS the block holds (non-zero, inside its Size)."""


def _rol(value: int, count: int) -> int:
    count &= 63
    return ((value << count) | (value >> (64 - count))) & _MASK


def _bswap(value: int) -> int:
    return int.from_bytes(value.to_bytes(8, "little"), "big")


def decode(raw: bytes, never: int, always: int, encoded_vaddr: int) -> bytes:
    """Undo ``KdEncodeDataBlock`` on ``raw`` (whole 8-byte words)."""
    words = struct.unpack_from(f"<{len(raw) // 8}Q", raw)
    return struct.pack(f"<{len(words)}Q", *(always ^ _bswap(encoded_vaddr ^ _rol(never ^ w, never)) for w in words))


def encode(raw: bytes, never: int, always: int, encoded_vaddr: int) -> bytes:
    """What ``KdEncodeDataBlock`` makes of ``raw`` (tests build encoded guests with it)."""
    words = struct.unpack_from(f"<{len(raw) // 8}Q", raw)
    out = []
    for w in words:
        x = encoded_vaddr ^ _bswap(always ^ w)
        out.append(never ^ _rol(x, 64 - (never & 63)))
    return struct.pack(f"<{len(out)}Q", *out)


def narrow(value: int) -> int | None:
    """A 32-bit kernel's pointer from a 64-bit KDBG field (sign- or zero-extended), else None."""
    return value & 0xFFFFFFFF if value >> 32 in (0, 0xFFFFFFFF) else None


def parse(raw: bytes, *, vaddr: int | None, paddr: int | None, encoded: bool = False,
          kernel_base: int | None = None, bits: int = 64) -> Kdbg:
    """Check a block's tag and size and read its fields (as 32-bit pointers when ``bits`` is 32).

    Raises:
        GuestDataError: no ``KDBG`` tag, an absurd size, or a KernBase that is not a kernel image.
    """
    where = f"{vaddr:#x}" if vaddr is not None else f"physical {paddr:#x}" if paddr is not None else "a copy"
    if raw[0x10:0x14] != TAG:
        raise GuestDataError(f"no KDBG tag at {where}" + (" after decoding" if encoded else ""))
    size = struct.unpack_from("<I", raw, 0x14)[0]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise GuestDataError(f"KDBG at {where}: absurd Size {size:#x} (expected {MIN_SIZE:#x}..{MAX_SIZE:#x})")
    fields = {name: struct.unpack_from("<Q", raw, off)[0] for name, off in FIELDS.items()}
    if bits == 32:
        wide = fields["KernBase"]
        fields = {name: narrow(value) or 0 for name, value in fields.items()}
        if not fields["KernBase"] and wide:
            raise GuestDataError(f"KDBG at {where}: KernBase {wide:#x} is not a 32-bit kernel's")
    base = fields["KernBase"]
    space = KERNEL_SPACE if bits == 64 else KERNEL_SPACE_X86
    if base < space or base & 0xFFF or kernel_base is not None and base != kernel_base:
        raise GuestDataError(f"KDBG at {where}: KernBase {base:#x} is not the kernel image")
    offsets = {name: struct.unpack_from("<H", raw, off)[0] for name, off in OFFSETS.items()
               if off + 2 <= min(size, len(raw))}
    return Kdbg(vaddr, paddr, size, encoded, fields, {k: v for k, v in offsets.items() if v})


def scan_physical(phys, kernel_base: int | None = None, limit: int = 64,
                  first: tuple[int, int] | None = None, bits: int = 64) -> tuple[Kdbg | None, list[str]]:
    """The first plain block in physical memory (the ``KDBG`` tag sits 8-byte aligned at +0x10).

    ``first``: a (paddr, size) range searched before the rest: ntoskrnl's own pages, as the block
    is in its data section (on a multi-GB image this skips reading all of RAM).

    Returns the block (or None) and one line per candidate that was rejected (at most ``limit``).
    """
    import itertools
    import re

    from vmwatch.os.windows.scan import find_all

    def in_first():
        start, size = first
        data = phys.read(start, size, pad=True)
        for m in re.finditer(re.escape(TAG), data):
            if (start + m.start()) % 8 == 0:
                yield start + m.start()

    rejected: list[str] = []
    for hit in itertools.chain(in_first() if first else (), find_all(phys, TAG, 8, 0)):
        paddr = hit - 0x10
        try:
            raw = phys.read(paddr, READ, pad=True)
            return parse(raw, vaddr=None, paddr=paddr, kernel_base=kernel_base, bits=bits), rejected
        except VmwatchError as exc:
            rejected.append(str(exc))
            if len(rejected) >= limit:
                rejected.append(f"stopped after {limit} false KDBG tags")
                break
    return None, rejected
