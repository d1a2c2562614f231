"""The interrupt descriptor table: 256 gates of 16 bytes, 8 on i386 (Intel SDM vol. 3, 6.11 and 6.14.1)."""

from __future__ import annotations

import attrs

GATE_SIZE = 16


@attrs.frozen
class IdtEntry:
    vector: int
    address: int
    symbol: str | None
    present: bool
    selector: int
    gate_type: int
    dpl: int

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def decode_gate(vector: int, raw: bytes, symbols) -> IdtEntry:
    low, selector, ist_type, mid, high = (int.from_bytes(raw[0:2], "little"), int.from_bytes(raw[2:4], "little"),
                                          int.from_bytes(raw[4:6], "little"), int.from_bytes(raw[6:8], "little"),
                                          int.from_bytes(raw[8:12], "little"))
    address = low | mid << 16 | (high << 32 if len(raw) == 16 else 0)
    attrs_byte = ist_type >> 8
    found = symbols.lookup(address) if address else None
    symbol = None
    if found is not None and found[1] < 0x100000:
        symbol = found[0] if found[1] == 0 else f"{found[0]}+{found[1]:#x}"
    return IdtEntry(vector, address, symbol, bool(attrs_byte & 0x80), selector, attrs_byte & 0xF, attrs_byte >> 5 & 3)


def read_idt(linux, registers=None) -> list[IdtEntry]:
    """The IDT at IDTR.base of ``registers`` if given, else at ``idt_table``."""
    base = getattr(registers, "idtr_base", None) if registers is not None else None
    if not base:
        base = linux.symbols["idt_table"]
    size = GATE_SIZE if linux.memory.pointer_size == 8 else 8
    raw = linux.memory.read(base, 256 * size)
    return [decode_gate(v, raw[v * size:(v + 1) * size], linux.symbols) for v in range(256)]
