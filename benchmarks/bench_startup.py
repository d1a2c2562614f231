"""CLI start-up: cold ``vmwatch --help`` and ``vmwatch ps DUMP``, and what ``import structlog`` costs.

Every timed run is a fresh interpreter, started from a neutral directory. Baselines measured in
the same run: the bare interpreter (``python -c pass``), a plain ``import structlog`` against
:func:`vmwatch.logs.load_structlog`, and optionally another vmwatch tree (``--before DIR``, e.g.
``git archive OLD vmwatch | tar -x -C DIR``) run through PYTHONPATH. Prints min and median wall
time and median CPU time (the machine may be shared: wall time grows with load, CPU time less).

Usage: .venv/bin/python benchmarks/bench_startup.py [--runs N] [--dump guest.elf] [--before DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _cli import parse_args


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]!r}")
    return elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def measure(label: str, argv: list[str], runs: int, cwd: str, pythonpath: str | None = None) -> float:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    timed(argv, env, cwd)  # warm the page cache and the bytecode
    samples = [timed(argv, env, cwd) for _ in range(runs)]
    walls = [w for w, _ in samples]
    cpu = statistics.median(c for _, c in samples)
    print(f"{label:40} wall min {min(walls) * 1e3:6.0f} ms  median {statistics.median(walls) * 1e3:6.0f} ms"
          f"  cpu median {cpu * 1e3:6.0f} ms")
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--dump", help="a Linux memory image for `vmwatch ps` (skipped without one)")
    parser.add_argument("--before", metavar="DIR", help="a directory holding another vmwatch package to compare")
    args = parse_args(parser)
    py, runs = sys.executable, args.runs
    cwd = tempfile.mkdtemp(prefix="bench-startup-")  # not the source tree: sys.path[0] must not shadow --before

    floor = measure("python -c pass", [py, "-c", "pass"], runs, cwd)
    plain = measure("import structlog (plain)", [py, "-c", "import structlog"], runs, cwd)
    light = measure("import structlog (vmwatch.logs)", [py, "-c", "import vmwatch.logs as l; l.load_structlog()"],
                    runs, cwd)
    print(f"  structlog import above the interpreter: {(plain - floor) * 1e3:.0f} ms -> {(light - floor) * 1e3:.0f} ms"
          f" ({(plain - floor) / max(light - floor, 1e-6):.1f}x less)")
    commands = [["--help"]] + ([["ps", os.path.abspath(args.dump)]] if args.dump else [])
    for command in commands:
        cpu = measure("vmwatch " + " ".join(command)[:32], [py, "-m", "vmwatch", *command], runs, cwd)
        if args.before:
            old = measure("  before: " + " ".join(command)[:30], [py, "-m", "vmwatch", *command], runs, cwd,
                          pythonpath=os.path.abspath(args.before))
            print(f"  cpu ratio before/now {old / cpu:.2f}, above the interpreter {(old - floor) / (cpu - floor):.2f}")


if __name__ == "__main__":
    main()
