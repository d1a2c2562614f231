"""QEMU ``dump-guest-memory`` ELF cores (ELF64 or ELF32; x86-64, i386 or aarch64), and other ELF cores.

Sources: QEMU ``dump/dump.c``, ``target/i386/arch_dump.c``, ``target/arm/arch_dump.c``,
``include/sysemu/dump.h``. An aarch64 dump has per CPU only NT_PRSTATUS (x0..x30, sp, pc, pstate),
NT_PRFPREG and NT_ARM_SVE: no system registers, so no TTBR1_EL1/TCR_EL1 (the Linux layer finds
the kernel's tables by scanning, vmwatch.os.linux.swapper).
Notes come per CPU as ``CORE``/NT_PRSTATUS, then per CPU ``QEMU``/0 (QEMUCPUState: the full
register file with control registers, segments, GDT/IDT), then an optional ``VMCOREINFO``.
With ``paging=true`` QEMU writes one PT_LOAD per virtual mapping, so physical ranges repeat;
they all point into the same file bytes, so consistent overlaps are merged.
"""

from __future__ import annotations

import os
import struct

from vmwatch.cpu import Registers, Segment
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.images import _elf
from vmwatch.images.base import Image, Reader, Run, map_file

NT_PRSTATUS = 1
_QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
_QEMU_SEGS = ("cs", "ds", "es", "fs", "gs", "ss")
_QEMU_SEG = struct.Struct("<IIIIQ")  # selector, limit, flags, pad, base
_PRSTATUS64 = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
               "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base",
               "gs_base", "ds", "es", "fs", "gs")  # fmt: skip
_PRSTATUS32 = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax", "ds", "es", "fs", "gs", "orig_rax",
               "rip", "cs", "rflags", "rsp", "ss")  # fmt: skip


class QemuElfImage(Image):
    """A QEMU guest-memory dump (format ``qemu-elf``), or any other ELF core (``elf-core``: other
    producers, and QEMU's aarch64 dumps, which carry no ``QEMU`` note)."""

    def __init__(self, path: str | os.PathLike) -> None:
        data, _ = map_file(path)
        try:
            r = Reader(data, str(path))
            core = _elf.parse_core(r)
            runs = merge_consistent(_elf.load_runs(core, r))
            notes = list(_elf.iter_notes(r, core, align=4, namesz_has_nul=True))
        except BaseException:
            data.close()
            raise
        prstatus = [n for n in notes if n.name == "CORE" and n.type == NT_PRSTATUS]
        qemu = [n for n in notes if n.name == "QEMU"]
        self.format = "qemu-elf" if qemu else "elf-core"
        cpus = []
        if core.machine == _elf.EM_AARCH64:
            cpus = [registers_from_aarch64_prstatus(n.desc, i) for i, n in enumerate(prstatus)]
            cpus = [c for c in cpus if c is not None]
        elif core.machine in _elf.MACHINES:
            cpus = [registers_from_qemu_note(n.desc, i) for i, n in enumerate(qemu)]
            if not cpus:
                cpus = [registers_from_prstatus(n.desc, i) for i, n in enumerate(prstatus)]
            cpus = [c for c in cpus if c is not None]
        vmcoreinfo = next((n.desc.decode("latin-1").rstrip("\0") for n in notes if n.name == "VMCOREINFO"), None)
        metadata = {
            "elf_class": 64 if core.elf_class == 2 else 32,
            "machine": _elf.MACHINES.get(core.machine, str(core.machine)),
            "segments": sum(1 for s in core.segments if s.type == _elf.PT_LOAD),
            "notes": [f"{n.name}/{n.type}" for n in notes],
        }
        if vmcoreinfo is not None:
            metadata["vmcoreinfo"] = vmcoreinfo
        super().__init__(path, data=data, runs=runs, cpus=cpus, metadata=metadata)

    def summary(self) -> list[tuple[str, str]]:
        m = self.metadata
        return [("ELF", f"ELF{m['elf_class']} core, machine {m['machine']}"),
                ("PT_LOAD segments", str(m["segments"])), ("CPUs", str(len(self.cpus)))]


def merge_consistent(runs: list[Run]) -> list[Run]:
    """Merge overlapping runs that map paddr to file offset with the same delta.

    Inconsistent overlaps are kept apart so validation rejects them.
    """
    out: list[Run] = []
    for run in sorted(runs, key=lambda r: (r.start, r.size)):
        if out:
            last = out[-1]
            same_delta = (run.file_offset is None and last.file_offset is None) or (
                run.file_offset is not None and last.file_offset is not None
                and run.file_offset - run.start == last.file_offset - last.start)
            if same_delta and run.start < last.end:
                if run.end > last.end:
                    out[-1] = Run(last.start, run.end - last.start, last.file_offset)
                continue
        out.append(run)
    return out


def registers_from_qemu_note(desc: bytes, vcpu: int) -> Registers | None:
    """Decode QEMUCPUState (v1, 432 bytes; 440 adds kernel_gs_base); ``None`` if too short."""
    if len(desc) < 432:
        return None
    gprs = struct.unpack_from("<16Q", desc, 8)
    rip, rflags = struct.unpack_from("<QQ", desc, 136)
    segs = {}
    for i, name in enumerate(_QEMU_SEGS):
        sel, limit, flags, _, base = _QEMU_SEG.unpack_from(desc, 152 + 24 * i)
        segs[name] = Segment(selector=sel, base=base, limit=limit, attributes=flags)
    _, gdt_limit, _, _, gdt_base = _QEMU_SEG.unpack_from(desc, 344)
    _, idt_limit, _, _, idt_base = _QEMU_SEG.unpack_from(desc, 368)
    cr0, _, cr2, cr3, cr4 = struct.unpack_from("<5Q", desc, 392)
    size = struct.unpack_from("<I", desc, 4)[0]
    kgs = struct.unpack_from("<Q", desc, 432)[0] if size >= 440 and len(desc) >= 440 else None
    return Registers(
        vcpu=vcpu, **dict(zip(_QEMU_GPRS, gprs)), rip=rip, rflags=rflags, **segs,
        fs_base=segs["fs"].base, gs_base=segs["gs"].base, kernel_gs_base=kgs,
        cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4,
        gdtr_base=gdt_base, gdtr_limit=gdt_limit, idtr_base=idt_base, idtr_limit=idt_limit)


def registers_from_prstatus(desc: bytes, vcpu: int) -> Registers | None:
    """General registers from NT_PRSTATUS (x86-64: 336 bytes, regs at 112; i386: 144, at 72)."""
    if len(desc) >= 336:
        values = dict(zip(_PRSTATUS64, struct.unpack_from("<27Q", desc, 112)))
    elif len(desc) >= 144:
        values = dict(zip(_PRSTATUS32, struct.unpack_from("<17I", desc, 72)))
    else:
        return None
    values.pop("orig_rax")
    segs = {name: Segment(selector=values.pop(name)) for name in _QEMU_SEGS}
    return Registers(vcpu=vcpu, **values, **segs)


def registers_from_aarch64_prstatus(desc: bytes, vcpu: int) -> Aarch64Registers | None:
    """x0..x30, sp, pc, pstate from an aarch64 NT_PRSTATUS (392 bytes, user_pt_regs at 112)."""
    if len(desc) < 112 + 34 * 8:
        return None
    values = struct.unpack_from("<34Q", desc, 112)
    return Aarch64Registers(vcpu=vcpu, x=values[:31], sp=values[31], pc=values[32], pstate=values[33])
