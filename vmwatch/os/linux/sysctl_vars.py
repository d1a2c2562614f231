"""The kernel variables behind /proc/sys entries, from the kernel's own ``ctl_table`` entries.

For kernels whose kallsyms names no data (arm64 Debian, ``CONFIG_KALLSYMS_ALL`` off): every sysctl
is a ``struct ctl_table`` in the image's data, ``{procname, data, maxlen, mode, ...}``, whose
``procname`` points at its name in the read-only data. The name is found (NUL on both sides), then
the entries that point at it; ``data`` is the variable, accepted when the entry's ``maxlen`` and
``mode`` are a sysctl's and ``data`` lies in the image. One search of the image (~0.3 s on the lab
guest), done the first time one of these variables is asked for, never for ``ps``.
"""

from __future__ import annotations

import struct
from typing import Callable

from vmwatch.os.linux.kallsyms import Symbols
from vmwatch.os.linux.objects import StructReader

SYSCTL_DATA = {
    "kptr_restrict": "kptr_restrict", "dmesg_restrict": "dmesg_restrict", "modules_disabled": "modules_disabled",
    "randomize_va_space": "randomize_va_space", "perf_event_paranoid": "sysctl_perf_event_paranoid",
    "kexec_load_disabled": "kexec_load_disabled", "unprivileged_bpf_disabled": "sysctl_unprivileged_bpf_disabled",
    "ptrace_scope": "ptrace_scope", "mmap_min_addr": "dac_mmap_min_addr", "modprobe": "modprobe_path",
    "core_pattern": "core_pattern",
}
"""procname -> the kernel variable its entry's ``data`` points at (as the kernel's source names it)."""
IMAGE_SPAN = 96 << 20
"""Bytes of the kernel image searched from ``_text`` (text, read-only data and data: ~45 MiB on 6.1)."""
_MODE_BITS = 0o777


def find_sysctl_variables(read: Callable[[int, int], bytes], text_paddr: int, text_vaddr: int, span: int,
                          types) -> dict[str, int]:
    """``{variable: address}`` for the SYSCTL_DATA entries found in ``span`` bytes of image from ``text_paddr``."""
    table = StructReader(types, "ctl_table")
    data_at, maxlen_at, mode_at = table.offset("data"), table.offset("maxlen"), table.offset("mode")
    image = read(text_paddr, span)
    end = text_vaddr + span
    found: dict[str, int] = {}
    for procname, variable in SYSCTL_DATA.items():
        at = image.find(b"\0" + procname.encode() + b"\0")
        while at >= 0 and variable not in found:
            pointer = struct.pack("<Q", text_vaddr + at + 1)
            entry = image.find(pointer)
            while entry >= 0 and entry + table.size <= len(image):
                data = int.from_bytes(image[entry + data_at:entry + data_at + 8], "little")
                maxlen = int.from_bytes(image[entry + maxlen_at:entry + maxlen_at + 4], "little", signed=True)
                mode = int.from_bytes(image[entry + mode_at:entry + mode_at + 2], "little")
                if text_vaddr <= data < end and 0 < maxlen <= 4096 and mode & _MODE_BITS and not mode & ~_MODE_BITS:
                    found[variable] = data
                    break
                entry = image.find(pointer, entry + 1)
            at = image.find(b"\0" + procname.encode() + b"\0", at + 1)
    return found


class SymbolsWithSysctls(Symbols):
    """kallsyms plus the SYSCTL_DATA variables, searched for the first time one of them is asked for."""

    def __init__(self, names, addresses, types: str, find: Callable[[], dict[str, int]]) -> None:
        super().__init__(names, addresses, types)
        self._find = find
        self._sysctls: dict[str, int] | None = None

    def _sysctl(self, name: str) -> int | None:
        if name not in SYSCTL_DATA.values():
            return None
        if self._sysctls is None:
            self._sysctls = self._find()
        return self._sysctls.get(name)

    def __contains__(self, name: str) -> bool:
        return super().__contains__(name) or self._sysctl(name) is not None

    def get(self, name: str) -> int | None:
        address = super().get(name)
        return address if address is not None else self._sysctl(name)

    def __getitem__(self, name: str) -> int:
        address = self.get(name)
        return super().__getitem__(name) if address is None else address

    def type_of(self, name: str) -> str:
        return "D" if not super().__contains__(name) and self._sysctl(name) is not None else super().type_of(name)
