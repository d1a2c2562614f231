"""Breakpoints, single steps and the debugger on the arm64 lab guest (qemu-system-aarch64 -M virt, TCG).

Run: .venv/bin/python benchmarks/bench_arm64_debug.py [--seconds N] [--rounds N]

Prints, on a guest busy with one-byte write syscalls (``scenario busy``):
* breakpoint events/s on ``ksys_write`` (hit -> registers read -> resume) for the naive step-over
  (single step then continue: the baseline), the hop (lift, break on the next instruction) and the
  default, which does the entry's ``mov x9, x30`` by hand (two register writes, no second stop);
  beside them the guest's own write rate, unobserved;
* single steps per second of the live backend, and of ``vmwatch debug``'s session through its
  blocking facade (what the shell's ``step`` costs), with their ratio.

Every breakpoint or step stop makes QEMU flush its translated code; under TCG on aarch64 the
re-translation, not vmwatch, sets the ceiling. The load average is printed: the host is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import trio
from _cli import parse_args
from bench_live import breakpoint_rate, guest_write_rate

from vmwatch.lab import LabConfig, LabGuest
from vmwatch.live.qemu import attach_qemu


async def backend_steps(guest: LabGuest, n: int) -> float:
    async with attach_qemu(str(guest.qmp_path)) as vm:
        await vm.pause()
        t = time.perf_counter()
        for _ in range(n):
            await vm.step(0)
        rate = n / (time.perf_counter() - t)
        await vm.resume()
    return rate


def debugger_steps(guest: LabGuest, n: int) -> float:
    from vmwatch.debug import Debugger

    with Debugger.open(guest.target) as dbg:
        t = time.perf_counter()
        for _ in range(n):
            dbg.step()
            dbg.registers()
        return n / (time.perf_counter() - t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each breakpoint round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parse_args(parser)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with LabGuest.start(LabConfig(arch="arm64")) as guest:
        guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
        address = int(guest.shell("grep ' ksys_write$' /proc/kallsyms", check=True).split()[0], 16)
        unobserved = statistics.median(guest_write_rate(guest, 5000) for _ in range(3))
        guest.shell("scenario busy start", check=True)
        rates: dict[str, list[float]] = {"step": [], "hop": [], "auto": []}
        stats = {}
        for _ in range(args.rounds):
            for mode in rates:
                rate, stats[mode] = trio.run(breakpoint_rate, guest, address, mode, args.seconds)
                rates[mode].append(rate)
        guest.shell("scenario busy stop", check=True)
        naive, hop, auto = (statistics.median(rates[m]) for m in ("step", "hop", "auto"))
        print(f"guest one-byte writes/s, unobserved:          {unobserved:10.0f}")
        print(f"breakpoint events/s, naive (step then cont):  {naive:10.0f}  (baseline)  {stats['step']}")
        print(f"breakpoint events/s, hop (next-insn bp):      {hop:10.0f}  ratio {hop / naive:.2f}x  {stats['hop']}")
        print(f"breakpoint events/s, emulated mov x9, x30:    {auto:10.0f}  ratio {auto / naive:.2f}x  {stats['auto']}")
        print("  all rounds: " + " ".join(f"{m} {[round(r) for r in v]}" for m, v in rates.items()))
        backend = trio.run(backend_steps, guest, args.steps)
        session = debugger_steps(guest, args.steps)
        print(f"single steps/s, live backend:                 {backend:10.0f}  (baseline)")
        print(f"single steps/s, vmwatch debug (step + regs):  {session:10.0f}  ratio {session / backend:.2f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
