"""LiME images: repeated [32-byte range header + data] to the end of the file.

Source: LiME ``doc/README.md`` (and Volatility 3 ``layers/lime.py``). Header: magic u32
0x4C694D45 (``EMiL`` on disk), version u32 == 1, s_addr u64, e_addr u64 (**inclusive**), 8
reserved bytes. We reject other versions, big-endian magic, and ranges that go backwards.
"""

from __future__ import annotations

import os
import struct

from vmwatch.images.base import Image, Reader, Run, map_file

MAGIC = 0x4C694D45
MAGIC_BYTES = struct.pack("<I", MAGIC)  # b"EMiL"
MAGIC_BYTES_BE = struct.pack(">I", MAGIC)  # b"LiME": a big-endian writer we do not read
_HEADER = struct.Struct("<IIQQ8s")


class LimeImage(Image):
    """A LiME dump; each range header becomes one run."""

    format = "lime"

    def __init__(self, path: str | os.PathLike) -> None:
        data, size = map_file(path)
        try:
            runs = parse_ranges(Reader(data, str(path)))
        except BaseException:
            data.close()
            raise
        super().__init__(path, data=data, runs=runs, metadata={"ranges": len(runs)})

    def summary(self) -> list[tuple[str, str]]:
        return [("Magic", f"{MAGIC:#x} (EMiL)"), ("Version", "1"), ("Ranges", str(len(self.runs)))]


def parse_ranges(r: Reader) -> list[Run]:
    """Walk the range headers; every byte of the file must belong to a header or its data."""
    runs: list[Run] = []
    offset = 0
    prev_end = 0
    while offset < r.size:
        magic, version, s_addr, e_addr, _ = r.unpack(_HEADER, offset, "LiME range header")
        if magic != MAGIC:
            if struct.pack("<I", magic) == MAGIC_BYTES_BE:
                raise r.error("big-endian LiME header: not supported", offset)
            raise r.error(f"bad LiME magic {magic:#x} (expected {MAGIC:#x})", offset)
        if version != 1:
            raise r.error(f"unsupported LiME version {version}", offset)
        if e_addr < s_addr:
            raise r.error(f"LiME range ends ({e_addr:#x}) before it starts ({s_addr:#x})", offset)
        if s_addr < prev_end:
            raise r.error(f"LiME range at {s_addr:#x} goes backwards (previous ended at {prev_end:#x})", offset)
        length = e_addr - s_addr + 1
        data_offset = offset + _HEADER.size
        r.need(data_offset, length, f"LiME range {s_addr:#x}-{e_addr:#x}")
        runs.append(Run(s_addr, length, data_offset))
        prev_end = s_addr + length
        offset = data_offset + length
    return runs
