"""Events per second of the exception, CR3 and MMIO sensors on the live lab guest.

For each kind one watch with one counting rule, no governance limit (the rate the sensor can
deliver, not what the default budget lets through), while the guest runs ``scenario procs N``
(short-lived processes: page faults, address-space switches, timer and serial interrupts) and
then ``fault ud`` M times (the lab's /bin/fault: one #UD each); the guest's own time for the
workload, without and with the watch, gives the slowdown.

Run: ``.venv/bin/python benchmarks/bench_sensors.py [--procs N] [--faults M]``
"""

from __future__ import annotations

import argparse
import time

from _cli import parse_args

import trio

from vmwatch.engine import Budget, Engine, ListSink, WatchOptions
from vmwatch.rules import RuleSet, rule, rules_of

UNLIMITED = WatchOptions(budget=Budget(max_hits=10**9, max_cost=1e9))
LOCAL_APIC = (0xFEE00000, 0x1000)


def _counting(kind: str):
    def count(event, guest):
        guest.state["n"] = guest.state.get("n", 0) + 1

    decorate = {"page faults": rule.on_exception("page_fault"),
                "#UD (ud2)": rule.on_exception("invalid_opcode"),
                "cr3 writes": rule.on_register("cr3"),
                "local APIC writes": rule.on_mmio(*LOCAL_APIC, "w")}[kind]
    return RuleSet(rules_of({"__name__": __name__, "count": decorate(count)}, "bench"))


def _timed(guest, procs: int, faults: int) -> float:
    out = guest.shell(f"t0=$(cut -d' ' -f1 /proc/uptime); scenario procs {procs} >/dev/null; "
                      f"i=0; while [ $i -lt {faults} ]; do fault ud; i=$((i + 1)); done 2>/dev/null; "
                      f"t1=$(cut -d' ' -f1 /proc/uptime); echo $t0 $t1", timeout=600)
    t0, t1 = (float(x) for x in out.split()[-2:])
    return t1 - t0


async def _under_watch(guest, kind: str, procs: int, faults: int) -> tuple[int, float, float]:
    from vmwatch.engine.sources import source_for
    from vmwatch.target import open_target

    ruleset = _counting(kind)
    async with open_target(guest.target) as target:
        engine = Engine(source_for(target), ruleset, [ListSink()], options=UNLIMITED)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            while engine.summary.traps == 0 and not engine.summary.inactive:
                await trio.sleep(0.05)
            t0 = time.perf_counter()
            guest_seconds = await trio.to_thread.run_sync(_timed, guest, procs, faults)
            wall = time.perf_counter() - t0
            engine.stop()
    return engine.runs["bench.count"].state.get("n", 0), wall, guest_seconds


def main() -> None:
    from vmwatch.lab import LabGuest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=30)
    parser.add_argument("--faults", type=int, default=20)
    args = parse_args(parser)
    guest = LabGuest.start()
    try:
        _timed(guest, 5, 1)  # warm caches
        bare = min(_timed(guest, args.procs, args.faults) for _ in range(2))
        print(f"'scenario procs {args.procs}' and {args.faults} x 'fault ud' without vmwatch: {bare:.2f} s of guest time")
        for kind in ("page faults", "#UD (ud2)", "cr3 writes", "local APIC writes"):
            events, wall, seconds = trio.run(_under_watch, guest, kind, args.procs, args.faults)
            print(f"  {kind:18} {events:>7,} events in {wall:5.2f} s ({events / wall:>6,.0f}/s); "
                  f"guest time {seconds:.2f} s, slowdown {seconds / bare:.2f}x")
    finally:
        guest.stop()


if __name__ == "__main__":
    main()
