"""Find ntoskrnl and the kernel page tables in memory (LibVMI's order, seed 004).

1. Kernel base, physical: scan physical memory upward for page-aligned ``MZ`` images whose PE
   export directory names ntoskrnl.exe / ntkrnlpa.exe / ntkrnlmp.exe (the image is read as if
   physically contiguous from its header page, as the boot loader lays it out).
2. Kernel base, virtual: with CPU state, take an IDT handler (IDTR) and scan down page by page
   to the ``MZ`` header of the image holding it; unmapped pages are stepped over.
3. DTB: CR3 of a vCPU, a crash dump's DirectoryTableBase, or a scan for the System EPROCESS:
   ``System`` at the profile's ImageFileName offset whose DirectoryTableBase translates the
   kernel's virtual base to its physical one.
"""

from __future__ import annotations

import struct

import structlog

from vmwatch.cpu import PagingMode
from vmwatch.errors import KernelNotFound, SymbolError, VmwatchError
from vmwatch.os.windows import pe
from vmwatch.os.windows.scan import find_all, page_signatures

log = structlog.get_logger()

KERNEL_NAMES = ("ntoskrnl.exe", "ntkrnlpa.exe", "ntkrnlmp.exe", "ntkrpamp.exe")
IDT_SCAN_LIMIT = 32 << 20
"""ntoskrnl is < 16 MiB: an IDT handler further than this above an MZ page is not in it."""
MAX_REJECTED = 64
_CR3_MASK = 0x000FFFFFFFFFF000


def is_kernel(read, base: int) -> pe.PEHeaders | None:
    """The headers of the image at ``base`` if it is ntoskrnl, else None (bad PE data too)."""
    try:
        headers = pe.parse_headers(read, base)
        name = pe.export_name(read, headers)
    except VmwatchError:
        return None
    return headers if name.lower() in KERNEL_NAMES else None


def physical_kernel(phys) -> tuple[int, pe.PEHeaders, int]:
    """Lowest physical address of an ntoskrnl image; returns (paddr, headers, MZ pages tried).

    Raises:
        KernelNotFound: no page-aligned MZ image in memory exports as ntoskrnl.
    """
    tried = 0
    for paddr in page_signatures(phys, b"MZ"):
        tried += 1
        headers = is_kernel(lambda a, n: phys.read(a, n, pad=True), paddr)
        if headers is not None:
            return paddr, headers, tried
    raise KernelNotFound(f"no ntoskrnl image in physical memory ({tried} MZ pages looked at)")


def idt_kernel(memory, idtr_base: int) -> tuple[int, int]:
    """Virtual base of ntoskrnl scanned down from the handler of IDT vector 0; (base, handler).

    Raises:
        SymbolError: the gate is unreadable or no ntoskrnl header lies within 32 MiB below it.
    """
    try:
        low, _sel, _ist, mid, high = struct.unpack("<HHHHI", memory.read(idtr_base, 12))
    except VmwatchError as exc:
        raise SymbolError(f"IDT at {idtr_base:#x} unreadable: {exc}") from None
    handler = low | mid << 16 | high << 32
    page = handler & ~0xFFF
    for _ in range(IDT_SCAN_LIMIT // 0x1000):
        try:
            head = memory.read(page, 2)
        except VmwatchError:
            head = b""
        if head == b"MZ" and is_kernel(memory.read, page) is not None:
            return page, handler
        page -= 0x1000
    raise SymbolError(f"no ntoskrnl image within {IDT_SCAN_LIMIT >> 20} MiB below IDT handler {handler:#x}")


def cr3_of(registers) -> int | None:
    """The kernel page-table root of the first vCPU in 4-level paging (PCID bits cleared)."""
    for regs in registers:
        if regs is None or regs.cr3 is None:
            continue
        if regs.cr0 is not None and regs.paging_mode is not PagingMode.LEVEL4:
            continue
        return regs.cr3 & _CR3_MASK
    return None


def system_process_dtb(phys, profile, kernel_vaddr: int, kernel_paddr: int) -> tuple[int, int]:
    """DTB from the System EPROCESS found by scanning; returns (dtb, EPROCESS paddr).

    Raises:
        SymbolError: no ``System`` EPROCESS whose DirectoryTableBase maps the kernel.
    """
    from vmwatch.memory import GuestMemory

    name_off = profile.eprocess["ImageFileName"]
    dtb_off = profile.eprocess["DirectoryTableBase"]
    if dtb_off is None:
        raise SymbolError("the profile has no DirectoryTableBase offset to scan for the System process")
    tried = 0
    for hit in find_all(phys, b"System\0", 1, name_off % 8):
        eprocess = hit - name_off
        if eprocess < 0:
            continue
        tried += 1
        if tried > 4096:
            break
        try:
            dtb = struct.unpack("<Q", phys.read(eprocess + dtb_off, 8))[0] & _CR3_MASK
            if dtb and GuestMemory(phys, cr3=dtb, mode=PagingMode.LEVEL4).translate(kernel_vaddr) == kernel_paddr:
                return dtb, eprocess
        except VmwatchError:
            continue
    raise SymbolError(f"no System EPROCESS whose DirectoryTableBase maps the kernel ({tried} candidates)")
