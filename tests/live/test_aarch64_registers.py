"""AArch64 registers from a gdbstub's target description, shaped as QEMU 7.2 sends it (measured)."""

from __future__ import annotations

import struct

import pytest

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import ProtocolError, RemoteProtocolError
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.qemu_registers import Aarch64Layout

# QEMU 7.2 -cpu max: target.xml includes the core, SVE and system-register features; the system
# registers carry explicit regnums and QEMU's cpreg names (VBAR, SCTLR without _EL1).
TARGET = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>aarch64'
          b'</architecture><xi:include href="aarch64-core.xml"/><xi:include href="sys.xml"/></target>')
CORE = (b'<feature name="org.gnu.gdb.aarch64.core">'
        + b"".join(b'<reg name="x%d" bitsize="64"/>' % i for i in range(31))
        + b'<reg name="sp" bitsize="64" type="data_ptr"/><!-- <reg name="bogus" bitsize="64"/> -->'
          b'<reg name="pc" bitsize="64" type="code_ptr"/><reg name="cpsr" bitsize="32"/></feature>')
SYS = (b'<feature name="org.qemu.gdb.arm.sys.regs"><reg name="ID_MMFR5" bitsize="64" regnum="86"/>'
       b'<reg name="SCTLR" bitsize="64" regnum="92"/><reg name="VBAR" bitsize="64" regnum="124"/>'
       b'<reg name="SP_EL0" bitsize="64" regnum="138"/><reg name="TTBR0_EL1" bitsize="64" regnum="171"/>'
       b'<reg name="TCR_EL1" bitsize="64" regnum="174"/><reg name="TTBR1_EL1" bitsize="64" regnum="175"/>'
       b'<reg name="SPSR_IRQ" bitsize="64" regnum="223"/></feature>')


def layout(**docs: bytes) -> dict[str, p.RegisterInfo]:
    found = {"target.xml": TARGET, "aarch64-core.xml": CORE, "sys.xml": SYS, **docs}
    return {r.name: r for r in p.register_layout(found.__getitem__)}


class TestTargetArchitecture:
    def test_names(self) -> None:
        """The <architecture> element names the guest's ISA; a document without one says None."""
        assert p.target_architecture(TARGET) == "aarch64"
        assert p.target_architecture(b"<target><architecture> i386:x86-64 </architecture></target>") == "i386:x86-64"
        assert p.target_architecture(b'<target><xi:include href="a.xml"/></target>') is None

    @pytest.mark.parametrize("doc", [b"<target><architecture>aarch64", b"\xff\xfe", b""])
    def test_bad_documents(self, doc: bytes) -> None:
        """A broken target.xml is a protocol error, not an XML traceback."""
        with pytest.raises(RemoteProtocolError):
            p.target_architecture(doc)


class TestAarch64Layout:
    def test_core_and_system_registers(self) -> None:
        """g holds x0..x30, sp, pc, cpsr (268 bytes); system registers come by regnum, VBAR as vbar_el1."""
        a64 = Aarch64Layout.from_layout(layout())
        assert a64.g_size == 268
        assert a64.system == (("sp_el0", 138, 8), ("ttbr0_el1", 171, 8), ("ttbr1_el1", 175, 8),
                              ("tcr_el1", 174, 8), ("sctlr_el1", 92, 8), ("vbar_el1", 124, 8))

    def test_decode(self) -> None:
        """A g packet decodes by offsets; the p values land in their fields; EL comes from PSTATE."""
        a64 = Aarch64Layout.from_layout(layout())
        g = struct.pack("<33QI", *range(100, 131), 0xFFFF800000001000, 0xFFFF800008000000, 0x404000C5)
        regs = a64.decode(g + b"\0" * 16, {"ttbr1_el1": 0x41858001, "tcr_el1": 0x15001F5B5503510}, vcpu=2)
        assert regs == Aarch64Registers(vcpu=2, x=tuple(range(100, 131)), sp=0xFFFF800000001000,
                                        pc=0xFFFF800008000000, pstate=0x404000C5, ttbr1_el1=0x41858001,
                                        tcr_el1=0x15001F5B5503510)
        assert regs.el == 1 and regs.lr == 130 and regs.fp == 129
        flat = regs.as_dict()
        assert flat["x30"] == 130 and flat["el"] == 1 and "ttbr0_el1" not in flat

    def test_el1_spelling_wins(self) -> None:
        """A stub that sends both VBAR and VBAR_EL1 is read at VBAR_EL1."""
        sys = SYS.replace(b"</feature>", b'<reg name="VBAR_EL1" bitsize="64" regnum="300"/></feature>')
        assert ("vbar_el1", 300, 8) in Aarch64Layout.from_layout(layout(**{"sys.xml": sys})).system

    @pytest.mark.parametrize(("core", "why"), [
        (CORE.replace(b'<reg name="cpsr" bitsize="32"/>', b""), "'cpsr' missing"),
        (CORE.replace(b'name="pc" bitsize="64"', b'name="pc" bitsize="32"'), "'pc' is 32 bits"),
        (CORE.replace(b'<reg name="x7" bitsize="64"/>', b'<reg name="x7" bitsize="64" regnum="3"/>'), "overlaps"),
    ])
    def test_hostile_core(self, core: bytes, why: str) -> None:
        """A core feature without a register, with an odd size or renumbered over another is refused by name."""
        with pytest.raises(ProtocolError, match=why):
            Aarch64Layout.from_layout(layout(**{"aarch64-core.xml": core}))

    def test_system_registers_optional(self) -> None:
        """A stub without the system-register feature (QEMU before 7.1) still gives the core registers."""
        target = TARGET.replace(b'<xi:include href="sys.xml"/>', b"")
        a64 = Aarch64Layout.from_layout(layout(**{"target.xml": target}))
        assert a64.system == () and a64.g_size == 268
