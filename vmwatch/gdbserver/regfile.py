"""A register file as gdb is shown it: a target description and ``g``/``p`` replies, for any architecture.

An architecture module (``amd64``, ``aarch64``) gives the features (gdb's names, sizes and types, in
register-number order) and how to find each register's value in vmwatch's register type. A
register the source does not know is sent as ``xx`` bytes, which gdb shows as ``<unavailable>``:
never a made-up zero.
"""

from __future__ import annotations

from typing import Any, Callable

Feature = tuple[str, list[tuple[str, int, str]]]
"""(feature name, [(register name, bits, gdb type)])."""


class RegisterFile:
    def __init__(self, architecture: str, features: tuple[Feature, ...],
                 value_of: Callable[[Any, str], int | None]) -> None:
        self.architecture = architecture
        self.features = features
        self.layout = [reg for _, regs in features for reg in regs]
        """(name, bits, gdb type) in register-number order."""
        self.value_of = value_of

    def target_xml(self) -> bytes:
        """The target description gdb reads with ``qXfer:features:read:target.xml``."""
        parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
                 f"<architecture>{self.architecture}</architecture>"]
        for feature, regs in self.features:
            parts.append(f'<feature name="{feature}">')
            parts += [f'<reg name="{name}" bitsize="{bits}" type="{kind}"/>' for name, bits, kind in regs]
            parts.append("</feature>")
        parts.append("</target>")
        return "".join(parts).encode()

    def encode_register(self, regs: Any, regnum: int) -> bytes:
        """One register as ``p`` answers it: little-endian hex, ``xx`` per unknown byte."""
        name, bits, _ = self.layout[regnum]
        value = self.value_of(regs, name)
        size = bits // 8
        if value is None:
            return b"xx" * size
        return (value & ((1 << bits) - 1)).to_bytes(size, "little").hex().encode()

    def encode_registers(self, regs: Any) -> bytes:
        """The ``g`` reply: every register of the layout in order."""
        return b"".join(self.encode_register(regs, i) for i in range(len(self.layout)))
