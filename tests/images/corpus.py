"""Small valid files of every format, shared by the bad-input and fuzz tests."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from vmwatch.testing import imagebuilders as build

PAGE = 4096
_rng = random.Random(1234)
_REGS = dict(rax=1, rip=0xFFFFFFFF81000000, cr3=0x1000, cr0=0x80000011, cr4=0x20, rflags=2)


def _ram(n: int) -> bytes:
    return _rng.randbytes(n)


def valid_files() -> dict[str, bytes]:
    """name -> bytes of a small, valid image."""
    return {
        "lime": build.lime([(0x1000, _ram(PAGE)), (0x10000, _ram(PAGE))]),
        "qemu64": build.qemu_elf([build.Load(0, _ram(PAGE)), build.Load(0x100000, _ram(PAGE), memsz=2 * PAGE)],
                                 [_REGS], vmcoreinfo="OSRELEASE=6.1\n"),
        "qemu32": build.qemu_elf([build.Load(0, _ram(PAGE))], [_REGS], elf_class=1, machine=3),
        "qemu-xnum": build.qemu_elf([build.Load(i * 2 * PAGE, _ram(PAGE)) for i in range(3)], [_REGS], xnum=True),
        "vbox": build.vbox_core([build.Load(0, _ram(PAGE)), build.Load(0xE0000000, b"", memsz=PAGE)], [_REGS]),
        "vmware": build.vmware_checkpoint(_ram(2 * PAGE), regions=[(0, 0, 1), (0x100000, 1, 1)], cpus=[_REGS],
                                          config='memsize = "8"\n', png=b"\x89PNG....", pad=3),
        "vmware32": build.vmware_checkpoint(_ram(PAGE), cpus=[_REGS], magic=0xBED2BED0),
        "windows64": build.windows_crashdump([(1, _ram(PAGE)), (4, _ram(PAGE))], regs=_REGS),
        "windows32": build.windows_crashdump([(1, _ram(PAGE))], bits=32),
        "windows-bitmap": build.windows_crashdump([(2, _ram(PAGE)), (9, _ram(PAGE))], dump_type=5),
        **_real_samples(),
    }


def _real_samples() -> dict[str, bytes]:
    """The real LiME slice, and the real Windows headers carrying a few pages (when present)."""
    samples = Path(__file__).resolve().parents[3] / "shared" / "samples"
    out = {}
    lime = samples / "lime" / "deb-x86_64-slice.lime"
    if lime.exists():
        out["lime-real"] = lime.read_bytes()
    for bits, name in ((64, "coredump_win10_64bit_stripped.raw"), (32, "coredump_win7_32bit_stripped.raw")):
        header = samples / "windows-crashdump" / name
        if header.exists():
            out[f"windows{bits}-real-header"] = build.windows_crashdump(
                [(1, _ram(PAGE)), (0x100, _ram(PAGE))], bits=bits, header=header.read_bytes())
    return out


def put_u64(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<Q", out, offset, value)
    return bytes(out)


def put_u32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)
