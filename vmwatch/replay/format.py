"""The recording file format, version 1 (the full spec is docs/recording-format.md).

Theory of operation: a recording is a header then a flat stream of self-delimiting records,
each ``type:u8 | length:u32 | payload | crc32:u32`` (little-endian; the CRC covers type, length
and payload). One writer appends records as the watch runs, so a recording that was cut short is
detected (no END record) rather than misread. Page contents are content-addressed (BLAKE2b-256),
stored once, zstd-compressed, and referred to by their ordinal; per "context" (the setup phase
before the first event, then each event) a READS record maps page frame numbers to ordinals.

Readers reject a newer major version, skip unknown record types >= 0x80 (optional, added by a
newer minor version), and reject unknown types below that.
"""

from __future__ import annotations

import enum
import hashlib
import json
import mmap
import os
import struct
import zlib
from typing import Any, BinaryIO, Iterator

import attrs
import zstandard

from vmwatch.errors import RecordingError

MAGIC = b"VMWREC\r\n"  # \r\n catches text-mode mangling, as PNG's signature does
VERSION_MAJOR = 1
VERSION_MINOR = 2
"""1.1: the engine's periodic ticks are recorded as Tick events with ``periodic`` (1.0 files read as is).
1.2: the overhead governor's verdicts (GOVERN records, optional: 1.1 readers skip them), and
``handled`` in END: the events a watch cut short at its end did not handle are not replayed."""
HEADER = struct.Struct("<8sHHI")  # magic, major, minor, crc32 of the first 12 bytes
RECORD_HEAD = struct.Struct("<BI")
CRC = struct.Struct("<I")
PAGE_SIZE = 4096
PAGE_SHIFT = 12
DIGEST_SIZE = 32
MAX_PAYLOAD = 64 << 20
"""No record is larger; a bigger length field means corruption, not a big record."""
SETUP = -1
"""Context of reads made before the first event (the OS layer finding the kernel, ...)."""
UNMAPPED = 0xFFFFFFFF
"""Page ordinal meaning "the source said this frame is not mapped"."""
READ_ENTRY = struct.Struct("<QI")
READS_HEAD = struct.Struct("<qI")
REGISTERS_HEAD = struct.Struct("<qI")
CLOCK_ENTRY = struct.Struct("<qq")
PAGE_HEAD = struct.Struct("<B32s")
GOVERN = struct.Struct("<qBQdQ")  # context, verdict, hits, cooldown seconds, sample 1 in N
VERDICTS = ("skip", "unhook", "sample")
"""GOVERN verdict codes: a hit sampled out, a trap unhooked, a trap sampled."""
MAX_READS_PER_RECORD = 65536


class RecordType(enum.IntEnum):
    META = 0x01
    PAGE = 0x02
    EVENT = 0x03
    READS = 0x04
    REGISTERS = 0x05
    END = 0x06
    CLOCK = 0x07
    GOVERN = 0x80
    """Optional (>= 0x80): a reader that predates it replays without the live verdicts."""


class PageEncoding(enum.IntEnum):
    RAW = 0
    ZSTD = 1


def page_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The content address of a page: BLAKE2b with a 32-byte digest."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class RecordWriter:
    """Appends framed records to a binary file; knows nothing of events or memory.

    Args:
        stream: a file opened for binary writing, positioned at its start.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        head = struct.pack("<8sHH", MAGIC, VERSION_MAJOR, VERSION_MINOR)
        stream.write(head + CRC.pack(zlib.crc32(head)))
        self.bytes_written = HEADER.size

    def write(self, kind: int, payload: bytes) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"record of {len(payload):#x} bytes is larger than {MAX_PAYLOAD:#x}")
        head = RECORD_HEAD.pack(kind, len(payload))
        crc = zlib.crc32(payload, zlib.crc32(head))
        self._stream.write(head)
        self._stream.write(payload)
        self._stream.write(CRC.pack(crc))
        self.bytes_written += RECORD_HEAD.size + len(payload) + CRC.size

    def write_json(self, kind: int, value: Any) -> None:
        self.write(kind, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


@attrs.frozen
class RawRecord:
    kind: int
    offset: int
    """File offset of the record's type byte."""
    payload: memoryview


def iter_records(data: bytes | mmap.mmap | memoryview, path: str = "") -> Iterator[RawRecord]:
    """Check the header and yield every record with a good CRC, in file order.

    Raises:
        RecordingError: wrong magic, newer major version, a record running past the end of the
            file, an absurd length or a CRC mismatch (each message names the file offset).
    """
    view = memoryview(data)
    size = len(view)
    if size < HEADER.size:
        raise RecordingError(f"{path or 'recording'}: file is {size} bytes, too short for a header")
    magic, major, minor, crc = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise RecordingError(f"{path or 'recording'}: not a vmwatch recording (magic {bytes(magic)!r})")
    if crc != zlib.crc32(view[:12]):
        raise RecordingError(f"{path or 'recording'}: header checksum mismatch at file offset 0x0")
    if major > VERSION_MAJOR:
        raise RecordingError(
            f"{path or 'recording'}: format version {major}.{minor} is newer than this vmwatch reads"
            f" ({VERSION_MAJOR}.x); upgrade vmwatch"
        )
    if major < 1:
        raise RecordingError(f"{path or 'recording'}: unknown format version {major}.{minor}")
    offset = HEADER.size
    while offset < size:
        if size - offset < RECORD_HEAD.size + CRC.size:
            raise RecordingError(f"{path or 'recording'}: truncated record at file offset {offset:#x}")
        kind, length = RECORD_HEAD.unpack_from(view, offset)
        if length > MAX_PAYLOAD:
            raise RecordingError(
                f"{path or 'recording'}: record length {length:#x} at file offset {offset:#x} is absurd"
            )
        end = offset + RECORD_HEAD.size + length
        if end + CRC.size > size:
            raise RecordingError(f"{path or 'recording'}: truncated record at file offset {offset:#x}")
        (crc,) = CRC.unpack_from(view, end)
        if crc != zlib.crc32(view[offset:end]):
            raise RecordingError(f"{path or 'recording'}: checksum mismatch in record at file offset {offset:#x}")
        yield RawRecord(kind, offset, view[offset + RECORD_HEAD.size:end])
        offset = end + CRC.size


def open_mapped(path: str | os.PathLike[str]) -> mmap.mmap | bytes:
    """The whole file, mmap'd read-only (empty files cannot be mapped: they read as b"")."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def decompress_page(decompressor: zstandard.ZstdDecompressor, encoding: int, data: memoryview, where: str) -> bytes:
    """A page's bytes from its stored form; RecordingError if it does not decode to one page."""
    if encoding == PageEncoding.RAW:
        page = bytes(data)
    elif encoding == PageEncoding.ZSTD:
        try:
            page = decompressor.decompress(data, max_output_size=PAGE_SIZE)
        except zstandard.ZstdError as exc:
            raise RecordingError(f"{where}: page does not decompress ({exc})") from None
    else:
        raise RecordingError(f"{where}: unknown page encoding {encoding}")
    if len(page) != PAGE_SIZE:
        raise RecordingError(f"{where}: page decodes to {len(page):#x} bytes, not {PAGE_SIZE:#x}")
    return page
