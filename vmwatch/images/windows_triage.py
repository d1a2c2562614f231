"""Triage crash dumps (DumpType 4, the "small memory dump"): saved pieces, no physical memory.

Layout (public ntiodump.h: TRIAGE_DUMP32/TRIAGE_DUMP64, DUMP_DRIVER_ENTRY32/64, DUMP_STRING,
TRIAGE_DATA_BLOCK): the TRIAGE_DUMP structure follows the dump header (file offset 0x1000 for
32-bit dumps, 0x2000 for 64-bit); every ``*Offset`` in it is a file offset, 0 when the piece is
absent. The dump keeps the CONTEXT, the crashing thread's ETHREAD, its EPROCESS and the KPRCB
(raw copies), the loaded-driver list (each entry a copy of its KLDR_DATA_TABLE_ENTRY plus the
file offset of its name, a length-prefixed UTF-16 DUMP_STRING), a copy of the KDBG block, and
blocks of kernel memory saved by virtual address. Nothing else: no process list, page tables
or physical pages. The driver entry's size changed across Windows versions (the LDR entry
grew), so the stride is taken from the file: the one that puts every name in the string pool.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.images.base import Reader

MAX_DRIVERS = 4096
MAX_BLOCKS = 4096
MAX_NAME = 1024
MAX_COPY = 0x1000
"""Bytes kept of each raw structure copy (EPROCESS, ETHREAD, KPRCB): more than any build's size."""


@attrs.frozen
class TriageDriver:
    """One entry of the saved driver list."""

    name: str
    """The file name part of the saved name."""
    path: str
    """The saved name as written (undecodable UTF-16 escaped)."""
    base: int
    size: int


@attrs.frozen(kw_only=True)
class Triage:
    """What a triage dump holds, by file offset or as copied bytes."""

    service_pack_build: int
    drivers: tuple[TriageDriver, ...]
    overflowed: bool
    """TriageOptions says the driver list did not fit (it is cut short)."""
    process: bytes | None
    """The crashing thread's EPROCESS (up to MAX_COPY bytes), or None."""
    thread: bytes | None
    prcb: bytes | None
    kdbg: bytes | None
    """The copy of the KDBG block (DebuggerDataSize bytes), or None."""
    blocks: tuple[tuple[int, int, int], ...]
    """Saved kernel memory: (virtual address, file offset, size), the data page and data blocks."""


_FIELDS = ("ServicePackBuild", "SizeOfDump", "ValidOffset", "ContextOffset", "ExceptionOffset", "MmOffset",
           "UnloadedDriversOffset", "PrcbOffset", "ProcessOffset", "ThreadOffset", "CallStackOffset",
           "SizeOfCallStack", "DriverListOffset", "DriverCount", "StringPoolOffset", "StringPoolSize",
           "BrokenDriverOffset", "TriageOptions")
# After those 18 ULONGs: TopOfStack, (x64: the 16-byte ArchitectureSpecific), DataPageAddress
# (ULONG64 on x64), DataPageOffset, DataPageSize, DebuggerDataOffset, DebuggerDataSize,
# DataBlocksOffset, DataBlocksCount.
_TAIL = {64: ("<QQQQIIIIII", 0x48), 32: ("<IIIIIIII", 0x48)}
_OVERFLOWED = 0x100
# (DllBase, SizeOfImage) offsets in a DUMP_DRIVER_ENTRY: the name offset, the x64 alignment pad,
# then KLDR_DATA_TABLE_ENTRY64 (DllBase 0x30, SizeOfImage 0x40) or ..32 (0x18, 0x20).
_LDR = {64: (0x38, 0x48, "<Q"), 32: (0x1C, 0x24, "<I")}


def parse_triage(r: Reader, bits: int, at: int) -> Triage:
    """The TRIAGE_DUMP at file offset ``at`` and the pieces it points to.

    Raises:
        ImageFormatError: a count beyond its bound, or a piece that lies outside the file.
    """
    f = dict(zip(_FIELDS, r.unpack(struct.Struct(f"<{len(_FIELDS)}I"), at, "triage header")))
    fmt, off = _TAIL[bits]
    tail = r.unpack(struct.Struct(fmt), at + off, "triage header")
    if bits == 64:
        _top, _arch1, _arch2, page_va, page_off, page_size, kd_off, kd_size, blocks_off, n_blocks = tail
    else:
        _top, page_va, page_off, page_size, kd_off, kd_size, blocks_off, n_blocks = tail
    blocks = []
    if page_off and page_size:
        r.need(page_off, page_size, "triage data page")
        blocks.append((page_va, page_off, page_size))
    if blocks_off and n_blocks:
        if n_blocks > MAX_BLOCKS:
            raise r.error(f"absurd DataBlocksCount {n_blocks}", at + off)
        for i in range(n_blocks):
            vaddr, data_off, size = r.unpack(struct.Struct("<QII"), blocks_off + 16 * i, "triage data block")
            r.need(data_off, size, f"triage data block {i}")
            blocks.append((vaddr, data_off, size))
    return Triage(
        service_pack_build=f["ServicePackBuild"], drivers=tuple(_drivers(r, bits, f, at)),
        overflowed=bool(f["TriageOptions"] & _OVERFLOWED), process=_copy(r, f["ProcessOffset"]),
        thread=_copy(r, f["ThreadOffset"]), prcb=_copy(r, f["PrcbOffset"]),
        kdbg=r.bytes(kd_off, kd_size, "triage KDBG copy") if kd_off and kd_size else None, blocks=tuple(blocks))


def _copy(r: Reader, offset: int) -> bytes | None:
    if not offset:
        return None
    r.need(offset, 1, "triage structure copy")
    return bytes(r.buf[offset:min(offset + MAX_COPY, r.size)])


def _drivers(r: Reader, bits: int, f: dict, at: int) -> list[TriageDriver]:
    count, first = f["DriverCount"], f["DriverListOffset"]
    if not count or not first:
        return []
    if count > MAX_DRIVERS:
        raise r.error(f"absurd DriverCount {count}", at + 0x34)
    pool, pool_size = f["StringPoolOffset"], f["StringPoolSize"]
    base_at, size_at, word = _LDR[bits]
    stride = _stride(r, first, count, pool, pool_size, size_at + 4)
    out = []
    for i in range(count):
        entry = first + i * stride
        name_at = r.u32(entry, "driver entry")
        base = struct.unpack(word, r.bytes(entry + base_at, struct.calcsize(word), "driver entry"))[0]
        size = r.u32(entry + size_at, "driver entry")
        length = r.u32(name_at, "driver name")
        if length > MAX_NAME:
            raise r.error(f"driver {i}: absurd name length {length}", name_at)
        path = r.bytes(name_at + 4, length & ~1, "driver name").decode("utf-16-le", "backslashreplace")
        out.append(TriageDriver(path.replace("/", "\\").rsplit("\\", 1)[-1], path, base, size))
    return out


def _stride(r: Reader, first: int, count: int, pool: int, pool_size: int, least: int) -> int:
    """The entry size that puts the most name offsets inside the string pool (the gap from the
    list to the pool first, as Windows writes the pool right after the list)."""
    gap = (pool - first) // count if pool > first else 0
    candidates = ([gap] if least <= gap <= 0x200 else []) + list(range(least + (-least % 4), 0x200, 4))

    def score(stride: int) -> int:
        hits = 0
        for i in range(count):
            entry = first + i * stride
            if entry + 4 > r.size:
                break
            hits += pool <= int.from_bytes(r.buf[entry:entry + 4], "little") < pool + pool_size
        return hits

    best = max(candidates, key=score)  # max keeps the first of equals: the gap
    if score(best) == 0:
        raise r.error("triage driver list: no entry names a string in the string pool", first)
    return best
