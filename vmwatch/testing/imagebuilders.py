"""Build small memory images of every format from the published layouts (for tests and demos).

Each builder returns the file's bytes. They write what the real producers write (see
``vmwatch/images/*`` docstrings for sources), including the quirks: VirtualBox's EI_VERSION 0
and NUL-less note name sizes, QEMU's 4-byte note alignment, VMware block pad lengths.
"""

from __future__ import annotations

import struct
from typing import Iterable, Mapping, Sequence

import attrs

# -- LiME -------------------------------------------------------------------------------------


def lime(ranges: Iterable[tuple[int, bytes]], *, version: int = 1) -> bytes:
    """[header + data] per (start, data); e_addr is inclusive."""
    out = bytearray()
    for start, data in ranges:
        out += struct.pack("<IIQQQ", 0x4C694D45, version, start, start + len(data) - 1, 0) + data
    return bytes(out)


# -- ELF cores --------------------------------------------------------------------------------


@attrs.frozen
class Load:
    paddr: int
    data: bytes
    memsz: int | None = None
    """Defaults to len(data); larger means a zero tail."""
    unstored: bool = False
    """Write p_offset = all ones and no data (QEMU's unstored range)."""


def elf_core(
    loads: Sequence[Load],
    notes: Sequence[tuple[str, int, bytes]],
    *,
    elf_class: int = 2,
    machine: int = 62,
    ident_version: int = 1,
    note_align: int = 4,
    namesz_has_nul: bool = True,
    xnum: bool = False,
) -> bytes:
    """An ELF CORE file: header, phdrs (PT_NOTE first), notes, then memory back to back."""
    ehdr_size, phdr_size, shdr_size = (64, 56, 64) if elf_class == 2 else (52, 32, 40)
    phnum = 1 + len(loads)
    note_blob = bytearray()
    for name, n_type, desc in notes:
        raw = name.encode() + b"\0"
        namesz = len(raw) if namesz_has_nul else len(raw) - 1
        note_blob += struct.pack("<III", namesz, len(desc), n_type)
        note_blob += raw.ljust(_align(len(raw), note_align), b"\0")
        note_blob += desc.ljust(_align(len(desc), note_align), b"\0")
    phoff = ehdr_size
    shoff = phoff + phnum * phdr_size if xnum else 0
    note_off = phoff + phnum * phdr_size + (shdr_size if xnum else 0)
    data_off = note_off + len(note_blob)
    ident = b"\x7fELF" + bytes([elf_class, 1, ident_version]) + bytes(9)
    e_phnum = 0xFFFF if xnum else phnum
    if elf_class == 2:
        ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, machine, ident_version, 0, phoff, shoff, 0,
                           ehdr_size, phdr_size, e_phnum, shdr_size, 1 if xnum else 0, 0)
    else:
        ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, 4, machine, ident_version, 0, phoff, shoff, 0,
                           ehdr_size, phdr_size, e_phnum, shdr_size, 1 if xnum else 0, 0)
    phdrs = [_phdr(elf_class, 4, note_off, 0, len(note_blob), len(note_blob))]
    body = bytearray()
    for load in loads:
        memsz = load.memsz if load.memsz is not None else len(load.data)
        if load.unstored:
            off = (1 << (64 if elf_class == 2 else 32)) - 1
            phdrs.append(_phdr(elf_class, 1, off, load.paddr, 0, memsz))
            continue
        phdrs.append(_phdr(elf_class, 1, data_off + len(body), load.paddr, len(load.data), memsz))
        body += load.data
    shdr = b""
    if xnum:
        shdr = (struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if elf_class == 2
                else struct.pack("<IIIIIIIIII", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
    return ehdr + b"".join(phdrs) + shdr + bytes(note_blob) + bytes(body)


def _phdr(elf_class: int, p_type: int, offset: int, paddr: int, filesz: int, memsz: int) -> bytes:
    if elf_class == 2:
        return struct.pack("<IIQQQQQQ", p_type, 0, offset, 0, paddr, filesz, memsz, 0)
    return struct.pack("<IIIIIIII", p_type, offset, 0, paddr, filesz, memsz, 0, 0)


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


_QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip


def qemu_cpu_state(regs: Mapping[str, int]) -> bytes:
    """QEMUCPUState v1 (432 bytes). Segments: ``cs`` etc. as selectors, ``*_base`` for bases."""
    out = bytearray(432)
    struct.pack_into("<II", out, 0, 1, 432)
    struct.pack_into("<16Q", out, 8, *(regs.get(r, 0) for r in _QEMU_GPRS))
    struct.pack_into("<QQ", out, 136, regs.get("rip", 0), regs.get("rflags", 0))
    for i, seg in enumerate(("cs", "ds", "es", "fs", "gs", "ss")):
        struct.pack_into("<IIIIQ", out, 152 + 24 * i, regs.get(seg, 0), 0xFFFFFFFF, 0, 0, regs.get(f"{seg}_base", 0))
    struct.pack_into("<IIIIQ", out, 344, 0, regs.get("gdtr_limit", 0), 0, 0, regs.get("gdtr_base", 0))
    struct.pack_into("<IIIIQ", out, 368, 0, regs.get("idtr_limit", 0), 0, 0, regs.get("idtr_base", 0))
    struct.pack_into("<5Q", out, 392, *(regs.get(f"cr{i}", 0) for i in range(5)))
    return bytes(out)


def prstatus64(regs: Mapping[str, int]) -> bytes:
    names = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
             "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base", "ds",
             "es", "fs", "gs")  # fmt: skip
    out = bytearray(336)
    struct.pack_into("<27Q", out, 112, *(regs.get(n, 0) for n in names))
    return bytes(out)


def prstatus32(regs: Mapping[str, int]) -> bytes:
    names = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax", "ds", "es", "fs", "gs", "orig_rax",
             "rip", "cs", "rflags", "rsp", "ss")  # fmt: skip
    out = bytearray(144)
    struct.pack_into("<17I", out, 72, *(regs.get(n, 0) & 0xFFFFFFFF for n in names))
    return bytes(out)


def qemu_elf(loads: Sequence[Load], cpus: Sequence[Mapping[str, int]] = ({},), *, elf_class: int = 2,
             machine: int = 62, vmcoreinfo: str | None = None, xnum: bool = False) -> bytes:
    """A QEMU dump-guest-memory file: CORE/NT_PRSTATUS per CPU, then QEMU/0 per CPU."""
    pr = prstatus64 if elf_class == 2 and machine == 62 else prstatus32
    notes = [("CORE", 1, pr(c)) for c in cpus] + [("QEMU", 0, qemu_cpu_state(c)) for c in cpus]
    if vmcoreinfo is not None:
        notes.append(("VMCOREINFO", 0, vmcoreinfo.encode()))
    return elf_core(loads, notes, elf_class=elf_class, machine=machine, xnum=xnum)


# -- VirtualBox -------------------------------------------------------------------------------

VBOX_CPU_SIZE = {0x00010005: 0x2240, 0x00010006: 0x2248}


def vbox_cpu(regs: Mapping[str, int], size: int = 0x2248) -> bytes:
    """DBGFCORECPU (format 5/6) with the fields vmwatch reads."""
    out = bytearray(size)
    gprs = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
            "r15", "rip", "rsp", "rbp", "rflags")  # fmt: skip
    struct.pack_into("<18Q", out, 0, *(regs.get(r, 0) for r in gprs))
    for seg, off in (("cs", 0x90), ("ds", 0xA8), ("es", 0xC0), ("fs", 0xD8), ("gs", 0xF0), ("ss", 0x108)):
        struct.pack_into("<QIIH", out, off, regs.get(f"{seg}_base", 0), 0xFFFFFFFF, regs.get(f"{seg}_attr", 0),
                         regs.get(seg, 0))
    struct.pack_into("<4Q", out, 0x120, *(regs.get(n, 0) for n in ("cr0", "cr2", "cr3", "cr4")))
    struct.pack_into("<QI", out, 0x180, regs.get("gdtr_base", 0), regs.get("gdtr_limit", 0))
    struct.pack_into("<QI", out, 0x190, regs.get("idtr_base", 0), regs.get("idtr_limit", 0))
    msrs = ("efer", "star", "pat", "lstar", "cstar", "sfmask", "kernel_gs_base", "apic_base")
    struct.pack_into("<8Q", out, 0x1E8, *(regs.get(m, 0) for m in msrs))
    return bytes(out)


def registers_dict(cpu) -> dict[str, int]:
    """The fields of a :class:`vmwatch.cpu.Registers` the builders take, to re-wrap a real image's
    CPU state in another format (segments as ``cs``/``cs_base``/``cs_attr``)."""
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
             "rip", "rsp", "rbp", "rflags", "cr0", "cr2", "cr3", "cr4", "gdtr_base", "gdtr_limit",
             "idtr_base", "idtr_limit", "kernel_gs_base", "efer")  # fmt: skip
    regs = {name: getattr(cpu, name) for name in names if getattr(cpu, name) is not None}
    for seg in ("cs", "ds", "es", "fs", "gs", "ss"):
        selector = getattr(cpu, seg)
        regs.update({seg: selector.selector, f"{seg}_base": selector.base, f"{seg}_attr": selector.attributes})
    return regs


def vbox_core(loads: Sequence[Load], cpus: Sequence[Mapping[str, int]] = ({},), *, fmt: int = 0x00010006,
              version: tuple[int, int, int] = (6, 1, 50), revision: int = 161033, n_cpus: int | None = None,
              magic: int = 0xC01AC0DE, namesz_has_nul: bool = False) -> bytes:
    """A VBoxManage dumpvmcore file: VBCORE descriptor + one VBCPU per CPU, 8-aligned notes.

    ``namesz_has_nul=True`` writes n_namesz as older VirtualBox releases did (counting the NUL).
    """
    vbox_version = version[0] << 24 | version[1] << 16 | version[2]
    desc = struct.pack("<6I", magic, fmt, 24, vbox_version, revision, len(cpus) if n_cpus is None else n_cpus)
    cpu_size = VBOX_CPU_SIZE.get(fmt, 0x2248)
    notes = [("VBCORE", 0xB00, desc)] + [("VBCPU", 0xB01, vbox_cpu(c, cpu_size)) for c in cpus]
    return elf_core(loads, notes, machine=62, ident_version=0, note_align=8, namesz_has_nul=namesz_has_nul)


# -- VMware -----------------------------------------------------------------------------------


@attrs.frozen
class Tag:
    name: str
    value: int | bytes
    indices: tuple[int, ...] = ()
    size: int = 4
    """Inline size for integer values."""
    block: bool = False
    compressed: bool = False
    pad: int = 0
    mem_size: int | None = None


def vmware(groups: Mapping[str, Sequence[Tag]], *, magic: int = 0xBED2BED2, version: int = 8) -> bytes:
    """A .vmss/.vmsn: header, group table, then each group's tag stream ending in a zero tag."""
    wide = magic & 0xF != 0
    table_end = 12 + 80 * len(groups)
    streams = []
    offset = table_end
    for name, tags in groups.items():
        stream = bytearray()
        for tag in tags:
            data = tag.value if isinstance(tag.value, bytes) else tag.value.to_bytes(tag.size, "little")
            valsize = (62 if tag.compressed else 63) if tag.block else len(data)
            if not tag.block and valsize >= 62:
                raise ValueError(f"inline tag {tag.name!r} too long: use block=True")
            tag_name = tag.name.encode()
            stream += bytes([valsize | len(tag.indices) << 6, len(tag_name)]) + tag_name
            stream += b"".join(struct.pack("<I", i) for i in tag.indices)
            if tag.block:
                mem = len(data) if tag.mem_size is None else tag.mem_size
                stream += struct.pack("<QQH" if wide else "<IIH", len(data), mem, tag.pad) + bytes(tag.pad)
            stream += data
        stream += b"\0\0"
        streams.append((name, offset, bytes(stream)))
        offset += len(stream)
    out = bytearray(struct.pack("<III", magic, version, len(groups)))
    for name, off, stream in streams:
        out += struct.pack("<64sQQ", name.encode(), off, len(stream))
    for _, _, stream in streams:
        out += stream
    return bytes(out)


def vmware_checkpoint(
    memory: bytes | None,
    *,
    regions: Sequence[tuple[int, int, int]] = (),
    cpus: Sequence[Mapping[str, int]] = (),
    config: str | None = None,
    png: bytes | None = None,
    magic: int = 0xBED2BED2,
    pad: int = 0,
    extra: Mapping[str, Sequence[Tag]] | None = None,
) -> bytes:
    """A typical checkpoint. ``regions`` are (regionPPN, regionPageNum, regionSize) in pages;
    ``memory=None`` leaves RAM to a companion .vmem (no Memory tag)."""
    groups: dict[str, list[Tag]] = {"Checkpoint": [Tag("fileversion", 10), Tag("ProductName", b"VMware Workstation".ljust(256, b"\0"), block=True)]}
    if cpus:
        cpu_tags = [Tag("cpu:numVCPUs", len(cpus))]
        for i, regs in enumerate(cpus):
            for reg in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                        "r11", "r12", "r13", "r14", "r15", "rip"):
                if reg in regs:
                    cpu_tags.append(Tag(reg, regs[reg], (i,), size=8))
            if "rflags" in regs:
                cpu_tags.append(Tag("eflags", regs["rflags"], (i,)))
            for n in (0, 2, 3, 4):
                if f"cr{n}" in regs:
                    cpu_tags.append(Tag("CR64", regs[f"cr{n}"], (i, n), size=8))
            if "idtr_base" in regs:
                cpu_tags += [Tag("IDTR", regs.get("idtr_limit", 0), (i, 0), size=2),
                             Tag("IDTR", regs["idtr_base"] & 0xFFFFFFFF, (i, 1)),
                             Tag("IDTR", regs["idtr_base"] >> 32, (i, 2))]
        groups["cpu"] = cpu_tags
    mem_tags: list[Tag] = [Tag("align_mask", 0xFFFF)]
    if regions:
        mem_tags.append(Tag("regionsCount", len(regions)))
        for i, (ppn, page_num, pages) in enumerate(regions):
            mem_tags += [Tag("regionPPN", ppn, (i,)), Tag("regionPageNum", page_num, (i,)),
                         Tag("regionSize", pages, (i,))]
    if memory is not None:
        mem_tags.append(Tag("Memory", memory, (0, 0), block=True, pad=pad))
    groups["memory"] = mem_tags
    if png is not None:
        groups["MKSVMX"] = [Tag("imageData", png, block=True)]
    if config is not None:
        groups["Snapshot"] = [Tag("cfgFile", config.encode(), block=True)]
    groups.update(extra or {})
    return vmware(groups, magic=magic)


# -- Windows crash dumps ----------------------------------------------------------------------


def windows_crashdump(runs: Sequence[tuple[int, bytes]], *, bits: int = 64, dtb: int = 0x1AD000,
                      dump_type: int = 1, header: bytes | None = None,
                      regs: Mapping[str, int] | None = None) -> bytes:
    """A full (1), bitmap (5) or kernel-bitmap (6) dump of (base page, page data) runs, ``PAGE``-filled
    as Windows does.

    ``header`` reuses a real header page(s) and rewrites only the fields set here.
    """
    runs = sorted(runs)
    size = 0x2000 if bits == 64 else 0x1000
    out = bytearray(header[:size]) if header is not None else bytearray(b"PAGE" * (size // 4))
    regs = regs or {}
    if bits == 64:
        out[0:8] = b"PAGEDU64"
        struct.pack_into("<Q", out, 0x10, dtb)
        struct.pack_into("<I", out, 0x30, 0x8664)
        total = sum(len(d) // 4096 for _, d in runs)
        struct.pack_into("<IIQ", out, 0x88, len(runs), 0, total)
        for i, (base, data) in enumerate(runs):
            struct.pack_into("<QQ", out, 0x98 + 16 * i, base, len(data) // 4096)
        struct.pack_into("<I", out, 0xF98, dump_type)
        ctx = 0x348
        struct.pack_into("<6H", out, ctx + 0x38, regs.get("cs", 0x10), 0x2B, 0x2B, 0x53, 0x2B, 0x18)
        struct.pack_into("<I", out, ctx + 0x44, regs.get("rflags", 0x202))
        names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")  # fmt: skip
        struct.pack_into("<17Q", out, ctx + 0x78, *(regs.get(n, 0) for n in names))
    else:
        out[0:8] = b"PAGEDUMP"
        struct.pack_into("<I", out, 0x10, dtb)
        struct.pack_into("<I", out, 0x20, 0x14C)
        total = sum(len(d) // 4096 for _, d in runs)
        struct.pack_into("<II", out, 0x64, len(runs), total)
        for i, (base, data) in enumerate(runs):
            struct.pack_into("<II", out, 0x6C + 8 * i, base, len(data) // 4096)
        struct.pack_into("<I", out, 0xF88, dump_type)
    if dump_type in (5, 6):
        max_page = max(base + len(d) // 4096 for base, d in runs)
        bitmap = bytearray((max_page + 7) // 8)
        for base, data in runs:
            for p in range(base, base + len(data) // 4096):
                bitmap[p // 8] |= 1 << (p % 8)
        first = _align(len(out) + 0x38 + len(bitmap), 4096)
        sub = bytearray(b"SDMPDUMP".ljust(0x38, b"\0"))
        struct.pack_into("<QQQ", sub, 0x20, first, total, max_page)
        out += sub + bitmap
        out += bytes(first - len(out))
    for _, data in runs:
        out += data
    return bytes(out)


def windows_triage_dump(*, bits: int = 64, build: int = 7601, dtb: int = 0x1AD000, kdbg_vaddr: int = 0,
                        drivers: Sequence[tuple[str, int, int]] = (), process: bytes | None = None,
                        thread: bytes | None = None, kdbg: bytes | None = None,
                        blocks: Sequence[tuple[int, bytes]] = (), stride: int | None = None,
                        overflowed: bool = False) -> bytes:
    """A triage (DumpType 4) dump as ntiodump.h lays it out: header, TRIAGE_DUMP, the driver list
    (``(saved name, base, size)``, entries ``stride`` bytes apart) with its string pool, the raw
    copies, the KDBG copy, and ``blocks`` of kernel memory saved by virtual address."""
    out = bytearray(windows_crashdump([(0, bytes(4096))], bits=bits, dtb=dtb, dump_type=4))
    size = 0x2000 if bits == 64 else 0x1000
    del out[size:]
    struct.pack_into("<II", out, 8, 15, build)
    struct.pack_into("<Q" if bits == 64 else "<I", out, 0x80 if bits == 64 else 0x60,
                     kdbg_vaddr if bits == 64 else kdbg_vaddr & 0xFFFFFFFF)
    stride = stride or (0xA8 if bits == 64 else 0x50)
    base_at, size_at, word = (0x38, 0x48, "<Q") if bits == 64 else (0x1C, 0x24, "<I")
    triage = size
    out += bytes(0x100)
    f: dict[str, int] = {}

    def put(data: bytes) -> int:
        out.extend(bytes(-len(out) % 8))
        at = len(out)
        out.extend(data)
        return at

    f["DriverListOffset"] = put(bytes(stride * len(drivers)))
    f["DriverCount"] = len(drivers)
    pool = len(out)
    f["StringPoolOffset"] = pool
    for i, (name, base, image_size) in enumerate(drivers):
        raw = name.encode("utf-16-le")
        at = put(struct.pack("<I", len(raw)) + raw + b"\0\0")
        entry = f["DriverListOffset"] + i * stride
        struct.pack_into("<I", out, entry, at)
        struct.pack_into(word, out, entry + base_at, base)
        struct.pack_into("<I", out, entry + size_at, image_size)
    f["StringPoolSize"] = len(out) - pool
    for key, data in (("ProcessOffset", process), ("ThreadOffset", thread)):
        if data is not None:
            f[key] = put(data)
    kd = put(kdbg) if kdbg is not None else 0
    table = [(vaddr, put(data), len(data)) for vaddr, data in blocks]
    blocks_at = put(b"".join(struct.pack("<QII", *b) for b in table)) if table else 0
    f["ValidOffset"] = put(b"DGRT")
    f["TriageOptions"] = 0x100 if overflowed else 0
    f["SizeOfDump"] = len(out)
    names = ("ServicePackBuild", "SizeOfDump", "ValidOffset", "ContextOffset", "ExceptionOffset", "MmOffset",
             "UnloadedDriversOffset", "PrcbOffset", "ProcessOffset", "ThreadOffset", "CallStackOffset",
             "SizeOfCallStack", "DriverListOffset", "DriverCount", "StringPoolOffset", "StringPoolSize",
             "BrokenDriverOffset", "TriageOptions")
    struct.pack_into("<18I", out, triage, *(f.get(n, 0) for n in names))
    tail = (kd, len(kdbg or b""), blocks_at, len(table))
    if bits == 64:
        struct.pack_into("<IIIIII", out, triage + 0x68, 0, 0, *tail)
    else:
        struct.pack_into("<IIIIII", out, triage + 0x50, 0, 0, *tail)
    return bytes(out)
