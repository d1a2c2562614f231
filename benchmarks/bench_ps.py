"""``vmwatch ps`` on a 512 MB QEMU dump, cold process start to output, vs Volatility 3 linux.pslist.

Boots the lab guest with 512 MB, dumps it (QMP dump-guest-memory), stops it. vmwatch runs once
to fill its profile cache (~/.cache/vmwatch), then each timed run is a fresh process. Volatility
3 reads the ISF that ``vmwatch symbols export`` wrote from the same dump, so both tools see the
same kernel; it is timed the same way. Prints medians of wall and CPU time, and the ratios (the
machine may be shared: wall time grows with load, CPU time much less).

Usage: .venv/bin/python benchmarks/bench_ps.py [--runs N] [--dump existing.elf]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _cli import parse_args

BIN = os.path.dirname(sys.executable)


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, stdout) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu, result.stdout


def summary(runs: list[tuple[float, float]]) -> str:
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    return f"median {wall:.3f} s wall, {cpu:.3f} s CPU ({len(runs)} runs)"


def make_dump(path: str, *, setup: str = "scenario sleeper 900; scenario sleeper 900", **config) -> None:
    """Dump a paused lab guest (LabConfig fields in ``config``, 512M by default) after ``setup``."""
    from vmwatch.lab import LabConfig, LabGuest

    guest = LabGuest.start(LabConfig(**{"memory": "512M", **config}))
    try:
        guest.shell(setup)
        guest.qmp().execute("stop")
        guest.dump(path)
    finally:
        guest.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dump", help="use this dump instead of booting the lab guest")
    args = parse_args(parser)
    vol = shutil.which("vol", path=BIN)
    vmwatch = os.path.join(BIN, "vmwatch")
    workdir = tempfile.mkdtemp(prefix="vmwatch-bench-ps-")
    try:
        dump = args.dump or os.path.join(workdir, "guest512.elf")
        if not args.dump:
            make_dump(dump)
        first, _, out = timed([vmwatch, "ps", dump])  # fills the profile cache
        processes = len(out.strip().splitlines()) - 1
        ours = [timed([vmwatch, "ps", dump])[:2] for _ in range(args.runs)]
        print(f"dump: {os.path.getsize(dump) / (1 << 20):.0f} MiB, {processes} processes; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"vmwatch ps, first run (profile cache empty or stale): {first:.3f} s wall")
        print(f"vmwatch ps, cold process, cached profile: {summary(ours)}; goal < 0.5 s")
        if vol is None:
            print("volatility3 is not installed (pip install -e '.[bench]'): no baseline")
            return 0
        symbols_dir = os.path.join(workdir, "symbols", "linux")
        os.makedirs(symbols_dir)
        exported = timed([vmwatch, "symbols", "export", dump, "-o", os.path.join(symbols_dir, "guest.json.xz")])
        print(f"vmwatch symbols export (ISF for Volatility): {exported[0]:.3f} s wall")
        vol_argv = [vol, "-q", "-s", os.path.dirname(symbols_dir), "-f", dump, "linux.pslist"]
        vol_runs = []
        for _ in range(max(1, args.runs // 2)):
            wall, cpu, vol_out = timed(vol_argv)
            vol_runs.append((wall, cpu))
        vol_rows = sum(1 for line in vol_out.splitlines() if line[:2] == "0x")
        print(f"volatility3 linux.pslist (same dump, exported ISF): {summary(vol_runs)}, {vol_rows} rows")
        wall_ratio = statistics.median(w for w, _ in vol_runs) / statistics.median(w for w, _ in ours)
        cpu_ratio = statistics.median(c for _, c in vol_runs) / statistics.median(c for _, c in ours)
        print(f"ratio: vmwatch is {wall_ratio:.1f}x faster in wall time, {cpu_ratio:.1f}x in CPU time (goal >= 10x)")
        timed([vmwatch, "vol", dump, "linux.pslist"])  # fills the ISF cache
        bridged = [timed([vmwatch, "vol", dump, "linux.pslist"])[:2] for _ in range(max(1, args.runs // 2))]
        bridged_ratio = statistics.median(w for w, _ in vol_runs) / statistics.median(w for w, _ in bridged)
        print(f"vmwatch vol linux.pslist (Volatility on vmwatch's layer, no banner scan): {summary(bridged)}; "
              f"{bridged_ratio:.1f}x faster than vol -f in wall time")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
