"""DWARF debug information of a vmlinux (Debian's ``linux-image-*-dbg``) as an ISF document.

Walks every compilation unit once with pyelftools and keeps what kernel objects need: named
structs and unions (members, byte and bit offsets), base types, pointers, arrays, enums, and
the types of global variables. Typedefs, const and volatile are resolved away, as in ISF.
Anonymous struct/union members are kept as ``unnamed_<offset>`` types marked ``anonymous`` so
:class:`~vmwatch.os.linux.isf.IsfProfile` flattens them. The fallback for small DWARF when
pahole is missing (vmlinux.py): pyelftools does not even open a -dbg vmlinux's 150 MB of
``.debug_info`` within ten minutes. The result is cached by the file's size and mtime.
"""

from __future__ import annotations

import hashlib
import os

from vmwatch.errors import SymbolError
from vmwatch.os.linux import _cache

_MODIFIERS = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
              "DW_TAG_atomic_type", "DW_TAG_immutable_type"}


def _name(die) -> str:
    attr = die.attributes.get("DW_AT_name")
    if attr is None:
        return ""
    value = attr.value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Converter:
    def __init__(self, pointer_size: int) -> None:
        self.base_types: dict[str, dict] = {
            "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
            "pointer": {"kind": "int", "size": pointer_size, "signed": False, "endian": "little"}}
        self.user_types: dict[str, dict] = {}
        self.enums: dict[str, dict] = {}
        self.variables: dict[str, dict] = {}
        self.in_progress: set[str] = set()

    def descriptor(self, die, depth: int = 0) -> dict:
        if die is None or depth > 40:
            return {"kind": "base", "name": "void"}
        tag = die.tag
        if tag in _MODIFIERS:
            return self.descriptor(_target(die), depth + 1)
        if tag == "DW_TAG_base_type":
            name = _name(die)
            encoding = die.attributes.get("DW_AT_encoding")
            enc = encoding.value if encoding else 0
            kind = {2: "bool", 4: "float", 6: "char", 8: "char"}.get(enc, "int")  # DW_ATE_*
            self.base_types.setdefault(name, {"kind": kind, "size": die.attributes["DW_AT_byte_size"].value,
                                              "signed": enc in (5, 6, 13), "endian": "little"})
            return {"kind": "base", "name": name}
        if tag == "DW_TAG_pointer_type":
            target = _target(die)
            if target is not None and target.tag == "DW_TAG_subroutine_type":
                return {"kind": "pointer", "subtype": {"kind": "function"}}
            return {"kind": "pointer", "subtype": self.descriptor(target, depth + 1)}
        if tag == "DW_TAG_array_type":
            desc = self.descriptor(_target(die), depth + 1)
            counts = []
            for sub in die.iter_children():
                if sub.tag == "DW_TAG_subrange_type":
                    if "DW_AT_count" in sub.attributes:
                        counts.append(int(sub.attributes["DW_AT_count"].value))
                    elif "DW_AT_upper_bound" in sub.attributes:
                        counts.append(int(sub.attributes["DW_AT_upper_bound"].value) + 1)
                    else:
                        counts.append(0)
            for count in reversed(counts or [0]):
                desc = {"kind": "array", "count": count, "subtype": desc}
            return desc
        if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            return {"kind": "struct" if tag == "DW_TAG_structure_type" else "union", "name": self.struct(die)}
        if tag == "DW_TAG_enumeration_type":
            return {"kind": "enum", "name": self.enum(die)}
        if tag == "DW_TAG_subroutine_type":
            return {"kind": "function"}
        return {"kind": "base", "name": "void"}

    def struct(self, die) -> str:
        name = _name(die) or f"unnamed_{die.offset:x}"
        existing = self.user_types.get(name)
        if existing is not None and (existing["fields"] or name in self.in_progress
                                     or die.attributes.get("DW_AT_declaration")):
            return name
        if die.attributes.get("DW_AT_declaration"):
            self.user_types.setdefault(name, {"kind": "struct", "size": 0, "fields": {}})
            return name
        entry = {"kind": "struct" if die.tag == "DW_TAG_structure_type" else "union",
                 "size": die.attributes["DW_AT_byte_size"].value if "DW_AT_byte_size" in die.attributes else 0,
                 "fields": {}}
        self.user_types[name] = entry
        self.in_progress.add(name)  # self-referencing structs (list_head) stop here
        for member in die.iter_children():
            if member.tag != "DW_TAG_member":
                continue
            location = member.attributes.get("DW_AT_data_member_location")
            offset = location.value if location is not None and isinstance(location.value, int) else 0
            desc = self.descriptor(_target(member))
            field = {"offset": offset, "type": desc}
            if "DW_AT_bit_size" in member.attributes:
                bits = member.attributes["DW_AT_bit_size"].value
                if "DW_AT_data_bit_offset" in member.attributes:
                    absolute = member.attributes["DW_AT_data_bit_offset"].value
                    size = self._size(desc) or 1
                    field["offset"] = (absolute // 8) & ~(size - 1)
                    position = absolute - 8 * field["offset"]
                else:  # DWARF 2/3: bit offset from the most significant bit of the storage unit
                    size = member.attributes.get("DW_AT_byte_size")
                    size = size.value if size is not None else self._size(desc) or 1
                    position = size * 8 - member.attributes["DW_AT_bit_offset"].value - bits
                field["type"] = {"kind": "bitfield", "bit_position": position, "bit_length": bits, "type": desc}
            member_name = _name(member)
            if not member_name:
                member_name = desc.get("name", f"unnamed_{member.offset:x}")
                field["anonymous"] = True
            entry["fields"][member_name] = field
        self.in_progress.discard(name)
        return name

    def _size(self, desc: dict) -> int:
        table = {"base": self.base_types, "struct": self.user_types, "union": self.user_types,
                 "enum": self.enums}.get(desc.get("kind"))
        entry = table.get(desc.get("name")) if table is not None else None
        return int(entry.get("size", 0)) if entry else 0

    def enum(self, die) -> str:
        name = _name(die) or f"unnamed_{die.offset:x}"
        if name not in self.enums:
            size = die.attributes["DW_AT_byte_size"].value if "DW_AT_byte_size" in die.attributes else 4
            base = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "long unsigned int"}.get(size, "unsigned int")
            self.base_types.setdefault(base, {"kind": "int", "size": size, "signed": False, "endian": "little"})
            constants = {_name(c): int(c.attributes["DW_AT_const_value"].value)
                         for c in die.iter_children() if c.tag == "DW_TAG_enumerator"}
            self.enums[name] = {"size": size, "base": base, "constants": constants}
        return name


def _target(die):
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def isf_from_dwarf(path: str) -> dict:
    """An ISF document (types, and the types of global variables) from a vmlinux's DWARF.

    Raises:
        SymbolError: no DWARF, or pyelftools cannot read it.
    """
    stat = os.stat(path)
    key = hashlib.blake2b(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode(),
                          digest_size=16).hexdigest()
    cached = _cache.load("dwarf", key)
    if isinstance(cached, dict):
        return cached
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info():
                raise SymbolError(f"{path}: no DWARF debug information")
            converter = _Converter(8 if elf.elfclass == 64 else 4)
            for cu in elf.get_dwarf_info().iter_CUs():
                for die in cu.get_top_DIE().iter_children():
                    if die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type") and _name(die):
                        converter.struct(die)
                    elif die.tag == "DW_TAG_enumeration_type" and _name(die):
                        converter.enum(die)
                    elif die.tag == "DW_TAG_variable" and _name(die) and "DW_AT_type" in die.attributes:
                        converter.variables.setdefault(_name(die), converter.descriptor(_target(die)))
    except SymbolError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises anything on corrupt DWARF
        raise SymbolError(f"{path}: unreadable DWARF ({type(exc).__name__}: {exc})") from None
    doc = {"base_types": converter.base_types, "user_types": converter.user_types,
           "enums": converter.enums, "symbols": {}, "variables": converter.variables}
    _cache.store("dwarf", key, doc)
    return doc
