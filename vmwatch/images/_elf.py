"""ELF core-file plumbing shared by the QEMU and VirtualBox readers.

Theory of operation: both producers write an ELF CORE file whose PT_LOAD segments carry guest
physical memory (``p_paddr``) and whose PT_NOTE segment carries CPU state. They differ in note
padding (QEMU: 4-byte aligned, ``n_namesz`` counts the NUL, as the ELF spec says; VirtualBox:
8-byte aligned, ``n_namesz`` excludes the NUL) and in which notes they write. With 0xFFFF or
more segments ``e_phnum`` is PN_XNUM (0xFFFF) and section 0's ``sh_info`` has the real count
(System V gABI, "Extended Program Header Numbering").
"""

from __future__ import annotations

import struct
from typing import Iterator

import attrs

from vmwatch.images.base import Reader, Run

ELF_MAGIC = b"\x7fELF"
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
MACHINES = {EM_386: "i386", EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}

_EHDR = {
    1: struct.Struct("<16sHHIIIIIHHHHHH"),  # ELF32
    2: struct.Struct("<16sHHIQQQIHHHHHH"),  # ELF64
}
_PHDR = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}
_SHDR = {1: struct.Struct("<IIIIIIIIII"), 2: struct.Struct("<IIQQQQIIQQ")}
_NHDR = struct.Struct("<III")
UNSTORED = {1: 0xFFFFFFFF, 2: 0xFFFFFFFFFFFFFFFF}


@attrs.frozen
class Segment:
    """One program header."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@attrs.frozen
class Note:
    """One ELF note with where its descriptor sits in the file."""

    name: str
    type: int
    desc: bytes
    offset: int


@attrs.frozen
class ElfCore:
    elf_class: int
    """1 = ELF32, 2 = ELF64."""
    ident_version: int
    machine: int
    segments: tuple[Segment, ...]


def parse_core(r: Reader) -> ElfCore:
    """Parse the ELF header and the program headers of a little-endian core file.

    Raises:
        ImageFormatError: not ELF, not a little-endian core, or headers outside the file.
    """
    ident = r.bytes(0, 16, "ELF identification")
    if ident[:4] != ELF_MAGIC:
        raise r.error("not an ELF file", 0)
    elf_class, data = ident[4], ident[5]
    if elf_class not in _EHDR:
        raise r.error(f"bad ELF class {elf_class}", 4)
    if data != 1:
        raise r.error("big-endian ELF cores are not supported", 5)
    (_, e_type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, _, _) = r.unpack(
        _EHDR[elf_class], 0, "ELF header")
    if e_type != ET_CORE:
        raise r.error(f"ELF type {e_type} is not a core file", 16)
    phdr = _PHDR[elf_class]
    if phnum and phentsize != phdr.size:
        raise r.error(f"program header size {phentsize} (expected {phdr.size})", 16)
    if phnum == PN_XNUM:
        shdr = _SHDR[elf_class]
        if not shoff or shentsize != shdr.size:
            raise r.error("e_phnum is PN_XNUM but there is no section 0 to hold the count", 16)
        phnum = r.unpack(shdr, shoff, "section header 0")[7]  # sh_info
    r.need(phoff, phnum * phdr.size, f"{phnum} program headers")
    segments = []
    for i in range(phnum):
        fields = r.unpack(phdr, phoff + i * phdr.size)
        if elf_class == 2:
            p_type, _, off, vaddr, paddr, filesz, memsz, _ = fields
        else:
            p_type, off, vaddr, paddr, filesz, memsz, _, _ = fields
        segments.append(Segment(p_type, off, vaddr, paddr, filesz, memsz))
    return ElfCore(elf_class, ident[6], machine, tuple(segments))


def load_runs(core: ElfCore, r: Reader) -> list[Run]:
    """PT_LOAD segments as runs: file-backed bytes, then a zero run for any p_memsz tail.

    Segments the producer could not store (p_offset all ones, no file bytes) are left unmapped.
    """
    runs = []
    unstored = UNSTORED[core.elf_class]
    for seg in core.segments:
        if seg.type != PT_LOAD:
            continue
        if seg.filesz > seg.memsz:
            raise r.error(f"PT_LOAD at {seg.paddr:#x} has p_filesz > p_memsz", seg.offset)
        if seg.offset == unstored:
            continue
        runs.append(Run(seg.paddr, seg.filesz, seg.offset))
        if seg.memsz > seg.filesz:
            runs.append(Run(seg.paddr + seg.filesz, seg.memsz - seg.filesz, None))
    return runs


def iter_notes(r: Reader, core: ElfCore, *, align: int, namesz_has_nul: bool) -> Iterator[Note]:
    """Every note of every PT_NOTE segment."""
    for seg in core.segments:
        if seg.type != PT_NOTE:
            continue
        r.need(seg.offset, seg.filesz, "PT_NOTE segment")
        pos, end = seg.offset, seg.offset + seg.filesz
        while pos + _NHDR.size <= end:
            namesz, descsz, n_type = r.unpack(_NHDR, pos, "note header")
            stored_name = namesz if namesz_has_nul else namesz + 1
            name_off = pos + _NHDR.size
            desc_off = name_off + _align(stored_name, align)
            next_pos = desc_off + _align(descsz, align)
            if next_pos > end:
                raise r.error("note runs past the end of its PT_NOTE segment", pos)
            name = r.bytes(name_off, namesz, "note name").split(b"\0", 1)[0].decode("latin-1")
            yield Note(name, n_type, r.bytes(desc_off, descsz, "note"), desc_off)
            pos = next_pos


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)
