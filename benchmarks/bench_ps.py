"""``vmwatch ps`` on a 512 MB QEMU dump, cold process start to output, vs Volatility 3 linux.pslist.

Boots the lab guest with 512 MB, dumps it (QMP dump-guest-memory), stops it. vmwatch runs once
to fill its profile cache (~/.cache/vmwatch), then each timed run is a fresh process. Volatility
3 reads the ISF that ``vmwatch symbols export`` wrote from the same dump, so both tools see the
same kernel; it is timed the same way. Prints medians and the ratio.

Usage: .venv/bin/python benchmarks/bench_ps.py [--runs N] [--dump existing.elf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed, result.stdout


def make_dump(path: str) -> None:
    from vmwatch.lab import LabConfig, LabGuest

    guest = LabGuest.start(LabConfig(memory="512M"))
    try:
        guest.shell("scenario sleeper 900; scenario sleeper 900")
        guest.qmp().execute("stop")
        guest.dump(path)
    finally:
        guest.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dump", help="use this dump instead of booting the lab guest")
    args = parser.parse_args()
    vol = shutil.which("vol", path=BIN)
    workdir = tempfile.mkdtemp(prefix="vmwatch-bench-ps-")
    try:
        dump = args.dump or os.path.join(workdir, "guest512.elf")
        if not args.dump:
            make_dump(dump)
        size_mb = os.path.getsize(dump) / (1 << 20)
        vmwatch = os.path.join(BIN, "vmwatch")
        first, out = timed([vmwatch, "ps", dump])  # fills the profile cache
        processes = len(out.strip().splitlines()) - 1
        ours = [timed([vmwatch, "ps", dump])[0] for _ in range(args.runs)]
        print(f"dump: {size_mb:.0f} MiB, {processes} processes")
        print(f"vmwatch ps, first run (cache empty or stale): {first:.3f} s")
        print(f"vmwatch ps, cold process, cached profile: median {statistics.median(ours):.3f} s "
              f"(min {min(ours):.3f}, max {max(ours):.3f}, {args.runs} runs; goal < 0.5 s)")
        if vol is None:
            print("volatility3 is not installed (pip install -e '.[bench]'): no baseline")
            return 0
        symbols_dir = os.path.join(workdir, "symbols", "linux")
        os.makedirs(symbols_dir)
        exported, _ = timed([vmwatch, "symbols", "export", dump, "-o", os.path.join(symbols_dir, "guest.json.xz")])
        print(f"vmwatch symbols export (ISF for Volatility): {exported:.3f} s")
        vol_argv = [vol, "-q", "-s", os.path.dirname(symbols_dir), "-f", dump, "linux.pslist"]
        vol_runs = []
        for _ in range(max(1, args.runs // 2)):
            elapsed, vol_out = timed(vol_argv)
            vol_runs.append(elapsed)
        vol_rows = sum(1 for line in vol_out.splitlines() if line[:2] == "0x")
        print(f"volatility3 linux.pslist (same dump, exported ISF): median {statistics.median(vol_runs):.3f} s, "
              f"{vol_rows} rows")
        print(f"ratio: vmwatch is {statistics.median(vol_runs) / statistics.median(ours):.1f}x faster (goal >= 10x)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
