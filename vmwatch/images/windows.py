"""Windows crash dumps (``PAGEDUMP`` / ``PAGEDU64``): full, bitmap, kernel-bitmap and triage dumps.

Layout (public ``_DUMP_HEADER32``/``_DUMP_HEADER64``, as read by Volatility 3 and memflow's
coredump connector): the header is one page (32-bit) or two (64-bit). PhysicalMemoryBlock
lists the physical runs (BasePage, PageCount). DumpType 1 (full): the pages of every run follow
the header, run after run. DumpType 5 (bitmap): an ``SDMP``/``FDMP`` header follows; a set bit
``i`` in its bitmap means physical page ``i`` is stored, in order, from its first-page offset;
DumpType 6 (kernel memory, Windows 8+) has the same bitmap header, with kernel pages only.
DumpType 4 (triage) holds no physical memory: its saved pieces are read by windows_triage.py.
A 32-bit dump (``PAGEDUMP``) has the same kinds: a one-page header (PaeEnabled at 0x5C says
which paging its DirectoryTableBase is for), then the runs or the same bitmap header at 0x1000.
Refused, each with what to take instead (REFUSED): the legacy DumpType 2 (summary: the "kernel
memory dump" of Windows XP to 7, whose older _SUMMARY_DUMP bitmap header no public reader
parses: Volatility 3 and Ghidra refuse it too, and no sample exists to check a reader on) and
DumpType 3 (header only: no memory at all).
"""

from __future__ import annotations

import os
import re
import struct

import attrs

from vmwatch.cpu import Registers, Segment
from vmwatch.images.base import Image, Reader, Run, map_file
from vmwatch.images.windows_triage import Triage, parse_triage

PAGE = 4096
FULL = 1
TRIAGE = 4
BITMAPS = (5, 6)
_DUMP_TYPES = {1: "full", 2: "summary (legacy kernel)", 3: "header only", 4: "triage", 5: "bitmap",
               6: "bitmap (kernel)"}
_TAKE_INSTEAD = ("take a complete memory dump (Startup and Recovery: 'Complete memory dump'; on Windows 8+ "
                 "also 'Kernel memory dump', written as a bitmap dump), a small memory dump, or a raw image of RAM")
REFUSED = {
    2: "a legacy summary (kernel memory) dump of Windows XP to 7: its page bitmap header is not read "
       "(no public layout to check it against; Volatility 3 refuses it too)",
    3: "a header-only dump: it holds no memory",
}
MAX_RUNS = 4096
MAX_BITMAP_RUNS = 1 << 21
_FILLER = {32: 0x45474150, 64: 0x4547415045474150}
"""``PAGE`` (u32 and u64): Windows fills the header with it before writing the fields it knows."""
_BITMAP_STRETCHES = re.compile(rb"\x00+|\xff+|[\x01-\xfe]")


@attrs.frozen
class Header:
    """The facts of a crash-dump header that the reader and ``vmwatch info`` use."""

    bits: int
    major: int
    minor: int
    dtb: int
    machine: int | None
    processors: int | None
    bugcheck: int | None
    kdbg: int | None
    dump_type: int
    header_size: int
    runs: tuple[tuple[int, int], ...]
    """(BasePage, PageCount) pairs from PhysicalMemoryBlock."""
    pae: bool = False
    bugcheck_parameters: tuple[int, ...] = ()
    ps_loaded_module_list: int | None = None
    ps_active_process_head: int | None = None
    pfn_database: int | None = None


def _set(value: int, bits: int = 32) -> int | None:
    """A ``bits``-wide header field, or None when Windows left its ``PAGE`` filler there (never
    written). A 64-bit field holding only the u32 filler is a value: it is not the filler."""
    return None if value == _FILLER[bits] else value


def parse_header(r: Reader) -> Header:
    """Parse the fixed header; does not look at page data.

    Offsets of _DUMP_HEADER64 / _DUMP_HEADER32 (Volatility 2's crash_vtypes, MoonSols' dmp.h):
    DirectoryTableBase, PfnDataBase, PsLoadedModuleList, PsActiveProcessHead, MachineImageType,
    NumberProcessors, BugCheckCode and its four parameters, KdDebuggerDataBlock.
    """
    sig = r.bytes(0, 8, "crash dump signature")
    if sig == b"PAGEDU64":
        r.need(0, 0x2000, "64-bit dump header")
        major, minor, dtb, pfn, modules, processes = struct.unpack_from("<IIQQQQ", r.buf, 0x8)
        machine, cpus, bugcheck = struct.unpack_from("<III", r.buf, 0x30)
        params = struct.unpack_from("<4Q", r.buf, 0x40)
        kdbg = r.u64(0x80)
        n_runs = r.u32(0x88)
        dump_type = r.u32(0xF98)
        if n_runs > MAX_RUNS or 0x98 + n_runs * 16 > 0x2000:
            raise r.error(f"absurd NumberOfRuns {n_runs}", 0x88)
        runs = tuple(struct.unpack_from("<QQ", r.buf, 0x98 + 16 * i) for i in range(n_runs))
        pae = False
        size = 0x2000
    elif sig == b"PAGEDUMP":
        r.need(0, 0x1000, "32-bit dump header")
        major, minor, dtb, pfn, modules, processes = struct.unpack_from("<6I", r.buf, 0x8)
        machine, cpus, bugcheck = struct.unpack_from("<III", r.buf, 0x20)
        params = struct.unpack_from("<4I", r.buf, 0x2C)
        pae = r.buf[0x5C] == 1
        kdbg = r.u32(0x60)
        n_runs = r.u32(0x64)
        dump_type = r.u32(0xF88)
        if n_runs > MAX_RUNS or 0x6C + n_runs * 8 > 0x1000:
            raise r.error(f"absurd NumberOfRuns {n_runs}", 0x64)
        runs = tuple(struct.unpack_from("<II", r.buf, 0x6C + 8 * i) for i in range(n_runs))
        size = 0x1000
    else:
        raise r.error(f"bad crash dump signature {sig!r}", 0)
    bits = 64 if size == 0x2000 else 32

    def wide(value: int) -> int | None:  # the pointer-sized fields
        return _set(value, bits)

    return Header(bits, major, minor, dtb, _set(machine), _set(cpus), _set(bugcheck), wide(kdbg), dump_type,
                  size, runs, pae, tuple(map(wide, params)), wide(modules), wide(processes), wide(pfn))


class CrashDumpImage(Image):
    """A Windows full or bitmap crash dump (format ``windows-crashdump``)."""

    format = "windows-crashdump"

    def __init__(self, path: str | os.PathLike) -> None:
        data, _ = map_file(path)
        try:
            r = Reader(data, str(path))
            hdr = parse_header(r)
            triage = None
            if hdr.dump_type == FULL:
                runs = full_runs(hdr)
            elif hdr.dump_type in BITMAPS:
                runs = bitmap_runs(r, hdr.header_size)
            elif hdr.dump_type == TRIAGE:
                runs = []
                triage = parse_triage(r, hdr.bits, hdr.header_size)
            else:
                what = REFUSED.get(hdr.dump_type, f"an unknown kind of crash dump (DumpType {hdr.dump_type})")
                raise r.error(f"DumpType {hdr.dump_type} is {what}: {_TAKE_INSTEAD}",
                              0xF98 if hdr.bits == 64 else 0xF88)
            cpus = [context_registers(r, hdr)]
        except BaseException:
            data.close()
            raise
        self.header = hdr
        self.triage: Triage | None = triage
        """What a triage dump holds (drivers, the current process, KDBG copy); None for other dumps."""
        metadata = {
            "bits": hdr.bits, "version": f"{hdr.major}.{hdr.minor}", "dump_type": _DUMP_TYPES.get(hdr.dump_type),
            "directory_table_base": hdr.dtb, "machine": hdr.machine, "processors": hdr.processors,
            "bugcheck_code": hdr.bugcheck, "bugcheck_parameters": list(hdr.bugcheck_parameters),
            "kd_debugger_data_block": hdr.kdbg, "pae": hdr.pae, "ps_loaded_module_list": hdr.ps_loaded_module_list,
            "ps_active_process_head": hdr.ps_active_process_head, "pfn_database": hdr.pfn_database,
        }
        if self.triage is not None:
            t = self.triage
            metadata.update(triage_drivers=len(t.drivers), triage_driver_list_cut=t.overflowed,
                            triage_process=t.process is not None, triage_thread=t.thread is not None,
                            triage_kdbg=t.kdbg is not None, triage_memory_blocks=len(t.blocks))
        super().__init__(path, data=data, runs=runs, cpus=cpus, metadata=metadata)

    def summary(self) -> list[tuple[str, str]]:
        h = self.header
        rows = [("Signature", "PAGEDU64" if h.bits == 64 else "PAGEDUMP"),
                ("Version", f"{h.major}.{h.minor} (build {h.minor})"), ("DumpType", _DUMP_TYPES.get(h.dump_type, "?")),
                ("DirectoryTableBase", f"{h.dtb:#x}"), ("KdDebuggerDataBlock", _hex(h.kdbg)),
                ("PsActiveProcessHead", _hex(h.ps_active_process_head)),
                ("PsLoadedModuleList", _hex(h.ps_loaded_module_list)),
                ("Processors", "-" if h.processors is None else str(h.processors)),
                ("Machine", _hex(h.machine))]
        if h.bits == 32:
            rows.append(("PaeEnabled", f"{int(h.pae)} ({'PAE' if h.pae else '32-bit'} paging)"))
        if self.triage is not None:
            t = self.triage
            saved = [what for what, there in (("current process", t.process), ("thread", t.thread),
                                              ("KPRCB", t.prcb), ("KDBG", t.kdbg)) if there is not None]
            rows.append(("Triage", f"{len(t.drivers)} drivers{' (list cut short)' if t.overflowed else ''}, "
                                   f"{len(t.blocks)} memory blocks, {', '.join(saved) or 'no structures'}; "
                                   "no physical memory"))
        if h.bugcheck is not None:
            params = ", ".join(_hex(p) for p in h.bugcheck_parameters)
            rows.append(("BugCheck", f"{h.bugcheck:#010x} ({params})"))
        return rows


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def full_runs(hdr: Header) -> list[Run]:
    runs, offset = [], hdr.header_size
    for base, count in hdr.runs:
        runs.append(Run(base * PAGE, count * PAGE, offset))
        offset += count * PAGE
    return runs


def bitmap_runs(r: Reader, at: int) -> list[Run]:
    """Runs from the SDMP/FDMP bitmap: each maximal stretch of set bits is one run."""
    sig = r.bytes(at, 4, "bitmap header")
    if sig not in (b"SDMP", b"FDMP"):
        raise r.error(f"bad bitmap dump header {sig!r}", at)
    first_page = r.u64(at + 0x20)
    bits = r.u64(at + 0x30)
    r.need(at + 0x38, (bits + 7) // 8, "page bitmap")
    bitmap = r.buf[at + 0x38:at + 0x38 + (bits + 7) // 8]
    if bits % 8:  # clear the bits past the end so they cannot count as pages
        bitmap = bitmap[:-1] + bytes([bitmap[-1] & ((1 << (bits % 8)) - 1)])
    runs: list[Run] = []
    offset, run_start = first_page, None

    def edge(page: int, on: bool) -> None:
        nonlocal offset, run_start
        if on and run_start is None:
            run_start = page
        elif not on and run_start is not None:
            if len(runs) >= MAX_BITMAP_RUNS:
                raise r.error(f"more than {MAX_BITMAP_RUNS} runs in the page bitmap: absurd", at + 0x38)
            runs.append(Run(run_start * PAGE, (page - run_start) * PAGE, offset))
            offset += (page - run_start) * PAGE
            run_start = None

    # Whole stretches of 0x00 / 0xFF bytes (the common case) are one regex match each.
    for match in _BITMAP_STRETCHES.finditer(bitmap):
        page = match.start() * 8
        first = match.group()[0]
        if first in (0, 0xFF):
            edge(page, first == 0xFF)
        else:
            for b in range(8):
                edge(page + b, bool(first >> b & 1))
    edge(len(bitmap) * 8, False)
    return runs


def context_registers(r: Reader, hdr: Header) -> Registers:
    """The bugchecking CPU's CONTEXT record, plus CR3 from DirectoryTableBase."""
    if hdr.bits == 64:
        ctx = 0x348
        cs, ds, es, fs, gs, ss = struct.unpack_from("<6H", r.buf, ctx + 0x38)
        rflags = r.u32(ctx + 0x44)
        names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")  # fmt: skip
        gprs = dict(zip(names, struct.unpack_from("<17Q", r.buf, ctx + 0x78)))
    else:
        ctx = 0x320
        gs, fs, es, ds = struct.unpack_from("<4I", r.buf, ctx + 0x8C)
        edi, esi, ebx, edx, ecx, eax, ebp, eip, cs, rflags, esp, ss = struct.unpack_from("<12I", r.buf, ctx + 0x9C)
        gprs = dict(rax=eax, rbx=ebx, rcx=ecx, rdx=edx, rsi=esi, rdi=edi, rbp=ebp, rsp=esp, rip=eip)
    segs = {n: Segment(selector=v & 0xFFFF) for n, v in zip(("cs", "ds", "es", "fs", "gs", "ss"), (cs, ds, es, fs, gs, ss))}
    return Registers(vcpu=0, **gprs, rflags=rflags, cr3=hdr.dtb, **segs)
