"""The x86-64 register file as vmwatch shows it to gdb: a target description and ``g`` packets.

gdb's amd64 support needs the feature ``org.gnu.gdb.i386.core`` with the general registers,
``rip``, ``eflags``, the six segment selectors and the x87 registers (gdb manual, "i386
Features"); ``org.gnu.gdb.i386.segments`` adds ``fs_base``/``gs_base``. The control registers
and KERNEL_GS_BASE, which a kernel debugger wants and gdb has no feature for, go in a feature of
vmwatch's own: gdb lists them (``info registers cr3``) like any other. Registers a dump lacks
(the x87 state) are ``<unavailable>`` (:mod:`vmwatch.gdbserver.regfile`).
"""

from __future__ import annotations

from vmwatch.cpu import GPR_NAMES, SEGMENT_NAMES, Registers
from vmwatch.gdbserver.regfile import RegisterFile

_CORE = ([(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64") for name in GPR_NAMES]
         + [("rip", 64, "code_ptr"), ("eflags", 32, "int32")]
         + [(name, 32, "int32") for name in SEGMENT_NAMES]
         + [(f"st{i}", 80, "i387_ext") for i in range(8)]
         + [(name, 32, "int") for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")])
_SEGMENTS = [("fs_base", 64, "int"), ("gs_base", 64, "int")]
_SYSTEM = [("k_gs_base", 64, "int"), ("cr0", 64, "int"), ("cr2", 64, "int"), ("cr3", 64, "int"),
           ("cr4", 64, "int"), ("cr8", 64, "int"), ("efer", 64, "int")]
FEATURES = (("org.gnu.gdb.i386.core", _CORE), ("org.gnu.gdb.i386.segments", _SEGMENTS),
            ("org.vmwatch.x86.system", _SYSTEM))

_FIELD = {"eflags": "rflags", "k_gs_base": "kernel_gs_base"}


def value_of(regs: Registers, name: str) -> int | None:
    """A register's value by its gdb name, ``None`` when the source does not know it."""
    value = getattr(regs, _FIELD.get(name, name), None)
    if name in SEGMENT_NAMES:
        return None if value is None else value.selector
    return value


FILE = RegisterFile("i386:x86-64", FEATURES, value_of)
LAYOUT = FILE.layout
"""(name, bits, gdb type) in register-number order."""
target_xml = FILE.target_xml
encode_register = FILE.encode_register
encode_registers = FILE.encode_registers
