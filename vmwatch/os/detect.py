"""Which OS a guest runs: Linux or Windows, found from memory with no flag."""

from __future__ import annotations

from vmwatch.errors import KernelNotFound, SymbolError, VmwatchError


def from_memory(phys, registers=(), symbols_file: str | None = None):
    """The ``Linux`` or ``Windows`` kernel in ``phys``.

    A Windows crash dump is Windows; otherwise Linux is tried first (its zero-config search),
    then Windows. When neither finds a kernel, the Linux error is raised with the Windows one
    added; a Windows kernel that was found but cannot be used raises its own error.

    Raises:
        SymbolError: no usable kernel of either OS.
    """
    from vmwatch.cpu_aarch64 import refuse_aarch64
    from vmwatch.os.linux.kernel import Linux
    from vmwatch.os.windows.kernel import Windows

    refuse_aarch64(registers, "finding the kernel")
    if getattr(phys, "format", None) == "windows-crashdump":
        return Windows.from_memory(phys, registers, symbols_file)
    try:
        return Linux.from_memory(phys, registers, symbols_file=symbols_file)
    except VmwatchError as linux_error:
        try:
            return Windows.from_memory(phys, registers, symbols_file)
        except KernelNotFound as windows_error:
            raise SymbolError(f"{linux_error}; and not Windows: {windows_error}") from linux_error
