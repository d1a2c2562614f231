"""The AArch64 register file as vmwatch shows it to gdb (``gdb-multiarch``).

gdb's aarch64 support needs the feature ``org.gnu.gdb.aarch64.core``: x0..x30, ``sp``, ``pc`` and a
32-bit ``cpsr`` (gdb manual, "AArch64 Features"); the FP/SIMD feature is optional and left out (no
source of vmwatch's has those registers). The EL1 system registers a kernel debugger wants
(TTBR0/1_EL1, TCR_EL1, SP_EL0: ``current`` in EL1, VBAR_EL1, ...) go in a feature of vmwatch's own,
so ``info registers ttbr1_el1`` works; a dump has none of them (``<unavailable>``).

No ``org.gnu.gdb.aarch64.pauth`` feature: gdb 13 without the FP/SIMD feature fails every backtrace
with it ("not available on integers of more than 8 bytes"), so gdb's own ``bt`` shows return addresses
with their PAC; vmwatch's ``debug`` strips them.
"""

from __future__ import annotations

from vmwatch.cpu_aarch64 import SYSTEM_REGISTERS
from vmwatch.debug.aarch64 import register_value
from vmwatch.gdbserver.regfile import RegisterFile

_CORE = ([(f"x{i}", 64, "int") for i in range(29)] + [("x29", 64, "data_ptr"), ("x30", 64, "code_ptr"),
                                                       ("sp", 64, "data_ptr"), ("pc", 64, "code_ptr"),
                                                       ("cpsr", 32, "int")])
_SYSTEM = [(name, 64, "int") for name in SYSTEM_REGISTERS]
FEATURES = (("org.gnu.gdb.aarch64.core", _CORE), ("org.vmwatch.aarch64.system", _SYSTEM))

FILE = RegisterFile("aarch64", FEATURES, register_value)
