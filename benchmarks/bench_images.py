"""Image read bandwidth against a plain mmap slice, and `vmwatch convert` of multi-GB sparse images.

Run: .venv/bin/python benchmarks/bench_images.py [--size-mib 512] [--sparse-gib 8] [--qemu-gib 4]

1. Bulk reads: a LiME file with one 512 MiB range and a QEMU-style ELF with 4 runs over the
   same bytes; every chunk read through ``Image.read`` / ``Image.read_into`` vs slicing the mmap
   of the same file directly (the baseline, measured in the same run). Goal: ratio >= 0.5.
2. Small reads: 8-byte reads at random addresses (the page-table walker's pattern).
3. convert: a sparse raw image of N GiB with 64 MiB of data scattered in it, and (if QEMU is
   installed and --qemu-gib > 0) a real `dump-guest-memory` of a paused ``-m N G`` QEMU.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _cli import parse_args

from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

MIB = 1 << 20


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_bulk(path: Path, total: int, chunk: int, label: str) -> None:
    with open_image(path) as img, open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        runs = [(r.start, r.file_offset, r.size) for r in img.runs]

        def baseline():
            for _, off, size in runs:
                for o in range(off, off + size, chunk):
                    mm[o:o + chunk]

        def api_read():
            for start, _, size in runs:
                for p in range(start, start + size, chunk):
                    img.read(p, min(chunk, start + size - p))

        buf = bytearray(chunk)
        mv = memoryview(mm)

        def baseline_into():
            view = memoryview(buf)
            for _, off, size in runs:
                for o in range(off, off + size, chunk):
                    n = min(chunk, off + size - o)
                    view[:n] = mv[o:o + n]

        def api_into():
            view = memoryview(buf)
            for start, _, size in runs:
                for p in range(start, start + size, chunk):
                    n = min(chunk, start + size - p)
                    img.read_into(p, view[:n])

        baseline(), api_read()  # warm the page cache
        t_base, t_api = best_of(5, baseline), best_of(5, api_read)
        t_base_into, t_api_into = best_of(5, baseline_into), best_of(5, api_into)
        del mv
        mm.close()
    gb = total / 1e9
    print(f"  {label:<28} chunk {chunk:>8}: mmap slice {gb / t_base:6.2f} GB/s, Image.read {gb / t_api:6.2f} GB/s "
          f"(ratio {t_base / t_api:.2f}); into buffer: mmap {gb / t_base_into:6.2f}, "
          f"Image.read_into {gb / t_api_into:6.2f} GB/s (ratio {t_base_into / t_api_into:.2f})")


def bench_small(path: Path, count: int = 200_000) -> None:
    with open_image(path) as img, open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rng = random.Random(1)
        run = img.runs[0]
        addrs = [run.start + rng.randrange(0, run.size - 8) & ~7 for _ in range(count)]
        offs = [a - run.start + run.file_offset for a in addrs]

        def baseline():
            for o in offs:
                mm[o:o + 8]

        def api():
            read = img.read
            for a in addrs:
                read(a, 8)

        t_base, t_api = best_of(5, baseline), best_of(5, api)
        mm.close()
    print(f"  8-byte random reads: mmap slice {t_base / count * 1e9:6.0f} ns, Image.read {t_api / count * 1e9:6.0f} ns "
          f"(ratio {t_base / t_api:.2f})")


def read_once(path: Path) -> float:
    """Baseline: one sequential pass over the source's data (os.read, holes skipped like cp --sparse)."""
    from vmwatch.cli.commands.convert import data_extents

    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for lo, hi in list(data_extents(fd, 0, path.stat().st_size)):
            os.lseek(fd, lo, os.SEEK_SET)
            left = hi - lo
            while left > 0:
                left -= len(os.read(fd, min(MIB, left)))
    finally:
        os.close(fd)
    return time.perf_counter() - t


def bench_convert(src: Path, out: Path, label: str) -> None:
    from vmwatch.cli.commands import convert

    base = min(read_once(src) for _ in range(2))
    with open_image(src) as img:
        size, fmt = img.size, img.format

        def copy_and_verify():
            out.unlink(missing_ok=True)
            convert.convert(img, str(out))
            convert.verify(img, str(out))

        t_core = best_of(2, copy_and_verify)
    out.unlink()
    t = time.perf_counter()
    result = run_cli("convert", src, "-o", out)
    t_cli = time.perf_counter() - t
    if result.status:
        sys.exit(f"convert failed: {result.stderr}")
    on_disk = out.stat().st_blocks * 512
    print(f"  {label}: {fmt} -> raw, {size / 2**30:.2f} GiB address space, {on_disk / MIB:.1f} MiB written; "
          f"copy+verify {t_core:.2f} s vs one plain read of the source's data {base:.2f} s "
          f"(ratio {t_core / base:.1f}x: the data is read twice, copy then verify); "
          f"`vmwatch convert` end to end {t_cli:.2f} s")


def qemu_dump(gib: int, out: Path, tmp: Path) -> bool:
    sock_path = tmp / "qmp.sock"
    try:
        proc = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-m", f"{gib}G",
                                 "-qmp", f"unix:{sock_path},server=on,wait=off"], stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return False
    try:
        while not sock_path.exists():
            time.sleep(0.02)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        f.readline()
        for cmd in ({"execute": "qmp_capabilities"},
                    {"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{out}"}}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while b'"return"' not in (line := f.readline()):
                if b'"error"' in line:
                    raise RuntimeError(line.decode())
        s.close()
    finally:
        proc.terminate()
        proc.wait()
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--sparse-gib", type=int, default=8)
    parser.add_argument("--qemu-gib", type=int, default=4)
    args = parse_args(parser)
    total = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="vmwatch-bench-") as d:
        tmp = Path(d)
        print(f"bulk physical reads, {args.size_mib} MiB (best of 5, page cache warm)")
        ram = os.urandom(total)
        lime = tmp / "ram.lime"
        lime.write_bytes(build.lime([(0, ram)]))
        quarter = total // 4
        elf = tmp / "ram.elf"
        elf.write_bytes(build.qemu_elf([build.Load(i * (quarter + MIB), ram[i * quarter:(i + 1) * quarter])
                                        for i in range(4)]))
        del ram
        for chunk in (4096, 64 * 1024, MIB):
            bench_bulk(lime, total, chunk, "lime (1 run)")
        bench_bulk(elf, total, 64 * 1024, "qemu-elf (4 runs)")
        bench_small(lime)

        print("convert")
        sparse = tmp / "sparse.raw"
        rng = random.Random(2)
        with open(sparse, "wb") as f:
            f.truncate(args.sparse_gib << 30)
            for _ in range(64):
                f.seek(rng.randrange(0, (args.sparse_gib << 30) - MIB) & ~0xFFF)
                f.write(os.urandom(MIB))
        bench_convert(sparse, tmp / "out1.raw", f"sparse raw {args.sparse_gib} GiB, 64 MiB data")
        (tmp / "out1.raw").unlink()
        sparse.unlink()
        if args.qemu_gib:
            dump = tmp / "q.elf"
            t = time.perf_counter()
            if qemu_dump(args.qemu_gib, dump, tmp):
                print(f"  (QEMU wrote a {dump.stat().st_size / 2**30:.2f} GiB dump in {time.perf_counter() - t:.1f} s)")
                bench_convert(dump, tmp / "out2.raw", f"QEMU -m {args.qemu_gib}G dump")
            else:
                print("  qemu-system-x86_64 not installed: skipped the QEMU dump")


if __name__ == "__main__":
    main()
