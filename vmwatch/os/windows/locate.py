"""Find ntoskrnl and the kernel page tables in memory (LibVMI's order, seed 004).

1. Kernel base, physical: scan physical memory upward for page-aligned ``MZ`` images whose PE
   export directory names ntoskrnl.exe / ntkrnlpa.exe / ntkrnlmp.exe (the image is read as if
   physically contiguous from its header page, as the boot loader lays it out).
2. Kernel base, virtual: with CPU state, take an IDT handler (IDTR) and scan down page by page
   to the ``MZ`` header of the image holding it; unmapped pages are stepped over.
3. DTB: CR3 of a vCPU, a crash dump's DirectoryTableBase, or a scan for the System EPROCESS:
   ``System`` at the profile's ImageFileName offset whose DirectoryTableBase translates the
   kernel's virtual base to its physical one. A 32-bit kernel's root is tried as PAE paging
   first (what x86 Windows uses since XP SP2 wherever the CPU has NX), then as plain 32-bit.
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
ROOT_MASKS = {PagingMode.LEVEL4: _CR3_MASK, PagingMode.PAE: 0xFFFFFFE0, PagingMode.BITS32: 0xFFFFF000}
"""The CR3 bits that address the page-table root in each mode Windows runs in."""
X86_MODES = (PagingMode.PAE, PagingMode.BITS32)


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


def vector0_handler(memory, idtr_base: int) -> int:
    """The handler address of IDT vector 0: a 16-byte gate on x64, an 8-byte one on x86.

    Raises:
        VmwatchError: the gate is unreadable.
    """
    if memory.pointer_size == 4:
        low, _sel, _access, high = struct.unpack("<HHHH", memory.read(idtr_base, 8))
        return low | high << 16
    low, _sel, _ist, mid, high = struct.unpack("<HHHHI", memory.read(idtr_base, 12))
    return low | mid << 16 | high << 32


def idt_kernel(memory, idtr_base: int) -> tuple[int, int]:
    """Virtual base of ntoskrnl scanned down from the handler of IDT vector 0; (base, handler).

    Raises:
        SymbolError: the gate is unreadable or no ntoskrnl header lies within 32 MiB below it.
    """
    try:
        handler = vector0_handler(memory, idtr_base)
    except VmwatchError as exc:
        raise SymbolError(f"IDT at {idtr_base:#x} unreadable: {exc}") from None
    page = handler & ~0xFFF
    for _ in range(IDT_SCAN_LIMIT // 0x1000):
        try:
            head = memory.read(page, 2)
        except VmwatchError:
            head = b""
        if head == b"MZ" and is_kernel(memory.read, page) is not None:
            return page, handler
        page -= 0x1000
        if page < 0:
            break
    raise SymbolError(f"no ntoskrnl image within {IDT_SCAN_LIMIT >> 20} MiB below IDT handler {handler:#x}")


def cpu_paging(registers) -> tuple[int, PagingMode] | None:
    """(root, mode) of the first vCPU with paging on: 4-level (PCID bits cleared), PAE or 32-bit.

    A vCPU whose CR0 is unknown (a dump that saves CR3 alone) is taken as 4-level.
    """
    for regs in registers:
        if regs is None or regs.cr3 is None:
            continue
        mode = PagingMode.LEVEL4 if regs.cr0 is None else regs.paging_mode
        if mode in ROOT_MASKS:
            return regs.cr3 & ROOT_MASKS[mode], mode
    return None


def maps_kernel(phys, dtb: int, modes, kernel_vaddr: int, kernel_paddr: int) -> PagingMode | None:
    """The first of ``modes`` in which root ``dtb`` maps the kernel's virtual base to its physical one."""
    from vmwatch.memory import GuestMemory

    for mode in modes:
        try:
            if GuestMemory(phys, cr3=dtb & ROOT_MASKS[mode], mode=mode).translate(kernel_vaddr) == kernel_paddr:
                return mode
        except VmwatchError:
            continue
    return None


def system_process_dtb(phys, profile, kernel_vaddr: int, kernel_paddr: int) -> tuple[int, int, PagingMode]:
    """DTB from the System EPROCESS found by scanning; returns (dtb, EPROCESS paddr, paging mode).

    Raises:
        SymbolError: no ``System`` EPROCESS whose DirectoryTableBase maps the kernel.
    """
    name_off = profile.eprocess["ImageFileName"]
    dtb_off = profile.eprocess["DirectoryTableBase"]
    if dtb_off is None:
        raise SymbolError("the profile has no DirectoryTableBase offset to scan for the System process")
    wide = profile.bits == 64
    modes = (PagingMode.LEVEL4,) if wide else X86_MODES
    align = 8 if wide else 4  # an EPROCESS starts pool-aligned
    tried = 0
    for hit in find_all(phys, b"System\0", align, name_off % align):
        eprocess = hit - name_off
        if eprocess < 0:
            continue
        tried += 1
        if tried > 4096:
            break
        try:
            raw = phys.read(eprocess + dtb_off, 8 if wide else 4)
        except VmwatchError:
            continue
        dtb = int.from_bytes(raw, "little")
        mode = maps_kernel(phys, dtb, modes, kernel_vaddr, kernel_paddr) if dtb else None
        if mode is not None:
            return dtb & ROOT_MASKS[mode], eprocess, mode
    raise SymbolError(f"no System EPROCESS whose DirectoryTableBase maps the kernel ({tried} candidates)")
