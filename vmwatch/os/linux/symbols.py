"""Optional symbol files (``--symbols FILE``) for kernels that do not carry enough about themselves.

Accepted, detected by content: a System.map (``address type name`` lines), a vmlinux ELF with
``.symtab`` (symbols) and types from its ``.BTF`` section or else its DWARF (vmlinux.py; Debian's
``linux-image-*-dbg`` vmlinux), a Volatility 3 ISF (``.json`` or
``.json.xz``), and a libvmi.conf entry (hand-written offsets plus the path of its System.map).
File addresses are link-time; they are moved by the KASLR slide measured on ``_text``.
"""

from __future__ import annotations

import os
import re
from array import array

import attrs

from vmwatch.errors import SymbolError
from vmwatch.os.linux.kallsyms import Symbols

_MAP_LINE = re.compile(r"^([0-9a-fA-F]{8,16}) ([A-Za-z?]) (\S+)")


@attrs.define
class SymbolFile:
    """What a symbol file provides: link-time symbols and/or types."""

    path: str
    symbols: Symbols | None = None
    types: object | None = None

    def merge_symbols(self, runtime: Symbols, text_vaddr: int) -> Symbols:
        """kallsyms from memory plus the file's symbols it lacks (data symbols on i386), slid."""
        link_text, runtime_text = self.link_address("_text"), text_vaddr
        if link_text is None:  # /proc/kallsyms saved as a System.map may start at _stext (arm64)
            link_text, runtime_text = self.link_address("_stext"), runtime.get("_stext")
        if link_text is None or runtime_text is None:
            return runtime
        slide = runtime_text - link_text
        mask = (1 << 64) - 1 if text_vaddr > 0xFFFFFFFF else 0xFFFFFFFF
        present = set(runtime.names)
        self._check_matches(runtime, slide, mask)
        file_names, file_addresses = self.symbols.names, self.symbols.addresses
        file_types = self.symbols.types or "D" * len(file_names)
        extra = [i for i, name in enumerate(file_names) if name not in present]
        names = runtime.names + [file_names[i] for i in extra]
        addresses = array("Q", runtime.addresses)
        addresses.extend(file_addresses[i] if file_types[i] in "aA" else (file_addresses[i] + slide) & mask
                         for i in extra)
        types = (runtime.types or "T" * len(runtime)) + "".join([file_types[i] for i in extra])
        return Symbols(names, addresses, types)

    def link_address(self, name: str) -> int | None:
        """A unique symbol's file address, without indexing every name (a -dbg vmlinux has 120,000)."""
        if self.symbols is None:
            return None
        try:
            return self.symbols.addresses[self.symbols.names.index(name)]
        except ValueError:
            return None

    def _check_matches(self, runtime: Symbols, slide: int, mask: int, sample: int = 2000) -> None:
        """Functions named in both tables must sit at the same place once slid, or the file is
        another kernel's (another build, or another architecture): its data symbols would be wrong.
        Static functions may share a name, so a few may differ."""
        ours = dict(zip(self.symbols.names, self.symbols.addresses))
        checked = moved = 0
        for name, address, kind in zip(runtime.names, runtime.addresses, runtime.types or ""):
            if checked >= sample:
                break
            if kind not in "Tt" or name not in ours:
                continue
            checked += 1
            moved += (ours[name] + slide) & mask != address
        if checked >= 20 and moved * 10 > checked:
            raise SymbolError(f"{self.path} is not this kernel's symbol file: {moved} of {checked} "
                              "functions it shares with the kernel's own kallsyms are elsewhere")


def load_symbols_file(path: str) -> SymbolFile:
    """Read any supported symbol file.

    Raises:
        SymbolError: unreadable, or of no known kind.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise SymbolError(f"cannot read symbol file {path}: {exc.strerror}") from None
    if head.startswith(b"\x7fELF"):
        return _vmlinux(path)
    if head.startswith(b"\xfd7zXZ") or head.lstrip().startswith(b"{"):
        return _isf(path)
    text = head.decode("latin-1")
    if _MAP_LINE.match(text):
        return SymbolFile(path, symbols=read_system_map(path))
    if re.search(r"\{[^}]*ostype\s*=", text, re.S) or "linux_tasks" in text:
        return _libvmi(path, text)
    raise SymbolError(f"{path}: not a System.map, vmlinux, ISF JSON or libvmi.conf file")


def read_system_map(path: str) -> Symbols:
    names, addresses, types = [], [], []
    with open(path, encoding="latin-1") as f:
        for line in f:
            m = _MAP_LINE.match(line)
            if m and not line[m.end():].lstrip().startswith("["):  # /proc/kallsyms: a module's symbol
                addresses.append(int(m.group(1), 16))
                types.append(m.group(2))
                names.append(m.group(3))
    if len(names) < 10 or not {"_text", "_stext"} & set(names):
        raise SymbolError(f"{path}: System.map without real symbols (Debian ships a stub; "
                          "the real one is in the linux-image-*-dbg package)")
    return Symbols(names, addresses, "".join(types))


def _isf(path: str) -> SymbolFile:
    from vmwatch.os.linux.isf import IsfProfile, read_isf

    doc = read_isf(path)
    names, addresses = [], []
    symbols = doc.get("symbols")
    for name, entry in (symbols.items() if isinstance(symbols, dict) else ()):
        if isinstance(entry, dict) and isinstance(entry.get("address"), int):
            names.append(name)
            addresses.append(entry["address"] & ((1 << 64) - 1))
    return SymbolFile(path, symbols=Symbols(names, addresses) if names else None, types=IsfProfile(doc))


def _vmlinux(path: str) -> SymbolFile:
    from vmwatch.os.linux.vmlinux import read_vmlinux

    symbols, types = read_vmlinux(path)
    return SymbolFile(path, symbols=symbols, types=types)


_LIBVMI_FIELDS = {
    "linux_tasks": ("task_struct", "tasks", {"kind": "struct", "name": "list_head"}),
    "linux_mm": ("task_struct", "mm", {"kind": "pointer", "subtype": {"kind": "struct", "name": "mm_struct"}}),
    "linux_pid": ("task_struct", "pid", {"kind": "base", "name": "int"}),
    "linux_name": ("task_struct", "comm", {"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}}),
    "linux_pgd": ("mm_struct", "pgd", {"kind": "pointer", "subtype": {"kind": "base", "name": "void"}}),
}


def _libvmi(path: str, head: str) -> SymbolFile:
    """One libvmi.conf entry: ``name { ostype = "Linux"; sysmap = "..."; linux_tasks = 0x...; ... }``."""
    from vmwatch.os.linux.isf import IsfProfile

    with open(path, encoding="latin-1") as f:
        text = f.read()
    entry = re.search(r"\{([^}]*)\}", text, re.S)
    if entry is None:
        raise SymbolError(f"{path}: no libvmi.conf entry")
    values = dict(re.findall(r"(\w+)\s*=\s*\"?([^\";\s]+)\"?\s*;", entry.group(1)))
    user_types: dict[str, dict] = {
        "list_head": {"kind": "struct", "size": 16, "fields": {
            "next": {"offset": 0, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}},
            "prev": {"offset": 8, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}}}},
    }
    for key, (struct_name, field, desc) in _LIBVMI_FIELDS.items():
        if key in values:
            entry_type = user_types.setdefault(struct_name, {"kind": "struct", "size": 0, "fields": {}})
            try:
                offset = int(values[key], 0)
            except ValueError:
                raise SymbolError(f"{path}: {key} = {values[key]!r} is not a number") from None
            entry_type["fields"][field] = {"offset": offset, "type": desc}
            entry_type["size"] = max(entry_type["size"], offset + 16)
    if "task_struct" not in user_types:
        raise SymbolError(f"{path}: libvmi.conf entry without linux_* offsets")
    doc = {"user_types": user_types, "enums": {}, "base_types": {
        "int": {"kind": "int", "size": 4, "signed": True, "endian": "little"},
        "char": {"kind": "char", "size": 1, "signed": True, "endian": "little"},
        "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
        "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"}}}
    symbols = None
    sysmap = values.get("sysmap")
    if sysmap:
        if not os.path.isabs(sysmap):
            sysmap = os.path.join(os.path.dirname(path), sysmap)
        symbols = read_system_map(sysmap)
    return SymbolFile(path, symbols=symbols, types=IsfProfile(doc))
