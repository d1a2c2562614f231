"""Debian i386 kernels with ``--symbols``: the -dbg vmlinux's profile, derived (pahole) and cached,
and ``vmwatch ps --symbols`` on a 686-pae dump, cold process start to output.

Baseline: deriving the profile from the 300 MB vmlinux (pahole's BTF, the .symtab) in a fresh
cache, against loading it from the cache. The download of the -dbg package is reported from the
lab's ``fetch.json`` (it happens once, on first use).

Usage: .venv/bin/python benchmarks/bench_i386_symbols.py [--runs N] [--flavour 686|686-pae] [--dump existing.elf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _cli import parse_args

from bench_ps import BIN, make_dump, summary, timed


def load_seconds(vmlinux: str, cache: str) -> float:
    """Wall time of loading the symbol file in a fresh process with VMWATCH_CACHE_DIR=cache."""
    code = ("import sys, time; from vmwatch.os.linux.symbols import load_symbols_file; t = time.perf_counter(); "
            "f = load_symbols_file(sys.argv[1]); f.types.struct('task_struct'); print(time.perf_counter() - t)")
    env_before = os.environ.get("VMWATCH_CACHE_DIR")
    os.environ["VMWATCH_CACHE_DIR"] = cache
    try:
        return float(timed([os.path.join(BIN, "python"), "-c", code, vmlinux])[2])
    finally:
        if env_before is None:
            del os.environ["VMWATCH_CACHE_DIR"]
        else:
            os.environ["VMWATCH_CACHE_DIR"] = env_before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flavour", default="686-pae", choices=["686", "686-pae"])
    parser.add_argument("--dump", help="an existing dump of that flavour's lab guest")
    args = parse_args(parser)
    from vmwatch.lab.kernel import ensure_kernel

    kernel = ensure_kernel(args.flavour)
    started = time.perf_counter()
    vmlinux = str(kernel.debug_vmlinux())
    fetch = json.loads((Path(vmlinux).parent / "fetch.json").read_text())
    print(f"-dbg package {fetch['package']}: {fetch['deb_bytes'] / 1e6:.0f} MB downloaded in {fetch['download_s']} s, "
          f"vmlinux ({fetch['vmlinux_bytes'] / 1e6:.0f} MB) extracted in {fetch['extract_s']} s "
          f"(now {time.perf_counter() - started:.2f} s to find it in the cache)")
    with tempfile.TemporaryDirectory() as cache:
        cold = load_seconds(vmlinux, cache)
        warm = statistics.median(load_seconds(vmlinux, cache) for _ in range(args.runs))
    print(f"symbol file load: first {cold:.2f} s (pahole + .symtab), cached {warm:.3f} s; ratio {cold / warm:.0f}x")
    with tempfile.TemporaryDirectory() as tmp:
        dump = args.dump or os.path.join(tmp, f"{args.flavour}.elf")
        if not args.dump:
            make_dump(dump, setup="scenario module; scenario sleeper 900", arch=args.flavour, memory="256M")
        argv = [os.path.join(BIN, "vmwatch"), "ps", dump, "--json", "--symbols", vmlinux]
        timed(argv)  # fills the caches
        runs = [timed(argv)[:2] for _ in range(args.runs)]
    print(f"vmwatch ps --symbols ({args.flavour} dump): {summary(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
