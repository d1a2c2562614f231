"""Decoding QEMU's gdbstub register views: the ``g`` packet by its target.xml layout, HMP descriptor tables.

x86 keeps everything vmwatch reads in the ``g`` packet. AArch64 does not: QEMU 7.2 sends
``org.gnu.gdb.aarch64.core`` (x0..x30, sp, pc, cpsr: the 268-byte ``g`` packet), then either
``org.gnu.gdb.aarch64.fpu`` or, on SVE CPUs such as ``max``, ``org.gnu.gdb.aarch64.sve``, then
``org.qemu.gdb.arm.sys.regs``: ~200 system registers with explicit regnums, read one ``p`` packet
each and never part of ``g``. Names are QEMU's cpreg names, so a register that AArch32 shares
is called without its ``_EL1`` (``SCTLR``, ``VBAR``). Everything is looked up by name.
"""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from vmwatch.cpu import SEGMENT_NAMES, Registers, Segment
from vmwatch.cpu_aarch64 import SYSTEM_REGISTERS, Aarch64Registers
from vmwatch.errors import ProtocolError
from vmwatch.live.gdbrsp import _proto as p


_G_FIELDS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_G_RENAMED = {"eflags": "rflags", "k_gs_base": "kernel_gs_base"}
_INT_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def g_decoder(layout: dict[str, p.RegisterInfo]) -> Callable[[bytes, int], Registers]:
    """A decoder of ``g`` packets of this layout into :class:`Registers`: one ``struct`` unpack
    of the registers vmwatch knows (a decode per event is on the breakpoint hot path)."""
    wanted = sorted((info.offset, info.size, name) for name, info in layout.items()
                    if (name in _G_FIELDS or name in _G_RENAMED or name in SEGMENT_NAMES) and info.size in _INT_FORMATS)
    fmt, pos, names = "<", 0, []
    for offset, size, name in wanted:
        if offset < pos:
            continue  # overlapping layout entries: keep the first
        fmt += (f"{offset - pos}x" if offset > pos else "") + _INT_FORMATS[size]
        pos = offset + size
        names.append(_G_RENAMED.get(name, name))
    unpacker = struct.Struct(fmt)
    segments = [n for n in names if n in SEGMENT_NAMES]

    def decode(data: bytes, vcpu: int) -> Registers:
        if len(data) >= unpacker.size:
            values: dict[str, object] = dict(zip(names, unpacker.unpack_from(data)))
        else:  # a short packet: what it holds
            values = {}
            for offset, size, name in wanted:
                if offset + size <= len(data):
                    values[_G_RENAMED.get(name, name)] = int.from_bytes(data[offset : offset + size], "little")
        for seg in segments:
            selector = values.get(seg)
            if selector is not None:
                base = values.get("fs_base") if seg == "fs" else values.get("gs_base") if seg == "gs" else 0
                values[seg] = Segment(selector=selector, base=base or 0)
        return Registers(vcpu=vcpu, **values)

    return decode


_A64_CORE = tuple(f"x{i}" for i in range(31)) + ("sp", "pc", "cpsr")
_A64_SHARED_NAMES = {"SCTLR": "sctlr_el1", "VBAR": "vbar_el1"}
"""QEMU names of EL1 registers that AArch32 shares (see the module comment)."""


@attrs.frozen
class Aarch64Layout:
    """Where an AArch64 gdbstub keeps the registers :class:`Aarch64Registers` holds."""

    g_size: int
    """Bytes of the ``g`` packet that hold the core registers."""
    system: tuple[tuple[str, int, int], ...]
    """``(field, regnum, bytes)`` of each system register the stub has, read with ``p``."""
    _unpack: struct.Struct

    @classmethod
    def from_layout(cls, layout: dict[str, p.RegisterInfo]) -> "Aarch64Layout":
        """Raises: ProtocolError: the target description lacks a core register or sizes it oddly."""
        fmt, pos = "<", 0
        for name in _A64_CORE:
            info = layout.get(name)
            want = 4 if name == "cpsr" else 8
            if info is None or info.size != want:
                raise ProtocolError(f"aarch64 target description: core register {name!r} "
                                    f"{'missing' if info is None else f'is {info.bitsize} bits'}")
            if info.offset < pos:
                raise ProtocolError(f"aarch64 target description: {name!r} overlaps the register before it")
            fmt += (f"{info.offset - pos}x" if info.offset > pos else "") + _INT_FORMATS[want]
            pos = info.offset + want
        system = {}
        for name, info in layout.items():
            field = _A64_SHARED_NAMES.get(name) or name.lower()
            # the _EL1 spelling wins when a stub has both
            if field in SYSTEM_REGISTERS and info.size in _INT_FORMATS and (field not in system or name.lower() == field):
                system[field] = (field, info.regnum, info.size)
        return cls(pos, tuple(system[f] for f in SYSTEM_REGISTERS if f in system), struct.Struct(fmt))

    def decode(self, g_data: bytes, system: dict[str, int], vcpu: int) -> Aarch64Registers:
        """Registers from a ``g`` packet (at least :attr:`g_size` bytes) and the ``p`` values read."""
        values = self._unpack.unpack_from(g_data)
        return Aarch64Registers(vcpu=vcpu, x=values[:31], sp=values[31], pc=values[32], pstate=values[33], **system)


def registers_from_g(data: bytes, layout: dict[str, p.RegisterInfo], vcpu: int) -> Registers:
    """Decode a ``g`` packet with the target-description layout into :class:`Registers`."""
    return g_decoder(layout)(data, vcpu)


def parse_descriptor_tables(text: str) -> tuple[int, int, int, int]:
    """GDT and IDT (base, limit) from HMP ``info registers`` (no binary interface has them).

    Raises:
        ProtocolError: the lines are missing.
    """
    found: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition("=")
        if sep and key.strip() in ("GDT", "IDT"):
            fields = rest.split()
            try:
                found[key.strip()] = (int(fields[0], 16), int(fields[1], 16))
            except (IndexError, ValueError):
                raise ProtocolError(f"unreadable {key.strip()} line in 'info registers': {line!r}") from None
    if len(found) != 2:
        raise ProtocolError("'info registers' shows no GDT/IDT lines")
    return (*found["GDT"], *found["IDT"])


def with_descriptors(regs: Registers, desc: tuple[int, int, int, int]) -> Registers:
    """``regs`` with the GDT and IDT (base, limit) of :func:`parse_descriptor_tables`."""
    return attrs.evolve(regs, gdtr_base=desc[0], gdtr_limit=desc[1], idtr_base=desc[2], idtr_limit=desc[3])
