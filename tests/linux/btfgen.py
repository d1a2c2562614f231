"""Build small BTF blobs by hand, the way pahole lays them out, for parser tests."""

from __future__ import annotations

import struct

from vmwatch.os.linux import btf


class BtfBuilder:
    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int(self, name: str, size: int, signed: bool = False) -> int:
        return self._add(name, btf.INT, 0, size, struct.pack("<I", (1 if signed else 0) << 24 | size * 8))

    def ptr(self, target: int) -> int:
        return self._add("", btf.PTR, 0, target)

    def typedef(self, name: str, target: int) -> int:
        return self._add(name, btf.TYPEDEF, 0, target)

    def const(self, target: int) -> int:
        return self._add("", btf.CONST, 0, target)

    def volatile(self, target: int) -> int:
        return self._add("", btf.VOLATILE, 0, target)

    def array(self, elem: int, index: int, count: int) -> int:
        return self._add("", btf.ARRAY, 0, 0, struct.pack("<III", elem, index, count))

    def struct(self, name: str, size: int, members, *, union: bool = False, bitfields: bool = False) -> int:
        """members: (name, type, bit_offset[, bit_size])."""
        extra = b""
        for m in members:
            offset = m[2]
            if bitfields:
                offset = (m[3] if len(m) > 3 else 0) << 24 | m[2]
            extra += struct.pack("<III", self.name(m[0]), m[1], offset)
        return self._add(name, btf.UNION if union else btf.STRUCT, len(members), size, extra, int(bitfields))

    def enum(self, name: str, values: dict[str, int], size: int = 4) -> int:
        extra = b"".join(struct.pack("<Ii", self.name(k), v) for k, v in values.items())
        return self._add(name, btf.ENUM, len(values), size, extra, kflag=int(any(v < 0 for v in values.values())))

    def enum64(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<III", self.name(k), v & 0xFFFFFFFF, v >> 32) for k, v in values.items())
        return self._add(name, btf.ENUM64, len(values), 8, extra)

    def fwd(self, name: str) -> int:
        return self._add(name, btf.FWD, 0, 0)

    def func_proto(self, ret: int, params) -> int:
        extra = b"".join(struct.pack("<II", self.name(n), t) for n, t in params)
        return self._add("", btf.FUNC_PROTO, len(params), ret, extra)

    def var(self, name: str, target: int) -> int:
        return self._add(name, btf.VAR, 0, target, struct.pack("<I", 1))

    def datasec(self, name: str, entries) -> int:
        extra = b"".join(struct.pack("<III", t, o, s) for t, o, s in entries)
        return self._add(name, btf.DATASEC, len(entries), sum(s for _, _, s in entries), extra)

    def decl_tag(self, name: str, target: int, component: int = -1) -> int:
        return self._add(name, btf.DECL_TAG, 0, target, struct.pack("<i", component))

    def blob(self) -> bytes:
        header = btf.HEADER.pack(btf.MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return header + bytes(self.types) + bytes(self.strings)
