"""Processes, modules and hooked system calls of a Linux memory image, with no symbol file.

    python examples/inspect_dump.py DUMP        # any format vmwatch reads (QEMU ELF, LiME, raw, ...)

The kernel, its KASLR slide, its symbols (kallsyms) and its types (BTF) are all found in the
image itself.
"""

from __future__ import annotations

import sys

import vmwatch
from vmwatch.os.linux import Linux


def main(path: str) -> None:
    with vmwatch.open_image(path) as image:
        linux = Linux.from_memory(image, image.cpus)
        kernel = linux.kernel
        print(f"{kernel.release}: text at {kernel.text_vaddr:#x} (slide {kernel.slide:#x}), {kernel.mode.value} paging")
        for task in linux.tasks():
            print(f"{task.pid:>6} {task.ppid or 0:>6} {task.uid if task.uid is not None else '-':>5}  {task.comm}")
        print("modules:", ", ".join(m.name for m in linux.modules()) or "(none)")
        hooked = [s for s in linux.syscalls() if not s.in_text]
        print(f"system calls outside kernel text: {len(hooked)}")
        # Cached reads by symbol through the same translation layer the rules use.
        print("jiffies_64 =", linux.memory.u64(linux.symbols["jiffies_64"]))


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except vmwatch.VmwatchError as exc:
        sys.exit(f"error: {exc}")
