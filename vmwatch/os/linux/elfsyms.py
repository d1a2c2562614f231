"""A kernel's symbols as an ELF symbol file that gdb loads with ``symbol-file``/``add-symbol-file``.

Theory of operation: gdb turns an ELF ``.symtab`` into minimal symbols, and it places a symbol by
the section it names (``st_shndx``), so every symbol must sit in an allocated section whose range
covers it. The file therefore carries no code, only ``SHT_NOBITS`` sections (gdb reads nothing
from them; the bytes come from the target) laid over the runs of the kernel's address space:
symbols sorted by runtime address (the KASLR slide already applied, as kallsyms gives them) are
cut into runs of one class (code: nm types ``T t W w``; data: the rest) where no gap between
neighbours exceeds ``MAX_GAP``. ``.init.text`` after ``.data`` thus gets a code section of its
own, and no two sections overlap. A symbol's size runs to the next symbol (kallsyms keeps no
sizes; gdb needs them to say ``+offset`` within a function); a run's last one reaches the next
run or ``TAIL`` bytes. Absolute symbols (nm
``A``, and x86-64 per-CPU offsets, which live below 4 GiB) are ``SHN_ABS``. Locals (lower-case
types) come before globals, as the ELF spec requires (``sh_info`` = first global).

Layouts: System V ABI, "Object Files" chapter (ELF header, section header, symbol table entry), in
their 32- and 64-bit forms.
"""

from __future__ import annotations

import struct

from vmwatch.os.linux.kallsyms import Symbols

MAX_GAP = 1 << 20
"""Neighbours further apart than this start a new section (the kernel image vs. modules, fixmap)."""

TAIL = 0x1000
"""How far the last symbol of a run reaches when no neighbour ends it."""

_CODE = frozenset("TtWw")
_ET_EXEC, _EM_386, _EM_X86_64, _EM_AARCH64 = 2, 3, 62, 183
_SHT_PROGBITS, _SHT_SYMTAB, _SHT_STRTAB, _SHT_NOBITS = 1, 2, 3, 8
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR = 1, 2, 4
_STB_LOCAL, _STB_GLOBAL = 0, 1
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC = 0, 1, 2
_SHN_ABS = 0xFFF1


class _Layout:
    """The struct formats of one ELF class."""

    def __init__(self, sixty_four: bool) -> None:
        self.sixty_four = sixty_four
        if sixty_four:
            self.ehdr = struct.Struct("<16sHHIQQQIHHHHHH")
            self.shdr = struct.Struct("<IIQQQQIIQQ")
            self.sym = struct.Struct("<IBBHQQ")
        else:
            self.ehdr = struct.Struct("<16sHHIIIIIHHHHHH")
            self.shdr = struct.Struct("<IIIIIIIIII")
            self.sym = struct.Struct("<IIIBBH")

    def pack_sym(self, name: int, value: int, size: int, info: int, shndx: int) -> bytes:
        if self.sixty_four:
            return self.sym.pack(name, info, 0, shndx, value, size)
        return self.sym.pack(name, value, size, info, 0, shndx)

    def pack_shdr(self, name, kind, flags, addr, offset, size, link=0, info=0, align=1, entsize=0) -> bytes:
        return self.shdr.pack(name, kind, flags, addr, offset, size, link, info, align, entsize)


class _Strings:
    """A string table under construction: offsets of names, the empty name at 0."""

    def __init__(self) -> None:
        self.data = bytearray(b"\0")

    def add(self, name: str) -> int:
        offset = len(self.data)
        self.data += name.encode("utf-8", "surrogateescape") + b"\0"
        return offset


def export_elf(symbols: Symbols, *, aarch64: bool = False) -> bytes:
    """An ELF symbol file of ``symbols`` (runtime addresses), for gdb.

    The class and machine (ELF64 x86-64 or ELF32 i386) follow from the addresses: a kernel above
    4 GiB is 64-bit.
    """
    names, addresses = symbols.names, symbols.addresses
    types = symbols.types or "T" * len(names)
    sixty_four = any(a > 0xFFFFFFFF for a in addresses)
    layout = _Layout(sixty_four)
    absolute, placed = [], []
    for i, (address, kind) in enumerate(zip(addresses, types)):
        if kind in "aA" or (sixty_four and address < 1 << 32):
            absolute.append(i)
        else:
            placed.append(i)
    placed.sort(key=addresses.__getitem__)
    sections = _sections(placed, addresses, types)
    ends = _ends(sections, addresses)

    shstr, strtab = _Strings(), _Strings()
    section_index = {}
    headers = [layout.pack_shdr(0, 0, 0, 0, 0, 0)]
    for members, end in zip(sections, ends):
        code = types[members[0]] in _CODE
        start = addresses[members[0]]
        flags = _SHF_ALLOC | (_SHF_EXECINSTR if code else _SHF_WRITE)
        headers.append(layout.pack_shdr(shstr.add(".text" if code else ".data"), _SHT_NOBITS, flags,
                                        start, 0, end - start, align=1))
        for i in members:
            section_index[i] = len(headers) - 1

    entries_local, entries_global = [], []
    for members, end in zip(sections, ends):
        for here, following in zip(members, members[1:] + [None]):
            size = (end if following is None else addresses[following]) - addresses[here]
            _add_symbol(layout, strtab, entries_local, entries_global, names[here], addresses[here],
                        size, types[here], section_index[here])
    for i in absolute:
        _add_symbol(layout, strtab, entries_local, entries_global, names[i], addresses[i], 0, types[i], _SHN_ABS)

    symtab = layout.pack_sym(0, 0, 0, 0, 0) + b"".join(entries_local) + b"".join(entries_global)
    first_global = 1 + len(entries_local)
    symtab_index = len(headers)
    names_symtab, names_strtab, names_shstrtab = shstr.add(".symtab"), shstr.add(".strtab"), shstr.add(".shstrtab")
    offset = layout.ehdr.size
    blobs = [(symtab, names_symtab, _SHT_SYMTAB), (bytes(strtab.data), names_strtab, _SHT_STRTAB),
             (bytes(shstr.data), names_shstrtab, _SHT_STRTAB)]
    body = bytearray()
    for data, name, kind in blobs:
        at = offset + len(body)
        if kind == _SHT_SYMTAB:
            headers.append(layout.pack_shdr(name, kind, 0, 0, at, len(data), link=symtab_index + 1,
                                            info=first_global, align=8 if sixty_four else 4,
                                            entsize=layout.sym.size))
        else:
            headers.append(layout.pack_shdr(name, kind, 0, 0, at, len(data)))
        body += data
    body += b"\0" * (-len(body) % 8)
    shoff = offset + len(body)
    ident = b"\x7fELF" + bytes([2 if sixty_four else 1, 1, 1]) + b"\0" * 9
    machine = _EM_AARCH64 if aarch64 else _EM_X86_64 if sixty_four else _EM_386
    header = layout.ehdr.pack(ident, _ET_EXEC, machine, 1, 0, 0, shoff, 0,
                              layout.ehdr.size, 0, 0, layout.shdr.size, len(headers), len(headers) - 1)
    return header + bytes(body) + b"".join(headers)


def _sections(placed: list[int], addresses, types: str) -> list[list[int]]:
    """Cut address-sorted symbol indexes into runs of one class with no gap over ``MAX_GAP``."""
    runs: list[list[int]] = []
    previous_address, previous_code = None, None
    for i in placed:
        address, code = addresses[i], types[i] in _CODE
        if previous_address is None or code != previous_code or address - previous_address > MAX_GAP:
            runs.append([])
        runs[-1].append(i)
        previous_address, previous_code = address, code
    return runs


def _ends(runs: list[list[int]], addresses) -> list[int]:
    """Where each run's section ends: at the next run when it is near, else ``TAIL`` past its last symbol."""
    ends = []
    for run, following in zip(runs, runs[1:] + [None]):
        last = addresses[run[-1]]
        near = following is not None and addresses[following[0]] - last <= MAX_GAP
        ends.append(addresses[following[0]] if near else last + TAIL)
    return ends


def _add_symbol(layout, strtab, local, global_, name, value, size, kind, shndx) -> None:
    bind = _STB_LOCAL if kind.islower() else _STB_GLOBAL
    stype = _STT_NOTYPE if shndx == _SHN_ABS else _STT_FUNC if kind in _CODE else _STT_OBJECT
    entry = layout.pack_sym(strtab.add(name), value, size, (bind << 4) | stype, shndx)
    (local if bind == _STB_LOCAL else global_).append(entry)
