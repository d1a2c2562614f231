"""Decoding QEMU's gdbstub register views: the ``g`` packet by its target.xml layout, HMP descriptor tables."""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from vmwatch.cpu import SEGMENT_NAMES, Registers, Segment
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
