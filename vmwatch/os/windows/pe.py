"""PE headers and the export directory of an image in guest memory (hostile-safe).

Theory of operation (Microsoft "PE Format" specification): ``MZ`` at the image base, ``e_lfanew``
at 0x3C points to ``PE\\0\\0``, then the COFF header (Machine, NumberOfSections, TimeDateStamp,
SizeOfOptionalHeader) and the optional header (Magic 0x10B PE32 / 0x20B PE32+, SizeOfImage,
data directories; entry 0 is the export directory). The export directory names the image and
lists AddressOfFunctions / AddressOfNames / AddressOfNameOrdinals, all RVAs from the base.

Everything here is read from memory the guest controls: every count, length and RVA is checked
against the headers' own page and SizeOfImage before it is used, and a bad one is a
:class:`PEFormatError`. Reads go through ``read(vaddr, size)``, so the same code parses an
image by physical address (the kernel scan) or by virtual address (after the DTB is known).
"""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from vmwatch.errors import PEFormatError, VmwatchError

HEADER_PAGE = 0x1000
MAX_IMAGE = 256 << 20
"""No kernel-mode image is this big (ntoskrnl is ~10 MiB); a larger SizeOfImage is corrupt."""
MAX_EXPORTS = 1 << 16
MAX_NAME = 256
PE32, PE32_PLUS = 0x10B, 0x20B

Read = Callable[[int, int], bytes]


@attrs.frozen
class PEHeaders:
    """What vmwatch uses of an image's headers."""

    base: int
    machine: int
    timestamp: int
    bits: int
    size_of_image: int
    export_rva: int
    export_size: int


@attrs.frozen
class Exports:
    """An image's export directory: its own name and name -> RVA of every named export."""

    name: str
    rvas: dict[str, int]


def parse_headers(read: Read, base: int) -> PEHeaders:
    """Parse the DOS, COFF and optional headers of the image at ``base``.

    Raises:
        PEFormatError: no MZ/PE signature, or headers truncated or absurd.
        VmwatchError: the header page cannot be read.
    """
    page = read(base, HEADER_PAGE)
    if page[:2] != b"MZ":
        raise PEFormatError("no MZ signature", vaddr=base)
    lfanew = struct.unpack_from("<I", page, 0x3C)[0]
    if not 0x40 <= lfanew <= HEADER_PAGE - 0x18 - 2:
        raise PEFormatError(f"e_lfanew {lfanew:#x} outside the header page", vaddr=base)
    if page[lfanew:lfanew + 4] != b"PE\0\0":
        raise PEFormatError(f"no PE signature at +{lfanew:#x}", vaddr=base)
    machine, _sections, timestamp = struct.unpack_from("<HHI", page, lfanew + 4)
    opt_size = struct.unpack_from("<H", page, lfanew + 0x14)[0]
    opt = lfanew + 0x18
    magic = struct.unpack_from("<H", page, opt)[0]
    if magic not in (PE32, PE32_PLUS):
        raise PEFormatError(f"optional header magic {magic:#x} is neither PE32 nor PE32+", vaddr=base)
    count_at, dirs_at = (opt + 108, opt + 112) if magic == PE32_PLUS else (opt + 92, opt + 96)
    if dirs_at + 8 > min(opt + opt_size, HEADER_PAGE):
        raise PEFormatError(f"optional header of {opt_size:#x} bytes is truncated", vaddr=base)
    size_of_image = struct.unpack_from("<I", page, opt + 56)[0]
    if not HEADER_PAGE <= size_of_image <= MAX_IMAGE:
        raise PEFormatError(f"absurd SizeOfImage {size_of_image:#x}", vaddr=base)
    n_dirs = struct.unpack_from("<I", page, count_at)[0]
    export_rva, export_size = struct.unpack_from("<II", page, dirs_at) if n_dirs else (0, 0)
    return PEHeaders(base, machine, timestamp, 64 if magic == PE32_PLUS else 32, size_of_image,
                     export_rva, export_size)


def export_name(read: Read, headers: PEHeaders) -> str:
    """Only the image's own name from its export directory (what the kernel scan checks).

    Raises:
        PEFormatError: no export directory, or its name RVA is outside the image.
    """
    directory = _directory(read, headers)
    return _string(read, headers, struct.unpack_from("<I", directory, 12)[0])


def read_exports(read: Read, headers: PEHeaders) -> Exports:
    """Every named export (forwarders, which point back into the directory, are left out).

    Raises:
        PEFormatError: absurd counts, or tables or names outside the image.
    """
    directory = _directory(read, headers)
    name_rva, _ordinal_base, n_functions, n_names, functions, names, ordinals = struct.unpack_from(
        "<7I", directory, 12)
    if n_functions > MAX_EXPORTS or n_names > n_functions:
        raise PEFormatError(f"absurd export counts: {n_functions} functions, {n_names} names", vaddr=headers.base)
    function_table = _table(read, headers, functions, 4 * n_functions, "AddressOfFunctions")
    name_table = _table(read, headers, names, 4 * n_names, "AddressOfNames")
    ordinal_table = _table(read, headers, ordinals, 2 * n_names, "AddressOfNameOrdinals")
    name_rvas = struct.unpack_from(f"<{n_names}I", name_table)
    indices = struct.unpack_from(f"<{n_names}H", ordinal_table)
    function_rvas = struct.unpack_from(f"<{n_functions}I", function_table)
    lo, hi = headers.export_rva, headers.export_rva + headers.export_size
    rvas = {}
    for rva, index in zip(name_rvas, indices):
        if index >= n_functions:
            raise PEFormatError(f"export ordinal index {index} past {n_functions} functions", vaddr=headers.base)
        target = function_rvas[index]
        if lo <= target < hi:
            continue
        rvas[_string(read, headers, rva)] = target
    return Exports(_string(read, headers, name_rva), rvas)


def _directory(read: Read, headers: PEHeaders) -> bytes:
    if headers.export_size < 40:
        raise PEFormatError("no export directory", vaddr=headers.base)
    return _table(read, headers, headers.export_rva, 40, "export directory")


def _table(read: Read, headers: PEHeaders, rva: int, size: int, what: str) -> bytes:
    if rva < HEADER_PAGE and size or rva + size > headers.size_of_image:
        raise PEFormatError(f"{what} at RVA {rva:#x} (+{size:#x}) outside the image "
                            f"(SizeOfImage {headers.size_of_image:#x})", vaddr=headers.base)
    return read(headers.base + rva, size) if size else b""


def _string(read: Read, headers: PEHeaders, rva: int) -> str:
    if not HEADER_PAGE <= rva < headers.size_of_image:
        raise PEFormatError(f"name at RVA {rva:#x} outside the image", vaddr=headers.base)
    size = min(MAX_NAME, headers.size_of_image - rva)
    # A name may end just before an unmapped page: read up to the page end first.
    first = min(size, HEADER_PAGE - ((headers.base + rva) & (HEADER_PAGE - 1)))
    raw = read(headers.base + rva, first)
    if b"\0" not in raw and first < size:
        try:
            raw += read(headers.base + rva + first, size - first)
        except VmwatchError:
            pass
    end = raw.find(b"\0")
    if end < 0:
        raise PEFormatError(f"name at RVA {rva:#x} is not NUL-terminated within {size} bytes", vaddr=headers.base)
    return raw[:end].decode("ascii", "backslashreplace")
