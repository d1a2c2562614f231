"""Which OS a guest runs: Linux or Windows, found from memory with no flag."""

from __future__ import annotations

from vmwatch.errors import KernelNotFound, SymbolError, VmwatchError


def from_memory(phys, registers=(), symbols_file: str | None = None):
    """The ``Linux`` or ``Windows`` kernel in ``phys``.

    A Windows crash dump is Windows. Memory read through a mapping (an image file, a shared RAM
    file) is first probed for an ntoskrnl image (one strided pass over the first bytes of every
    page: 0.05 s on 5 GiB), as Linux's zero-config search without CPU state reads all of memory
    (23 s on 5 GiB); a probe that finds one tries Windows first. Otherwise Linux is tried first,
    then Windows. When neither finds a kernel, the first error is raised with the second added;
    a Windows kernel that was found but cannot be used raises its own error.

    Raises:
        SymbolError: no usable kernel of either OS.
    """
    from vmwatch.cpu_aarch64 import refuse_aarch64
    from vmwatch.os.linux.kernel import Linux
    from vmwatch.os.windows.kernel import Windows

    refuse_aarch64(registers, "finding the kernel")
    if getattr(phys, "format", None) == "windows-crashdump":
        return Windows.from_memory(phys, registers, symbols_file)
    if _has_ntoskrnl(phys):
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


def _has_ntoskrnl(phys) -> bool:
    """Whether mapped memory holds an ntoskrnl image (False without a mapping: no slow probe)."""
    from vmwatch.os.windows import locate

    if getattr(phys, "view", None) is None:
        return False
    try:
        locate.physical_kernel(phys)
    except VmwatchError:
        return False
    return True
