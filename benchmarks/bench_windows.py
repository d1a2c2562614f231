"""Windows discovery on a multi-GB sparse image, and ``vmwatch ps`` vs Volatility 3 windows.pslist.

Builds the Windows test guest around the real ntoskrnl.exe (Debian libwine, fetched once into
the vmwatch cache as tests/windows/conftest.py does), moves its 64 MiB to the top of a sparse raw
image of --gib GiB (page tables and DTBs moved with it, a hole below), and times:

1. discovery with no CPU state, in-process, each step apart: the upward MZ scan for ntoskrnl,
   the KDBG scan, the System-EPROCESS scan for the DTB, and ``Windows.from_memory`` whole; then
   with CR3 and IDTR (the scan down from the IDT handler); and the pool scan (psscan) the
   security pack's unlinked_process rule runs. Medians of --runs, page cache warm (the first,
   cold run is printed apart: it faults in the sparse file).
2. ``vmwatch ps`` vs ``vol windows.pslist``, each a fresh process (median wall and CPU time):
   Volatility gets the same types as an ISF (the builder's _EPROCESS layout, PsActiveProcessHead)
   and, through a config file, the DTB and kernel base, so it does no discovery of its own
   (its automagic needs a PDB signature and a self-referencing PML4 entry the built guest lacks).
   vmwatch runs zero-config on the raw image (it discovers everything), and on a full crash
   dump of the same memory with the same ISF (DTB from the header, as Volatility's is given).

``--arch x86`` does the same for the 32-bit guest (libwine:i386's PE32 ntoskrnl, PAE page
tables, Windows 7 SP1 x86 offsets) on a 4 GiB image (PAE's DirectoryTableBase is a 32-bit
value: the guest sits at the top of the first 4 GiB); Volatility reads it through its
WindowsIntelPAE and WindowsCrashDump32Layer layers, given the same kind of ISF (4-byte pointers).

Usage: .venv/bin/python benchmarks/bench_windows.py [--arch x64|x86] [--gib 5] [--runs 5] [--dense] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _cli import parse_args
from bench_ps import summary, timed

BIN = os.path.dirname(sys.executable)


def wine_ntoskrnl(arch: str = "amd64") -> bytes:
    """ntoskrnl.exe of libwine:``arch`` from the vmwatch cache (the Windows tests fetch it there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "windows"))
    from conftest import WANTED, _fetch, pe_dir  # noqa: E402  (the tests' fetcher: one place knows how)

    target = pe_dir(arch)
    if not all((target / n).exists() for n in WANTED):
        why = _fetch(target, arch)
        if why is not None:
            raise SystemExit(f"cannot get libwine:{arch}'s ntoskrnl.exe: {why}")
    return (target / "ntoskrnl.exe").read_bytes()


def median_time(fn, runs: int) -> tuple[float, float, object]:
    """(first run's seconds, median seconds of the rest, last result)."""
    times, result = [], None
    for _ in range(runs + 1):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:]), result


def isf(guest) -> dict:
    """A Volatility 3 Windows ISF with the builder's types: enough for windows.pslist and vmwatch."""

    o = guest.profile.eprocess
    ptr = guest.ptr_size
    wide = ptr == 8

    def base(size, signed=False):
        return {"size": size, "signed": signed, "kind": "int", "endian": "little"}

    def field(offset, t):
        return {"offset": offset, "type": t}

    def b(n):
        return {"kind": "base", "name": n}

    def s(n):
        return {"kind": "struct", "name": n}

    def p(t):
        return {"kind": "pointer", "subtype": t}

    types = {
        "_LIST_ENTRY": {"kind": "struct", "size": 2 * ptr, "fields": {"Flink": field(0, p(s("_LIST_ENTRY"))),
                                                                      "Blink": field(ptr, p(s("_LIST_ENTRY")))}},
        "_LARGE_INTEGER": {"kind": "union", "size": 8, "fields": {"QuadPart": field(0, b("long long"))}},
        "_KPROCESS": {"kind": "struct", "size": 0x160 if wide else 0x98, "fields": {
            "DirectoryTableBase": field(o["DirectoryTableBase"], b("unsigned long long" if wide else "unsigned long"))}},
        "_HANDLE_TABLE": {"kind": "struct", "size": 0x68, "fields": {"HandleCount": field(0x58, b("unsigned long"))}},
        "_EPROCESS": {"kind": "struct", "size": 0x4D0, "fields": {
            "Pcb": field(0, s("_KPROCESS")), "CreateTime": field(o["CreateTime"], s("_LARGE_INTEGER")),
            "ExitTime": field(o["ExitTime"], s("_LARGE_INTEGER")),
            "UniqueProcessId": field(o["UniqueProcessId"], p(b("void"))),
            "ActiveProcessLinks": field(o["ActiveProcessLinks"], s("_LIST_ENTRY")),
            "InheritedFromUniqueProcessId": field(o["InheritedFromUniqueProcessId"], p(b("void"))),
            "ImageFileName": field(o["ImageFileName"], {"kind": "array", "count": 15, "subtype": b("unsigned char")}),
            "Peb": field(o["Peb"], p(b("void"))),
            # Members pslist prints beside the ones vmwatch reads (their Win7 SP1 offsets; x86 has no Wow64Process).
            **({"ActiveThreads": field(0x328, b("unsigned long")), "ObjectTable": field(0x200, p(s("_HANDLE_TABLE"))),
                "Wow64Process": field(0x320, p(b("void"))), "Session": field(0x2D8, p(b("void")))} if wide else
               {"ActiveThreads": field(0x198, b("unsigned long")), "ObjectTable": field(0xF4, p(s("_HANDLE_TABLE"))),
                "Session": field(0x168, p(b("void")))})}},
    }
    # Types Volatility's Windows symbol table attaches classes to: present, empty (pslist reads none).
    for name in ("_ETHREAD", "_KTHREAD", "_ERESOURCE", "_UNICODE_STRING", "_EX_FAST_REF", "_TOKEN",
                 "_OBJECT_HEADER", "_FILE_OBJECT", "_DEVICE_OBJECT", "_CM_KEY_BODY", "_CMHIVE", "_CM_KEY_NODE",
                 "_CM_KEY_VALUE", "_HMAP_ENTRY", "_MMVAD_SHORT", "_MMVAD", "_KSYSTEM_TIME", "_KMUTANT",
                 "_DRIVER_OBJECT", "_OBJECT_SYMBOLIC_LINK", "_CONTROL_AREA", "_SHARED_CACHE_MAP", "_VACB",
                 "_POOL_TRACKER_BIG_PAGES", "_IMAGE_DOS_HEADER", "_KTIMER", "_LDR_DATA_TABLE_ENTRY"):
        types.setdefault(name, {"kind": "struct", "size": 8, "fields": {}})
    base_types = {"unsigned long long": base(8), "unsigned long": base(4), "unsigned short": base(2),
                  "unsigned char": base(1), "long long": base(8, True), "long": base(4, True), "char": base(1, True),
                  "pointer": base(ptr), "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"}}
    return {"metadata": {"format": "6.2.0", "producer": {"name": "vmwatch bench_windows", "version": "1"},
                         "windows": {"pdb": {"GUID": "0" * 32, "age": 1, "database": "ntkrnlmp.pdb" if wide else "ntkrpamp.pdb",
                                             "machine_type": guest.arch.machine}}},
            "base_types": base_types, "enums": {}, "user_types": types,
            "symbols": {"PsActiveProcessHead": {"address": guest.process_head - guest.kernel_va},
                        "KdDebuggerDataBlock": {"address": guest.kdbg_vaddr - guest.kernel_va}}}


def vol_config(memory_class: str, path: Path, cr3: int, isf_path: Path, guest) -> dict:
    layer = "WindowsIntel32e" if guest.ptr_size == 8 else "WindowsIntelPAE"
    return {"kernel.class": "volatility3.framework.contexts.Module",
            "kernel.layer_name.class": f"volatility3.framework.layers.intel.{layer}",
            "kernel.layer_name.memory_layer.class": memory_class,
            "kernel.layer_name.memory_layer.location": path.resolve().as_uri(),
            "kernel.layer_name.page_map_offset": cr3, "kernel.layer_name.kernel_virtual_offset": guest.kernel_va,
            "kernel.offset": guest.kernel_va,
            "kernel.symbol_table_name.class": "volatility3.framework.symbols.windows.WindowsKernelIntermedSymbols",
            "kernel.symbol_table_name.isf_url": isf_path.resolve().as_uri()}


def crash_dump(guest, path: Path, at: int, cr3: int, size: int) -> None:
    """A full crash dump: one run, physical ``at`` to ``size`` (the guest's moved memory, and the
    empty top MiB an x86 guest leaves)."""
    import struct

    from vmwatch.testing.imagebuilders import windows_crashdump

    raw_path = path.with_suffix(".moved")
    guest.write_raw(raw_path, size, at)
    with open(raw_path, "rb") as f:
        f.seek(at)
        moved = f.read()
    raw_path.unlink()
    out = bytearray(windows_crashdump([(at // 4096, moved)], bits=guest.arch.bits, dtb=cr3))
    struct.pack_into("<II", out, 0x8, 15, guest.build)
    if guest.arch.bits == 32:
        out[0x5C] = 1  # PaeEnabled
    path.write_bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("x64", "x86"), default="x64", help="the guest's architecture")
    parser.add_argument("--gib", type=int, help="size of the sparse raw image (default 5, 4 for x86)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", metavar="DIR", help="write the images here and keep them")
    parser.add_argument("--dense", action="store_true",
                        help="write the zeros below the guest (a sparse file's holes cost a fresh process a "
                             "zero-filled page per 4 KiB read: about 12 s per 5 GiB here)")
    args = parse_args(parser)

    import attrs

    from vmwatch.images import open_image
    from vmwatch.os.windows import kdbg as kdbg_mod
    from vmwatch.os.windows import locate, pe
    from vmwatch.os.windows.kernel import Windows
    from vmwatch.os.windows.profiles import builtin
    from vmwatch.testing.windowsguest import WindowsGuest

    guest = WindowsGuest(wine_ntoskrnl("amd64" if args.arch == "x64" else "i386"))
    guest.build_objects()
    args.gib = args.gib or (5 if args.arch == "x64" else 4)
    if args.arch == "x86" and args.gib > 4:
        raise SystemExit("--arch x86 puts the guest below 4 GiB (a PAE DirectoryTableBase is 32 bits): --gib 4 at most")
    work = Path(args.keep or tempfile.mkdtemp(prefix="vmwatch-bench-win-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.gib << 30
    # Volatility's PAE layer reads a whole page at the (32-byte aligned) PDPT: one past the end of
    # the file is an invalid table to it, so the x86 guest leaves the top MiB of the image empty.
    at = size - len(guest.buffer) - (0 if args.arch == "x64" else 1 << 20)
    raw = work / "win.raw"
    cr3 = guest.write_raw(raw, size, at, sparse=not args.dense)
    regs = attrs.evolve(guest.registers, cr3=cr3)
    kind = "dense" if args.dense else "sparse"
    print(f"image: {raw} ({args.gib} GiB {kind}, {args.arch} guest ({guest.fake.mode.value} paging) at {at:#x}; "
          "page cache warm after the first run)")

    with open_image(raw) as image:
        def kernel():
            return locate.physical_kernel(image)

        cold, warm, (paddr, _, tried) = median_time(kernel, args.runs)
        print(f"  kernel base, upward MZ scan:      first {cold:.3f} s, median {warm:.3f} s ({tried} MZ pages parsed)")
        read = lambda a, n: image.read(a, n, pad=True)  # noqa: E731
        size_of_image = pe.parse_headers(read, paddr).size_of_image
        for label, first in (("KDBG scan, ntoskrnl's pages first", (paddr, size_of_image)),
                             ("KDBG scan, all of RAM (before)   ", None)):
            cold, warm, _ = median_time(lambda: kdbg_mod.scan_physical(image, first=first), args.runs)
            print(f"  {label}: first {cold:.3f} s, median {warm:.3f} s")
        profile = builtin(guest.build, guest.arch.bits)
        cold, warm, _ = median_time(lambda: locate.system_process_dtb(image, profile, guest.kernel_va, paddr),
                                    args.runs)
        print(f"  DTB, System EPROCESS scan:        first {cold:.3f} s, median {warm:.3f} s")
        cold, warm, win = median_time(lambda: Windows.from_memory(image), args.runs)
        print(f"  Windows.from_memory, no CPU state: median {warm:.3f} s")
        cold, warm, _ = median_time(lambda: Windows.from_memory(image, (regs,)), args.runs)
        print(f"  Windows.from_memory, CR3 + IDTR:   median {warm:.3f} s (scan down from the IDT vector 0 handler)")
        cold, warm, hits = median_time(win.scan_processes, args.runs)
        print(f"  psscan (unlinked_process rule):   median {warm:.3f} s, {len(hits)} processes, "
              f"{args.gib / warm:.1f} GiB/s")

    isf_path = work / ("ntkrnlmp.json" if args.arch == "x64" else "ntkrpamp.json")
    isf_path.write_text(json.dumps(isf(guest)))
    dump = work / "win.dmp"
    crash_dump(guest, dump, at, cr3, size)
    vol = shutil.which("vol", path=BIN) or shutil.which("vol")
    if vol is None:
        raise SystemExit("Volatility 3 (vol) is not installed in this environment")
    print("\nps, fresh processes:")
    rows = []
    for label, argv in (
        ("vmwatch ps, raw, zero-config", [f"{BIN}/python", "-m", "vmwatch", "ps", str(raw)]),
        ("vmwatch ps, crash dump + ISF", [f"{BIN}/python", "-m", "vmwatch", "ps", str(dump), "--symbols", str(isf_path)]),
    ):
        rows.append((label, [timed(argv)[:2] for _ in range(args.runs)]))
    for label, memory_class, path in (
        ("vol windows.pslist, raw", "volatility3.framework.layers.physical.FileLayer", raw),
        ("vol windows.pslist, crash dump",
         f"volatility3.framework.layers.crash.WindowsCrashDump{64 if args.arch == 'x64' else 32}Layer", dump),
    ):
        config = work / f"vol-{path.suffix[1:]}.json"
        config.write_text(json.dumps(vol_config(memory_class, path, cr3, isf_path, guest)))
        argv = [vol, "-q", "-r", "json", "-c", str(config), "-f", str(path), "windows.pslist"]
        result = timed(argv)
        pids = [row["PID"] for row in json.loads(result[2])]
        if pids != [p.pid for p in guest.processes]:
            raise SystemExit(f"{label}: Volatility listed {pids}, not the built processes")
        rows.append((label, [result[:2]] + [timed(argv)[:2] for _ in range(args.runs - 1)]))
    base = statistics.median(w for w, _ in rows[2][1])
    for label, runs in rows:
        wall = statistics.median(w for w, _ in runs)
        print(f"  {label:34} {summary(runs)}  ({wall / base:.2f}x vol on the raw image)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
