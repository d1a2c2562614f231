"""AArch64 registers from a gdbstub: target descriptions shaped as QEMU 7.2 sends them (measured), and a scripted stub."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import ProtocolError, RemoteProtocolError
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import GdbConnection
from vmwatch.live.qemu import QemuVM
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


class ScriptedStub:
    """The far end of a memory stream answering ``Hg``, ``g`` and ``p`` as a QEMU aarch64 stub would."""

    def __init__(self, stream, g: bytes, registers: dict[int, bytes]) -> None:
        self.stream, self.g, self.registers = stream, g, registers

    def answer(self, packet: bytes) -> bytes:
        if packet.startswith(b"H"):
            return b"OK"
        if packet == b"g":
            return self.g.hex().encode()
        value = self.registers.get(int(packet[1:], 16))
        return b"E14" if value is None else value.hex().encode()

    async def serve(self) -> None:
        buf = b""
        while data := await self.stream.receive_some():
            buf += data
            while (start := buf.find(b"$")) >= 0 and (end := buf.find(b"#", start)) >= 0 and len(buf) >= end + 3:
                packet, buf = buf[start + 1:end], buf[end + 3:]
                await self.stream.send_all(b"+" + p.frame(self.answer(packet)))


async def vm_with_stub(nursery, g: bytes, registers: dict[int, bytes], **docs: bytes) -> QemuVM:
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(ScriptedStub(theirs, g, registers).serve)
    return QemuVM(None, GdbConnection(ours), layout=list(layout(**docs).values()), threads=[p.ThreadId(1, 1)],
                  gdb_path="fake", arch="aarch64")


class TestLiveRead:
    async def test_refused_system_register_stays_unknown(self) -> None:
        """A stub answering E14 (or a wrong width) for a system register leaves only that field None."""
        g = struct.pack("<33QI", *range(31), 0xFFFF800000002000, 0xFFFF800008000004, 0x3C5)
        sysregs = {138: (0xFFFF000001230000).to_bytes(8, "little"), 174: (0x10).to_bytes(8, "little"),
                   175: b"\x01\x02"}  # TTBR1 two bytes wide: refused too; TTBR0 (171) an error
        async with trio.open_nursery() as nursery:
            vm = await vm_with_stub(nursery, g, sysregs)
            regs = await vm.registers()
            nursery.cancel_scope.cancel()
        assert regs.pc == 0xFFFF800008000004 and regs.x == tuple(range(31)) and regs.el == 1
        assert regs.sp_el0 == 0xFFFF000001230000 and regs.tcr_el1 == 0x10
        assert regs.ttbr0_el1 is None and regs.ttbr1_el1 is None and regs.vbar_el1 is None

    async def test_stub_without_system_registers(self) -> None:
        """With no system-register feature the core registers still come, the rest stays None."""
        g = struct.pack("<33QI", *range(31), 1, 2, 0x3C5)
        async with trio.open_nursery() as nursery:
            target = TARGET.replace(b'<xi:include href="sys.xml"/>', b"")
            vm = await vm_with_stub(nursery, g, {}, **{"target.xml": target})
            regs = await vm.registers()
            nursery.cancel_scope.cancel()
        assert (regs.sp, regs.pc, regs.el) == (1, 2, 1) and regs.ttbr1_el1 is None and regs.tcr_el1 is None

    async def test_short_g_packet_is_a_protocol_error(self) -> None:
        """A g packet shorter than the core registers is refused with both sizes named."""
        async with trio.open_nursery() as nursery:
            vm = await vm_with_stub(nursery, b"\0" * 100, {})
            with pytest.raises(ProtocolError, match="100 bytes, expected 268"):
                await vm.registers()
            nursery.cancel_scope.cancel()
