"""VirtualBox ELF64 cores (``VBoxManage debugvm dumpvmcore``).

Sources: VirtualBox ``include/VBox/vmm/dbgfcorefmt.h`` and ``VMMR3/DBGFCoreWrite.cpp``. The file
is an ELF64 CORE (EI_VERSION left 0) with one PT_NOTE, one PT_LOAD per guest-physical range
(MMIO ranges have p_filesz 0), a ``VBCORE`` note (DBGFCOREDESCRIPTOR) and one ``VBCPU`` note
(DBGFCORECPU) per vCPU. Notes are 8-byte aligned and ``n_namesz`` excludes the NUL.
Registers are decoded for format versions 5 and 6, whose DBGFCORECPU layout is stable; version
0x00010000 stored the raw internal CPUMCTX, so only memory is exposed for older files.
"""

from __future__ import annotations

import os
import struct

from vmwatch.cpu import Registers, Segment
from vmwatch.images import _elf
from vmwatch.images.base import Image, Reader, map_file

VBCORE_MAGIC = 0xC01AC0DE
NT_VBOXCORE = 0xB00
NT_VBOXCPU = 0xB01
_DESCRIPTOR = struct.Struct("<6I")
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip", "rsp", "rbp", "rflags")  # fmt: skip
_SEGS = (("cs", 0x90), ("ds", 0xA8), ("es", 0xC0), ("fs", 0xD8), ("gs", 0xF0), ("ss", 0x108))
_SEL = struct.Struct("<QIIH")  # base, limit, attr, sel
_MSRS = ("efer", "star", "pat", "lstar", "cstar", "sfmask", "kernel_gs_base", "apic_base")
CPU_MIN_SIZE = 0x228


def is_vbox_core(r: Reader) -> bool:
    """Cheap check used by detection: an ELF core with a VBCORE note."""
    try:
        core = _elf.parse_core(r)
        return any(n.name == "VBCORE" for n in _elf.iter_notes(r, core, align=8, namesz_has_nul=False))
    except Exception:  # noqa: BLE001 - detection only; the real parse reports the error
        return False


class VBoxImage(Image):
    """A VirtualBox core dump (format ``vbox-elf``)."""

    format = "vbox-elf"

    def __init__(self, path: str | os.PathLike) -> None:
        data, _ = map_file(path)
        try:
            r = Reader(data, str(path))
            core = _elf.parse_core(r)
            if core.elf_class != 2:
                raise r.error("VirtualBox cores are ELF64", 4)
            runs = _elf.load_runs(core, r)
            notes = list(_elf.iter_notes(r, core, align=8, namesz_has_nul=False))
            desc_note = next((n for n in notes if n.name == "VBCORE"), None)
            if desc_note is None or len(desc_note.desc) < _DESCRIPTOR.size:
                raise r.error("no VBCORE note with a DBGFCOREDESCRIPTOR")
            magic, fmt, cb_self, vbox_version, revision, n_cpus = _DESCRIPTOR.unpack_from(desc_note.desc)
            if magic != VBCORE_MAGIC:
                raise r.error(f"bad VBCORE magic {magic:#x} (expected {VBCORE_MAGIC:#x})", desc_note.offset)
            cpu_notes = [n for n in notes if n.name == "VBCPU" and n.type == NT_VBOXCPU]
            if len(cpu_notes) != n_cpus:
                raise r.error(f"VBCORE says {n_cpus} CPUs but there are {len(cpu_notes)} VBCPU notes",
                              desc_note.offset)
            cpus = []
            if fmt >= 0x00010005:
                cpus = [registers_from_vbcpu(n.desc, i) for i, n in enumerate(cpu_notes)]
                if None in cpus:
                    raise r.error(f"VBCPU note shorter than {CPU_MIN_SIZE:#x} bytes")
        except BaseException:
            data.close()
            raise
        major, minor, build = vbox_version >> 24, (vbox_version >> 16) & 0xFF, vbox_version & 0xFFFF
        metadata = {
            "magic": magic, "format_version": fmt, "descriptor_size": cb_self,
            "vbox_version": f"{major}.{minor}.{build}", "vbox_revision": revision, "cpu_count": n_cpus,
            "machine": _elf.MACHINES.get(core.machine, str(core.machine)),
            "registers_decoded": bool(cpus),
            "segments": [{"file_offset": s.offset, "start": s.paddr, "size": s.memsz, "file_size": s.filesz}
                         for s in core.segments if s.type == _elf.PT_LOAD],
        }
        super().__init__(path, data=data, runs=runs, cpus=cpus, metadata=metadata)

    def summary(self) -> list[tuple[str, str]]:
        m = self.metadata
        return [("Magic", f"{m['magic']:#x}"), ("Format", f"{m['format_version']:#x}"),
                ("Version", f"VirtualBox {m['vbox_version']} (revision {m['vbox_revision']})"),
                ("CPUs", str(m["cpu_count"]))]


def registers_from_vbcpu(desc: bytes, vcpu: int) -> Registers | None:
    """Decode DBGFCORECPU (format versions 5 and 6 share the part read here)."""
    if len(desc) < CPU_MIN_SIZE:
        return None
    values = dict(zip(_GPRS, struct.unpack_from("<18Q", desc, 0)))
    segs = {}
    for name, off in _SEGS:
        base, limit, attr, sel = _SEL.unpack_from(desc, off)
        segs[name] = Segment(selector=sel, base=base, limit=limit, attributes=attr)
    cr0, cr2, cr3, cr4 = struct.unpack_from("<4Q", desc, 0x120)
    gdtr_base, gdtr_limit = struct.unpack_from("<QI", desc, 0x180)
    idtr_base, idtr_limit = struct.unpack_from("<QI", desc, 0x190)
    sysenter = struct.unpack_from("<3Q", desc, 0x1D0)
    msrs = dict(zip(_MSRS, struct.unpack_from("<8Q", desc, 0x1E8)))
    efer = msrs.pop("efer")
    kgs = msrs.pop("kernel_gs_base")
    msrs.update(sysenter_cs=sysenter[0], sysenter_eip=sysenter[1], sysenter_esp=sysenter[2])
    return Registers(vcpu=vcpu, **values, **segs, fs_base=segs["fs"].base, gs_base=segs["gs"].base,
                     kernel_gs_base=kgs, cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4, efer=efer,
                     gdtr_base=gdtr_base, gdtr_limit=gdtr_limit, idtr_base=idtr_base,
                     idtr_limit=idtr_limit, msrs=msrs)
