"""Which OS a guest runs: Linux or Windows, found from memory with no flag."""

from __future__ import annotations

from vmwatch.errors import KernelNotFound, SymbolError, VmwatchError

_WINDOWS_KERNEL_SLOT = 0xFFFFF800_00000000 >> 39
"""The top-level page-table slot (with the sign bits) that holds x64 Windows' kernel image."""
_WINDOWS_X86_KERNEL = range(0x80000000, 0xC0000000)
"""Where x86 Windows loads ntoskrnl (system space from 2 GiB); i386 Linux's text is at 3 GiB and up."""

def from_memory(phys, registers=(), symbols_file: str | None = None):
    """The ``Linux`` or ``Windows`` kernel in ``phys``.

    A Windows crash dump is Windows. Otherwise a cheap probe picks which OS to try first (the
    other is tried if it fails): memory read through a mapping (an image, a shared RAM file) is
    searched for an ntoskrnl image (one strided pass over the first bytes of every page: 0.05 s
    on 5 GiB, where Linux's zero-config search without CPU state reads all of memory: 23 s);
    else (a gdbstub), with CPU state, IDT vector 0's handler in Windows x64's kernel range
    (0xfffff800'00000000, PML4 slot 0x1f0; Linux's text is in slot 0x1ff), or on a 32-bit CPU
    between 2 and 3 GiB (i386 Linux's text is above 3 GiB), says Windows. Else
    Linux is tried first. When neither finds a kernel, the first error is raised with the second
    added; a Windows kernel that was found but cannot be used raises its own error.

    Raises:
        SymbolError: no usable kernel of either OS.
    """
    from vmwatch.os.linux.arm64 import is_arm64
    from vmwatch.os.linux.kernel import Linux
    from vmwatch.os.windows.kernel import Windows

    if is_arm64(phys, registers):
        return Linux.from_memory(phys, registers, symbols_file=symbols_file)  # no arm64 Windows here
    if getattr(phys, "format", None) == "windows-crashdump":
        return Windows.from_memory(phys, registers, symbols_file)
    if _looks_windows(phys, registers):
        try:
            return Windows.from_memory(phys, registers, symbols_file)
        except VmwatchError as windows_error:  # a stray ntoskrnl file in a Linux guest's page cache
            try:
                return Linux.from_memory(phys, registers, symbols_file=symbols_file)
            except VmwatchError:
                raise windows_error from None
    try:
        return Linux.from_memory(phys, registers, symbols_file=symbols_file)
    except VmwatchError as linux_error:
        try:
            return Windows.from_memory(phys, registers, symbols_file)
        except KernelNotFound as windows_error:
            raise SymbolError(f"{linux_error}; and not Windows: {windows_error}") from linux_error

def _looks_windows(phys, registers) -> bool:
    """Whether a cheap look says Windows (never a slow read of all memory)."""
    from vmwatch.memory import GuestMemory
    from vmwatch.os.windows import locate

    try:
        if getattr(phys, "view", None) is not None:
            locate.physical_kernel(phys)
            return True
        paging = locate.cpu_paging(registers)
        idtr = next((r.idtr_base for r in registers if r is not None and getattr(r, "idtr_base", None)), None)
        if paging is None or not idtr:
            return False
        memory = GuestMemory(phys, cr3=paging[0], mode=paging[1])
        handler = locate.vector0_handler(memory, idtr)
    except VmwatchError:
        return False
    if memory.pointer_size == 4:
        return handler in _WINDOWS_X86_KERNEL
    return handler >> 39 == _WINDOWS_KERNEL_SLOT
