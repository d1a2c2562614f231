"""BTF (BPF Type Format) parser: the kernel's own type information, turned into a profile.

Theory of operation (include/uapi/linux/btf.h, Documentation/bpf/btf.rst):
a 24-byte header (magic 0xeB9F, version 1, hdr_len, then type and string section offsets and
lengths relative to the end of the header), a type section of variable-length records, and a
string section of NUL-terminated names. Each record is ``name_off, info, size_or_type`` (info:
vlen in bits 0-15, kind in 24-28, kind_flag in bit 31) followed by kind-specific data whose
length depends on kind and vlen. Type ids count from 1 in record order (0 is ``void``).

Parsing is one pass that only records where each type starts and indexes names; members,
enums and arrays are decoded on demand, so a 100,000-type kernel profile is cheap to build and
cheaper to load from the on-disk cache (:func:`load_profile`). Struct members of anonymous
struct/union type are flattened into their parent, as C lets code name them directly.

The blob comes from guest memory or a file: every offset, id and length is checked, and any
inconsistency raises :class:`SymbolError`.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from typing import Iterator

import attrs

from vmwatch.errors import SymbolError
from vmwatch.os.linux import _cache

MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")
_S32 = struct.Struct("<i")

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

KIND_NAMES = {
    INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union", ENUM: "enum",
    FWD: "fwd", TYPEDEF: "typedef", VOLATILE: "volatile", CONST: "const", RESTRICT: "restrict",
    FUNC: "func", FUNC_PROTO: "func_proto", VAR: "var", DATASEC: "datasec", FLOAT: "float",
    DECL_TAG: "decl_tag", TYPE_TAG: "type_tag", ENUM64: "enum64",
}
# Bytes after the 12-byte record: (fixed, per vlen item).
_EXTRA = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0), RESTRICT: (0, 0),
    FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), FLOAT: (0, 0),
    DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12),
}
_MODIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})
_NAMED_KINDS = frozenset({STRUCT, UNION, ENUM, ENUM64, TYPEDEF, FWD, INT, FLOAT})
_MAX_DEPTH = 32
_MAX_TYPES = 1 << 20  # BTF_MAX_TYPE


@attrs.frozen
class Member:
    """One struct or union member, with anonymous members already flattened."""

    name: str
    """Member name; for flattened anonymous members, the inner name."""
    offset: int
    """Byte offset from the start of the outermost struct (bitfields: of the containing byte)."""
    bit_offset: int
    """Bit offset from the start of the outermost struct."""
    bit_size: int
    """Width of a bitfield, 0 for ordinary members."""
    type_id: int
    """BTF type id of the member (not resolved through typedefs)."""


@attrs.frozen
class Struct:
    """A struct or union with its members by name."""

    name: str
    size: int
    type_id: int
    members: dict[str, Member]


class BtfProfile:
    """Types of one kernel, indexed for lookups by name.

    Args:
        blob: the raw BTF data (from ``__start_BTF``..``__stop_BTF`` or a ``.BTF`` section).

    Raises:
        SymbolError: the blob is not BTF or is inconsistent.
    """

    def __init__(self, blob: bytes, *, _index: tuple[bytes, dict[str, int]] | None = None) -> None:
        self.blob = bytes(blob)
        self._parse_header()
        if _index is None:
            offsets, names = self._scan()
        else:
            offsets, names = array("I"), _index[1]
            offsets.frombytes(_index[0])
        self._offsets = offsets
        self._names = names
        self._structs: dict[int, Struct] = {}

    # -- parsing -------------------------------------------------------------------------

    def _parse_header(self) -> None:
        blob = self.blob
        if len(blob) < HEADER.size:
            raise SymbolError(f"BTF blob too short ({len(blob):#x} bytes)")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise SymbolError(f"bad BTF magic {magic:#x}")
        if version != 1:
            raise SymbolError(f"unsupported BTF version {version}")
        if hdr_len < HEADER.size or hdr_len > len(blob):
            raise SymbolError(f"bad BTF header length {hdr_len:#x}")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(blob) or s0 + str_len > len(blob) or type_len % 4:
            raise SymbolError(
                f"BTF sections (types {t0:#x}+{type_len:#x}, strings {s0:#x}+{str_len:#x}) "
                f"exceed the blob ({len(blob):#x} bytes)")
        self._types_start, self._types_end = t0, t0 + type_len
        self._str_start, self._str_end = s0, s0 + str_len

    def _scan(self) -> tuple[array, dict[str, int]]:
        """One pass: record offsets, index names (complete structs win over forward decls)."""
        blob, unpack = self.blob, _TYPE.unpack_from
        pos, end = self._types_start, self._types_end
        offsets = array("I", [0])
        names: dict[str, int] = {}
        empty: set[str] = set()
        extra, named = _EXTRA, _NAMED_KINDS
        strings, s0 = blob, self._str_start
        while pos < end:
            if pos + 12 > end:
                raise SymbolError(f"truncated BTF type record at {pos:#x}")
            name_off, info, _ = unpack(blob, pos)
            kind = (info >> 24) & 0x1F
            try:
                fixed, per = extra[kind]
            except KeyError:
                raise SymbolError(f"unknown BTF kind {kind} (type {len(offsets)} at {pos:#x})") from None
            offsets.append(pos)
            if len(offsets) > _MAX_TYPES:
                raise SymbolError("BTF has more types than BTF_MAX_TYPE")
            if name_off and kind in named and kind != FWD:
                stop = strings.find(b"\0", s0 + name_off, self._str_end)
                if stop < 0:
                    raise SymbolError(f"BTF name offset {name_off:#x} outside the string section")
                key = strings[s0 + name_off:stop].decode("utf-8", "replace")
                if kind in (STRUCT, UNION):
                    key = "struct " + key
                    # Prefer a definition with members over an empty one of the same name.
                    if key not in names or key in empty and info & 0xFFFF:
                        names[key] = len(offsets) - 1
                        if info & 0xFFFF:
                            empty.discard(key)
                        else:
                            empty.add(key)
                elif key not in names:
                    names[key] = len(offsets) - 1
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise SymbolError(f"BTF type section overruns its length at {pos:#x}")
        return offsets, names

    # -- primitives ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of types, counting ``void`` (id 0)."""
        return len(self._offsets)

    def _record(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, name_off, info, size_or_type) of a type id."""
        if not 0 < type_id < len(self._offsets):
            raise SymbolError(f"BTF type id {type_id} out of range")
        pos = self._offsets[type_id]
        name_off, info, size = _TYPE.unpack_from(self.blob, pos)
        return (info >> 24) & 0x1F, name_off, info, size

    def string(self, offset: int) -> str:
        """A name from the string section."""
        start = self._str_start + offset
        stop = self.blob.find(b"\0", start, self._str_end)
        if offset < 0 or stop < 0:
            raise SymbolError(f"BTF name offset {offset:#x} outside the string section")
        return self.blob[start:stop].decode("utf-8", "replace")

    def kind(self, type_id: int) -> int:
        return 0 if type_id == 0 else self._record(type_id)[0]

    def name(self, type_id: int) -> str:
        return "" if type_id == 0 else self.string(self._record(type_id)[1])

    def resolve(self, type_id: int) -> int:
        """Strip typedef, const, volatile, restrict and type tags."""
        for _ in range(_MAX_DEPTH):
            if type_id == 0:
                return 0
            kind, _, _, target = self._record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        raise SymbolError(f"BTF modifier chain too deep at type {type_id}")

    def size_of(self, type_id: int, _depth: int = 0) -> int:
        """Size in bytes of a type (after resolving modifiers)."""
        if _depth > _MAX_DEPTH:
            raise SymbolError(f"BTF array nesting too deep at type {type_id}")
        type_id = self.resolve(type_id)
        if type_id == 0:
            raise SymbolError("void has no size")
        kind, _, _, size = self._record(type_id)
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return size
        if kind == PTR:
            return self.pointer_size
        if kind == ARRAY:
            elem, _, count = self.array(type_id)
            return self.size_of(elem, _depth + 1) * count
        raise SymbolError(f"BTF type {type_id} ({KIND_NAMES.get(kind, kind)}) has no size")

    @property
    def pointer_size(self) -> int:
        """8 unless ``unsigned long`` says otherwise (i386 kernels)."""
        tid = self._names.get("long unsigned int")
        return self._record(tid)[3] if tid else 8

    def array(self, type_id: int) -> tuple[int, int, int]:
        """(element type, index type, element count) of an array type."""
        kind, _, _, _ = self._record(type_id)
        if kind != ARRAY:
            raise SymbolError(f"BTF type {type_id} is not an array")
        return struct.unpack_from("<III", self.blob, self._offsets[type_id] + 12)

    def int_encoding(self, type_id: int) -> tuple[int, int, int]:
        """(encoding bits: 1 signed 2 char 4 bool, bit offset, bit count) of an int type."""
        kind, _, _, _ = self._record(type_id)
        if kind != INT:
            raise SymbolError(f"BTF type {type_id} is not an int")
        value = _U32.unpack_from(self.blob, self._offsets[type_id] + 12)[0]
        return value >> 24 & 0xF, value >> 16 & 0xFF, value & 0xFF

    def type_id(self, name: str) -> int:
        """Type id by name: ``"struct task_struct"`` (unions too), ``"pid_t"``, ``"pid_type"``."""
        try:
            return self._names[name]
        except KeyError:
            raise SymbolError(f"type {name!r} not in the kernel's BTF", name=name) from None

    def has_type(self, name: str) -> bool:
        return name in self._names

    # -- composite types -----------------------------------------------------------------

    def struct(self, name: str | int) -> Struct:
        """A struct or union by name (``"task_struct"``) or type id, members flattened."""
        type_id = name if isinstance(name, int) else self.type_id(f"struct {name}")
        type_id = self.resolve(type_id)
        cached = self._structs.get(type_id)
        if cached is not None:
            return cached
        kind, name_off, _, size = self._record(type_id)
        if kind not in (STRUCT, UNION):
            raise SymbolError(f"BTF type {type_id} is not a struct or union", name=str(name))
        members: dict[str, Member] = {}
        self._flatten(type_id, 0, members, 0)
        result = Struct(name=self.string(name_off), size=size, type_id=type_id, members=members)
        self._structs[type_id] = result
        return result

    def _flatten(self, type_id: int, base_bits: int, out: dict[str, Member], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise SymbolError(f"anonymous members nested too deep in BTF type {type_id}")
        for name, member_type, bit_offset, bit_size in self.raw_members(type_id):
            bits = base_bits + bit_offset
            if not name:
                inner = self.resolve(member_type)
                if inner and self.kind(inner) in (STRUCT, UNION):
                    self._flatten(inner, bits, out, depth + 1)
                continue
            out.setdefault(name, Member(name, bits // 8, bits, bit_size, member_type))

    def raw_members(self, type_id: int) -> Iterator[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of each direct member of a struct/union."""
        kind, _, info, _ = self._record(type_id)
        if kind not in (STRUCT, UNION):
            raise SymbolError(f"BTF type {type_id} is not a struct or union")
        kind_flag = info >> 31
        pos = self._offsets[type_id] + 12
        for _ in range(info & 0xFFFF):
            name_off, member_type, offset = _TYPE.unpack_from(self.blob, pos)
            pos += 12
            if kind_flag:
                bit_size, bit_offset = offset >> 24, offset & 0xFFFFFF
            else:
                bit_size, bit_offset = 0, offset
            yield self.string(name_off), member_type, bit_offset, bit_size

    def member(self, struct_name: str, path: str) -> Member:
        """A member by dotted path through embedded structs: ``("task_struct", "signal")``.

        Returns a Member whose offset is relative to ``struct_name``.
        """
        current = self.struct(struct_name)
        offset_bits = 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            try:
                member = current.members[part]
            except KeyError:
                raise SymbolError(f"struct {current.name} has no member {part!r}",
                                  name=current.name, member=part) from None
            offset_bits += member.bit_offset
            if i + 1 < len(parts):
                current = self.struct(self.resolve(member.type_id))
        return Member(parts[-1], offset_bits // 8, offset_bits, member.bit_size, member.type_id)

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted) member."""
        return self.member(struct_name, path).offset

    def enum(self, name: str) -> dict[str, int]:
        """Enumerators of an enum (or enum64) by name."""
        type_id = self.resolve(self.type_id(name))
        kind, _, info, _ = self._record(type_id)
        pos = self._offsets[type_id] + 12
        values = {}
        if kind == ENUM:
            signed = info >> 31
            for _ in range(info & 0xFFFF):
                name_off, raw = struct.unpack_from("<II", self.blob, pos)
                values[self.string(name_off)] = raw - (1 << 32) if signed and raw >> 31 else raw
                pos += 8
        elif kind == ENUM64:
            for _ in range(info & 0xFFFF):
                name_off, lo, hi = _TYPE.unpack_from(self.blob, pos)
                values[self.string(name_off)] = hi << 32 | lo
                pos += 12
        else:
            raise SymbolError(f"type {name!r} is not an enum", name=name)
        return values

    def names(self) -> Iterator[str]:
        """Every indexed type name (``"struct x"`` for structs and unions)."""
        return iter(self._names)

    def type_ids(self) -> range:
        return range(1, len(self._offsets))

    # -- cache ---------------------------------------------------------------------------

    def index(self) -> tuple[bytes, dict[str, int]]:
        """What :func:`load_profile` stores next to the blob."""
        return self._offsets.tobytes(), self._names


def blob_key(blob: bytes) -> str:
    """Cache key of a blob: its length and 64 slices spread over it (hashing all 4 MB costs more
    than loading the cached index; two builds differing only between the slices are unlikely)."""
    digest = hashlib.blake2b(len(blob).to_bytes(8, "little"), digest_size=16)
    step = max(1, len(blob) // 64)
    for pos in range(0, len(blob), step):
        digest.update(blob[pos:pos + 1024])
    digest.update(blob[-4096:])
    return digest.hexdigest()


def load_profile(blob: bytes, *, cache: bool = True) -> BtfProfile:
    """Parse a BTF blob, reusing an index cached on disk for identical blobs.

    Raises:
        SymbolError: the blob is not valid BTF.
    """
    if not cache:
        return BtfProfile(blob)
    key = blob_key(blob)
    index = _cache.load("btf", key)
    if index is not None:
        try:
            return BtfProfile(blob, _index=index)
        except (SymbolError, TypeError, ValueError):
            pass
    profile = BtfProfile(blob)
    _cache.store("btf", key, profile.index())
    return profile
