"""Volatility 3 Intermediate Symbol Format (ISF, JSON): export from BTF + kallsyms, and read back.

ISF layout (volatility3 schema 6.x): ``base_types`` (int/char/bool/float/void with size and
signedness), ``user_types`` (structs/unions: size and ``fields`` with ``offset`` and a type
descriptor), ``enums``, ``symbols`` (link-time addresses; ``linux_banner`` carries its text as
base64 ``constant_data``, which is how Volatility matches an ISF to an image) and ``metadata``.
Type descriptors are ``{"kind": "base"|"struct"|"union"|"enum"|"pointer"|"array"|"bitfield"|
"function", ...}``. Anonymous members keep their own ``unnamed_N`` struct (Volatility resolves
them), and :class:`IsfProfile` flattens them again for vmwatch's own lookups.
"""

from __future__ import annotations

import base64
import functools
import json
import lzma

from vmwatch.errors import SymbolError
from vmwatch.os.linux import btf
from vmwatch.os.linux.btf import Member, Struct

FORMAT = "6.2.0"


# -- export --------------------------------------------------------------------------------------

class _Exporter:
    def __init__(self, types: btf.BtfProfile) -> None:
        self.t = types
        self.base_types: dict[str, dict] = {}
        self.user_types: dict[str, dict] = {}
        self.enums: dict[str, dict] = {}
        self.anon: dict[int, str] = {}
        self.variable_types: dict[str, dict] = {}
        self._base("void", 0, False, "void")
        self._base("pointer", types.pointer_size, False, "int")

    def _base(self, name: str, size: int, signed: bool, kind: str) -> dict:
        self.base_types.setdefault(name, {"kind": kind, "size": size, "signed": signed, "endian": "little"})
        return {"kind": "base", "name": name}

    def descriptor(self, type_id: int, depth: int = 0) -> dict:
        t = self.t
        if depth > 40:
            raise SymbolError(f"BTF type {type_id} nests too deep to export")
        type_id = t.resolve(type_id)
        if type_id == 0:
            return {"kind": "base", "name": "void"}
        kind = t.kind(type_id)
        name = t.name(type_id)
        if kind == btf.INT:
            encoding, _, bits = t.int_encoding(type_id)
            base_kind = "bool" if encoding & 4 else "char" if encoding & 2 or name.endswith("char") else "int"
            return self._base(name, t.size_of(type_id), bool(encoding & 1), base_kind)
        if kind == btf.FLOAT:
            return self._base(name, t.size_of(type_id), True, "float")
        if kind == btf.PTR:
            target = t._record(type_id)[3]
            sub = {"kind": "function"} if t.kind(t.resolve(target)) == btf.FUNC_PROTO else self.descriptor(target, depth + 1)
            return {"kind": "pointer", "subtype": sub}
        if kind == btf.ARRAY:
            elem, _, count = t.array(type_id)
            return {"kind": "array", "count": count, "subtype": self.descriptor(elem, depth + 1)}
        if kind in (btf.STRUCT, btf.UNION):
            return {"kind": "struct" if kind == btf.STRUCT else "union", "name": self.user_type(type_id)}
        if kind in (btf.ENUM, btf.ENUM64):
            return {"kind": "enum", "name": self.enum(type_id)}
        if kind == btf.FWD:
            return {"kind": "struct", "name": name}
        if kind == btf.FUNC_PROTO:
            return {"kind": "function"}
        return {"kind": "base", "name": "void"}

    def user_type(self, type_id: int) -> str:
        t = self.t
        name = t.name(type_id)
        if name and t.has_type(f"struct {name}"):
            type_id = t.type_id(f"struct {name}")  # the definition with members, not a duplicate
        name = name or self.anon.setdefault(type_id, f"unnamed_{type_id}")
        if name in self.user_types:
            return name
        kind = t.kind(type_id)
        entry = {"kind": "struct" if kind == btf.STRUCT else "union", "size": t._record(type_id)[3], "fields": {}}
        self.user_types[name] = entry
        for member_name, member_type, bit_offset, bit_size in t.raw_members(type_id):
            field_name = member_name or self.anon.setdefault(t.resolve(member_type), f"unnamed_{t.resolve(member_type)}")
            desc = self.descriptor(member_type)
            resolved = t.resolve(member_type)
            if not bit_size and t.kind(resolved) == btf.INT and t.int_encoding(resolved)[2] != 8 * t.size_of(resolved):
                bit_size = t.int_encoding(resolved)[2]  # old-style bitfield in the int type
            field = {"offset": bit_offset // 8, "type": desc}
            if bit_size:
                size = t.size_of(member_type)
                field["offset"] = (bit_offset // 8) & ~(size - 1)
                field["type"] = {"kind": "bitfield", "bit_position": bit_offset - 8 * field["offset"],
                                 "bit_length": bit_size, "type": desc}
            if not member_name:
                field["anonymous"] = True
            entry["fields"][field_name] = field
        return name

    def enum(self, type_id: int) -> str:
        t = self.t
        name = t.name(type_id) or self.anon.setdefault(type_id, f"unnamed_{type_id}")
        if name not in self.enums:
            kind, _, info, size = t._record(type_id)
            signed = bool(info >> 31)
            base = {1: "char", 2: "short", 4: "int", 8: "long"}.get(size, "int")
            base_name = base if signed else f"unsigned {base}"
            self._base(base_name, size, signed, "int")
            constants = {}
            if name and t.has_type(name) and t.resolve(t.type_id(name)) == type_id:
                constants = t.enum(name)
            else:
                constants = _enum_values(t, type_id)
            self.enums[name] = {"size": size, "base": base_name, "constants": constants}
        return name


def _enum_values(t: btf.BtfProfile, type_id: int) -> dict[str, int]:
    kind, _, info, _ = t._record(type_id)
    pos = t._offsets[type_id] + 12
    values = {}
    step = 8 if kind == btf.ENUM else 12
    for _ in range(info & 0xFFFF):
        name_off = int.from_bytes(t.blob[pos:pos + 4], "little")
        lo = int.from_bytes(t.blob[pos + 4:pos + 8], "little", signed=kind == btf.ENUM and bool(info >> 31))
        hi = int.from_bytes(t.blob[pos + 8:pos + 12], "little") if kind == btf.ENUM64 else 0
        values[t.string(name_off)] = hi << 32 | lo if kind == btf.ENUM64 else lo
        pos += step
    return values


SYMBOL_TYPES = {"init_task": "task_struct", "modules": "list_head", "init_mm": "mm_struct",
                "init_pid_ns": "pid_namespace", "init_net": "net", "init_fs": "fs_struct"}
"""Types of well-known kernel variables that BTF does not list (it has VARs for per-CPU data only)."""
SYMBOL_ARRAYS = {"taint_flags": "taint_flag"}
"""Arrays among them, sized by the gap to the next kallsyms symbol (their count is a #define)."""


def export_isf(types: btf.BtfProfile, symbols, *, slide: int, banner: bytes, producer: str = "vmwatch") -> dict:
    """A Volatility 3 ISF document for one kernel.

    Args:
        types: the kernel's BTF profile (every struct, union and enum is exported).
        symbols: runtime symbols (kallsyms); addresses are written link-time (``- slide``).
        slide: the virtual KASLR slide.
        banner: the bytes of ``linux_banner`` including the trailing NUL.
    """
    exporter = _Exporter(types)
    for type_id in types.type_ids():
        kind = types.kind(type_id)
        if kind == btf.VAR:
            exporter.variable_types[types.name(type_id)] = exporter.descriptor(types._record(type_id)[3])
        if kind in (btf.STRUCT, btf.UNION) and types.name(type_id):
            exporter.user_type(type_id)
        elif kind in (btf.ENUM, btf.ENUM64) and types.name(type_id):
            exporter.enum(type_id)
    mask = (1 << (8 * types.pointer_size)) - 1
    out_symbols: dict[str, dict] = {}
    for i, (name, address) in enumerate(symbols.items()):
        kind = symbols.types[i] if symbols.types else "T"
        if name in out_symbols or not name:
            continue
        # Absolute symbols (per-CPU offsets) do not move with KASLR.
        out_symbols[name] = {"address": address if kind in "aA" else (address - slide) & mask}
    for name, entry in out_symbols.items():
        desc = exporter.variable_types.get(name)
        if desc is None and name in SYMBOL_TYPES and types.has_type(f"struct {SYMBOL_TYPES[name]}"):
            desc = exporter.descriptor(types.type_id(f"struct {SYMBOL_TYPES[name]}"))
        if desc is None and name in SYMBOL_ARRAYS and types.has_type(f"struct {SYMBOL_ARRAYS[name]}"):
            desc = _array(exporter, types, f"struct {SYMBOL_ARRAYS[name]}", symbols[name], (a for _, a in symbols.items()))
        if desc is not None:
            entry["type"] = desc
    out_symbols.setdefault("linux_banner", {"address": (symbols["linux_banner"] - slide) & mask})
    out_symbols["linux_banner"]["constant_data"] = base64.b64encode(banner).decode()
    return {
        "metadata": {"format": FORMAT, "producer": {"name": producer, "version": "0.1.0"},
                     "linux": {"symbols": [{"kind": "symtab", "name": "kallsyms+BTF from guest memory"}]}},
        "base_types": exporter.base_types,
        "user_types": exporter.user_types,
        "enums": exporter.enums,
        "symbols": out_symbols,
    }


def _array(exporter: _Exporter, types: btf.BtfProfile, struct: str, address: int, addresses) -> dict | None:
    element = types.type_id(struct)
    size = types.size_of(element)
    following = [a for a in addresses if a > address]
    if not size or not following:
        return None
    count = min((min(following) - address) // size, 256)  # a gap is padding too: cap a hostile one
    return {"kind": "array", "count": count, "subtype": exporter.descriptor(element)} if count else None


# -- import --------------------------------------------------------------------------------------

_KINDS = {"base": btf.INT, "pointer": btf.PTR, "array": btf.ARRAY, "struct": btf.STRUCT, "union": btf.UNION,
          "enum": btf.ENUM, "function": btf.FUNC_PROTO, "bitfield": btf.INT, "class": btf.STRUCT}


def read_isf(path: str) -> dict:
    """Load an ISF file (``.json`` or ``.json.xz``).

    Raises:
        SymbolError: not JSON, or not an ISF document.
    """
    try:
        if str(path).endswith(".xz"):
            with lzma.open(path, "rt") as f:
                doc = json.load(f)
        else:
            with open(path) as f:
                doc = json.load(f)
    except (lzma.LZMAError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise SymbolError(f"{path}: not an ISF JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("user_types"), dict):
        raise SymbolError(f"{path}: not an ISF document (no user_types)")
    return doc


def _table(value) -> dict:
    """A name -> entry table; anything else in the file counts as empty."""
    return value if isinstance(value, dict) else {}


def _hostile(method):
    """ISF files are input: a wrong JSON shape anywhere becomes a SymbolError, not a TypeError."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise SymbolError(f"malformed ISF data ({type(exc).__name__}: {exc})") from None
    return guarded


class IsfProfile:
    """The subset of :class:`~vmwatch.os.linux.btf.BtfProfile` that kernel objects use, over ISF.

    Type ids are indexes into a table of ISF type descriptors made on demand.
    """

    @_hostile
    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.base_types = _table(doc.get("base_types"))
        self.user_types = _table(doc["user_types"])
        self.enums = _table(doc.get("enums"))
        self._descs: list[dict] = [{"kind": "base", "name": "void"}]
        self._structs: dict[str, Struct] = {}
        pointer = self.base_types.get("pointer") or {}
        self.pointer_size = int(pointer.get("size", 8))

    def _id(self, desc: dict) -> int:
        self._descs.append(desc)
        return len(self._descs) - 1

    def _desc(self, type_id: int) -> dict:
        if not 0 <= type_id < len(self._descs):
            raise SymbolError(f"ISF type id {type_id} out of range")
        return self._descs[type_id]

    @_hostile
    def resolve(self, type_id: int) -> int:
        return type_id

    @_hostile
    def kind(self, type_id: int) -> int:
        desc = self._desc(type_id)
        if desc.get("kind") == "base" and desc.get("name") == "void":
            return 0
        return _KINDS.get(desc.get("kind"), 0)

    @_hostile
    def name(self, type_id: int) -> str:
        return str(self._desc(type_id).get("name", ""))

    @_hostile
    def size_of(self, type_id: int, _depth: int = 0) -> int:
        desc = self._desc(type_id)
        return self._size(desc, 0)

    def _size(self, desc: dict, depth: int) -> int:
        if depth > 40:
            raise SymbolError("ISF type nests too deep")
        kind = desc.get("kind")
        if kind == "pointer":
            return self.pointer_size
        if kind == "array":
            return int(desc.get("count", 0)) * self._size(desc.get("subtype") or {}, depth + 1)
        if kind == "bitfield":
            return self._size(desc.get("type") or {}, depth + 1)
        table = {"base": self.base_types, "struct": self.user_types, "union": self.user_types,
                 "class": self.user_types, "enum": self.enums}.get(kind)
        entry = table.get(desc.get("name")) if table is not None else None
        if not isinstance(entry, dict) or "size" not in entry:
            raise SymbolError(f"ISF type {desc!r} has no size")
        return int(entry["size"])

    @_hostile
    def int_encoding(self, type_id: int) -> tuple[int, int, int]:
        desc = self._desc(type_id)
        if desc.get("kind") == "bitfield":
            desc = desc.get("type") or {}
        entry = self.base_types.get(desc.get("name")) or {}
        return (1 if entry.get("signed") else 0), 0, 8 * int(entry.get("size", 0))

    @_hostile
    def array(self, type_id: int) -> tuple[int, int, int]:
        desc = self._desc(type_id)
        if desc.get("kind") != "array":
            raise SymbolError(f"ISF type {desc!r} is not an array")
        return self._id(desc.get("subtype") or {}), 0, int(desc.get("count", 0))

    @_hostile
    def has_type(self, name: str) -> bool:
        return name.removeprefix("struct ") in self.user_types or name in self.enums

    @_hostile
    def type_id(self, name: str) -> int:
        bare = name.removeprefix("struct ")
        if bare in self.user_types:
            return self._id({"kind": self.user_types[bare].get("kind", "struct"), "name": bare})
        if name in self.enums:
            return self._id({"kind": "enum", "name": name})
        raise SymbolError(f"type {name!r} not in the symbol file", name=name)

    @_hostile
    def enum(self, name: str) -> dict[str, int]:
        entry = self.enums.get(name)
        if not isinstance(entry, dict):
            raise SymbolError(f"enum {name!r} not in the symbol file", name=name)
        return {str(k): int(v) for k, v in (entry.get("constants") or {}).items()}

    @_hostile
    def struct(self, name: str | int) -> Struct:
        if isinstance(name, int):
            name = self._desc(name).get("name", "")
        cached = self._structs.get(name)
        if cached is not None:
            return cached
        entry = self.user_types.get(name)
        if not isinstance(entry, dict):
            raise SymbolError(f"struct {name!r} not in the symbol file", name=str(name))
        members: dict[str, Member] = {}
        self._flatten(entry, 0, members, 0)
        result = Struct(name=name, size=int(entry.get("size", 0)), type_id=0, members=members)
        self._structs[name] = result
        return result

    def _flatten(self, entry: dict, base: int, out: dict[str, Member], depth: int) -> None:
        if depth > 40:
            raise SymbolError("ISF anonymous members nest too deep")
        for field_name, field in (entry.get("fields") or {}).items():
            desc = field.get("type") or {}
            offset = base + int(field.get("offset", 0))
            if field.get("anonymous") and desc.get("kind") in ("struct", "union"):
                inner = self.user_types.get(desc.get("name"))
                if isinstance(inner, dict):
                    self._flatten(inner, offset, out, depth + 1)
                    continue
            if desc.get("kind") == "bitfield":
                bits = offset * 8 + int(desc.get("bit_position", 0))
                out.setdefault(field_name, Member(field_name, bits // 8, bits, int(desc.get("bit_length", 0)),
                                                  self._id(desc)))
            else:
                out.setdefault(field_name, Member(field_name, offset, offset * 8, 0, self._id(desc)))

    @_hostile
    def member(self, struct_name: str, path: str) -> Member:
        current = self.struct(struct_name)
        bits = 0
        parts = path.split(".")
        member = None
        for i, part in enumerate(parts):
            member = current.members.get(part)
            if member is None:
                raise SymbolError(f"struct {current.name} has no member {part!r}", name=current.name, member=part)
            bits += member.bit_offset
            if i + 1 < len(parts):
                current = self.struct(self._desc(member.type_id).get("name", ""))
        return Member(parts[-1], bits // 8, bits, member.bit_size, member.type_id)

    @_hostile
    def offset(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path).offset
