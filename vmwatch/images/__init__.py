"""Memory-image formats: detection by content and one reader per format.

``open_image(path)`` looks at the first bytes (never the file name) and returns an
:class:`Image`: sorted physical runs, zero-copy reads, saved vCPUs, metadata.
"""

from __future__ import annotations

import os

from vmwatch.errors import ImageFormatError
from vmwatch.images.base import Image as Image
from vmwatch.images.base import Run as Run

# Formats we recognise but do not read: (magic at offset 0, what to tell the user).
_REJECTED = (
    (b"makedumpfile", "a flattened kdump (makedumpfile) file: rearrange it with "
                      "'makedumpfile -R' and use the ELF output, or dump with QEMU's ELF format"),
    (b"KDUMP   ", "a kdump-compressed file (QEMU kdump-zlib/lzo/snappy): dump in ELF format instead"),
    (b"DISKDUMP", "a diskdump file: dump in ELF format instead"),
)


def open_image(path: str | os.PathLike, *, vmem: str | os.PathLike | None = None) -> Image:
    """Open a memory image of any supported format, detected by its magic.

    Args:
        path: the image (raw, LiME, QEMU or VirtualBox ELF core, VMware .vmss/.vmsn, Windows
            crash dump).
        vmem: for a VMware checkpoint whose RAM lives in another file, that file (default: the
            ``.vmem`` with the same base name).

    Raises:
        ImageFormatError: the file is truncated, malformed, or of a kind vmwatch does not read.
        FileNotFoundError, PermissionError: the file cannot be opened.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(64)
    for magic, why in _REJECTED:
        if head.startswith(magic):
            raise ImageFormatError(f"unsupported image: {why}", path=path)
    magic32 = int.from_bytes(head[:4], "little") if len(head) >= 4 else None
    if head.startswith(b"\x7fELF"):
        from vmwatch.images import vbox

        if len(head) > 6 and head[6] == 0 or _has_vbcore(path):
            return vbox.VBoxImage(path)
        from vmwatch.images.qemu_elf import QemuElfImage

        return QemuElfImage(path)
    if head.startswith(b"EMiL") or head.startswith(b"LiME"):
        from vmwatch.images.lime import LimeImage

        return LimeImage(path)
    if head.startswith(b"PAGEDUMP") or head.startswith(b"PAGEDU64"):
        from vmwatch.images.windows import CrashDumpImage

        return CrashDumpImage(path)
    from vmwatch.images import vmware

    if magic32 in vmware.MAGICS:
        return vmware.VmwareImage(path, vmem=vmem)
    size = os.path.getsize(path)
    if size % 4096:
        raise ImageFormatError(
            f"unknown image format: no known magic (first bytes {head[:8].hex()}), and the size "
            f"{size:#x} is not a whole number of 4 KiB pages as a raw dump would be", path=path)
    from vmwatch.images.raw import RawImage

    return RawImage(path)


def _has_vbcore(path: str) -> bool:
    from vmwatch.images import vbox
    from vmwatch.images.base import Reader, map_file

    data, _ = map_file(path)
    try:
        return vbox.is_vbox_core(Reader(data, path))
    finally:
        data.close()
