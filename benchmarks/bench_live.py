"""Live QEMU backend benchmarks on a freshly booted lab guest (TCG).

Run: .venv/bin/python benchmarks/bench_live.py [--seconds N]

Prints:
* breakpoint round trips per second (hit -> registers read -> resume) on a guest busy with
  one-byte write syscalls, for the naive step-over (single step then continue), the "hop"
  (lift the breakpoint, break on the next instruction, put it back), the default emulated
  step-over, and the inline hook (no translation flush at all), with the guest's own write
  rate unobserved beside it;
* single steps per second, pause+resume latency, one MSR read through the rdmsr probe;
* read bandwidth of the mapped RAM file versus the gdbstub (ratio).

The host is shared and noisy: numbers are medians of short rounds, the load average is printed.
Every breakpoint/step stop makes QEMU 7.2 flush all translated code (see vmwatch/live/qemu.py),
so the events/s ceiling of gdbstub breakpoints is set by re-translation; inline hooks stop on
a watchpoint instead and flush nothing. The flush count is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _cli import parse_args

import trio

from vmwatch.lab import LabGuest
from vmwatch.live.qemu import attach_qemu


def tb_flushes(guest: LabGuest) -> str:
    text = guest.qmp().execute("human-monitor-command", {"command-line": "info jit"})
    return next((line.split()[-1] for line in text.splitlines() if "TB flush count" in line), "?")


def guest_write_rate(guest: LabGuest, n: int = 20000) -> float:
    """One-byte writes per second inside the guest, unobserved (the guest's own clock)."""
    out = guest.shell(f"scenario writes {n}", timeout=120).split()
    centis = int(out[out.index("cs") + 1])
    return n / max(centis / 100, 0.01)


async def breakpoint_rate(guest: LabGuest, address: int, mode: str, seconds: float) -> tuple[float, dict]:
    async with attach_qemu(str(guest.qmp_path)) as vm:
        vm.step_over = "auto" if mode == "inline" else mode
        assert await vm.add_breakpoint(address, inline=mode == "inline") is (mode == "inline")
        hits = 0
        start = time.perf_counter()
        with trio.move_on_after(seconds):
            async for event in vm.events():
                regs = await vm.registers(event.vcpu, descriptors=False)
                assert regs.pc == address
                hits += 1
        elapsed = time.perf_counter() - start
        await vm.remove_breakpoint(address)
        await vm.resume()
        return hits / elapsed, dict(vm.stats)


async def msr_read_ms(guest: LabGuest, address: int, reads: int = 100) -> float:
    """Median time of one LSTAR read through the rdmsr probe, at inline-hook stops."""
    times = []
    async with attach_qemu(str(guest.qmp_path)) as vm:
        await vm.add_breakpoint(address, inline=True)
        async for event in vm.events():
            t = time.perf_counter()
            assert await vm.read_msrs([0xC0000082], event.vcpu)
            times.append(time.perf_counter() - t)
            if len(times) == reads:
                break
        await vm.remove_breakpoint(address)
        await vm.resume()
    return statistics.median(times) * 1e3


async def control_numbers(guest: LabGuest) -> dict[str, float]:
    out: dict[str, float] = {}
    async with attach_qemu(str(guest.qmp_path)) as vm:
        # pause + resume latency
        lat = []
        for _ in range(50):
            t = time.perf_counter()
            await vm.pause()
            await vm.resume()
            lat.append(time.perf_counter() - t)
        out["pause_resume_ms"] = statistics.median(lat) * 1e3
        # single steps
        await vm.pause()
        t = time.perf_counter()
        n = 300
        for _ in range(n):
            await vm.step(0)
        out["steps_per_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            await vm.step(0, mask_interrupts=False)
        out["steps_unmasked_per_s"] = n / (time.perf_counter() - t)
        # read bandwidth: whole RAM file pass vs gdbstub
        mem = vm.memory
        size = 64 << 20
        t = time.perf_counter()
        for paddr in range(0, size, 1 << 20):
            mem.read(paddr, 1 << 20)
        out["file_mb_s"] = size / (time.perf_counter() - t) / 1e6
        stub_size = 1 << 20
        t = time.perf_counter()
        data = await vm.read_memory(0x1000000, stub_size, physical=True)
        out["stub_mb_s"] = stub_size / (time.perf_counter() - t) / 1e6
        assert data == mem.read(0x1000000, stub_size)
        t = time.perf_counter()
        for _ in range(100000):
            mem.read(0x1000000, 8)
        out["u64_read_us"] = (time.perf_counter() - t) / 100000 * 1e6
        await vm.resume()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each breakpoint round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parse_args(parser)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with LabGuest.start() as guest:
        guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
        address = int(guest.shell("grep ' ksys_write$' /proc/kallsyms", check=True).split()[0], 16)
        unobserved = statistics.median(guest_write_rate(guest) for _ in range(3))
        print(f"guest one-byte writes/s, unobserved:          {unobserved:10.0f}")
        guest.shell("scenario busy start", check=True)
        rates: dict[str, list[float]] = {"step": [], "hop": [], "auto": [], "inline": []}
        stats = {}
        for _ in range(args.rounds):
            for mode in rates:
                rate, stats[mode] = trio.run(breakpoint_rate, guest, address, mode, args.seconds)
                rates[mode].append(rate)
        msr_ms = trio.run(msr_read_ms, guest, address)
        guest.shell("scenario busy stop", check=True)
        naive = statistics.median(rates["step"])
        hop = statistics.median(rates["hop"])
        print(f"breakpoint events/s, naive (step then cont):  {naive:10.0f}  (= guest writes/s while watched)")
        auto = statistics.median(rates["auto"])
        print(f"breakpoint events/s, hop (next-insn bp):      {hop:10.0f}  ratio {hop / naive:.2f}x  {stats['hop']}")
        print(f"breakpoint events/s, emulated step-over:      {auto:10.0f}  ratio {auto / naive:.2f}x  {stats['auto']}")
        inline = statistics.median(rates["inline"])
        print(f"breakpoint events/s, inline hook:             {inline:10.0f}  ratio {inline / naive:.2f}x  {stats['inline']}")
        print("  all rounds: " + " ".join(f"{m} {[round(r) for r in v]}" for m, v in rates.items()))
        print(f"  TB flushes in QEMU (info jit): {tb_flushes(guest)}")
        print(f"one MSR read through the rdmsr probe:         {msr_ms:10.2f} ms (no flush)")
        ctl = trio.run(control_numbers, guest)
        print(f"pause+resume latency:                         {ctl['pause_resume_ms']:10.2f} ms")
        print(f"single steps/s (irq+timers masked):           {ctl['steps_per_s']:10.0f}")
        print(f"single steps/s (unmasked):                    {ctl['steps_unmasked_per_s']:10.0f}")
        print(f"read bandwidth, mapped RAM file:              {ctl['file_mb_s']:10.0f} MB/s")
        print(f"read bandwidth, gdbstub m packets:            {ctl['stub_mb_s']:10.2f} MB/s  "
              f"ratio {ctl['file_mb_s'] / ctl['stub_mb_s']:.0f}x")
        print(f"one u64 read from the mapped file:            {ctl['u64_read_us']:10.2f} us")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
