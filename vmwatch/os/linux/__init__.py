"""Linux guests with zero configuration: kallsyms and BTF from the kernel's own memory.

``Linux.from_memory(phys, registers)`` is the entry point (vmwatch/os/linux/kernel.py).
"""


def __getattr__(name: str):
    if name == "Linux":
        from vmwatch.os.linux.kernel import Linux

        return Linux
    raise AttributeError(name)
