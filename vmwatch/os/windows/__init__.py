"""Windows guests, found the way LibVMI finds them: kernel base, KDBG, exports, DTB, lists.

``Windows.from_memory(phys, registers)`` is the entry point (vmwatch/os/windows/kernel.py).
"""


def __getattr__(name: str):
    if name == "Windows":
        from vmwatch.os.windows.kernel import Windows

        return Windows
    raise AttributeError(name)
