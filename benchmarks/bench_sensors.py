"""Events per second of the exception, CR3 and MMIO sensors on the live lab guest.

For each kind one watch with one counting rule, no governance limit (the rate the sensor can
deliver, not what the default budget lets through), while the guest runs ``scenario procs N``
(short-lived processes: page faults, address-space switches, timer and serial interrupts) and
then ``fault ud`` M times (the lab's /bin/fault: one #UD each); the guest's own time for the
workload, without and with the watch, gives the slowdown.

Page faults three ways: (a) the IDT breakpoint (inline hooks off: a flushing stop per fault),
(b) the guarded hooks of engine/page_fault_hooks.py with a filter every fault passes, (c) the
same hooks with a filter no fault passes (pid 1, the idle init): the guard runs in the guest and
nothing stops. ``guest pgfault/s`` is the guest's own /proc/vmstat count over its own time.

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


PAGE_FAULTS = {"#PF (a) IDT breakpoint": {}, "#PF (b) hook, all pass": {}, "#PF (c) hook, none pass": {"pid": 1}}


def _counting(kind: str):
    def count(event, guest):
        guest.state["n"] = guest.state.get("n", 0) + 1

    decorate = {**{k: rule.on_exception("page_fault", **f) for k, f in PAGE_FAULTS.items()},
                "#UD (ud2)": rule.on_exception("invalid_opcode"),
                "cr3 writes": rule.on_register("cr3"),
                "local APIC writes": rule.on_mmio(*LOCAL_APIC, "w")}[kind]
    return RuleSet(rules_of({"__name__": __name__, "count": decorate(count)}, "bench"))


def _timed(guest, procs: int, faults: int) -> tuple[float, int]:
    """The guest's seconds for the workload and its pgfault count meanwhile."""
    pgfault = "$(grep '^pgfault ' /proc/vmstat | cut -d' ' -f2)"
    out = guest.shell(f"f0={pgfault}; t0=$(cut -d' ' -f1 /proc/uptime); scenario procs {procs} >/dev/null; "
                      f"i=0; while [ $i -lt {faults} ]; do fault ud; i=$((i + 1)); done 2>/dev/null; "
                      f"t1=$(cut -d' ' -f1 /proc/uptime); echo $t0 $t1 $f0 {pgfault}", timeout=600)
    t0, t1, f0, f1 = out.split()[-4:]
    return float(t1) - float(t0), int(f1) - int(f0)


async def _under_watch(guest, kind: str, procs: int, faults: int) -> tuple[int, float, float, int, int]:
    from vmwatch.engine.sources import source_for
    from vmwatch.target import open_target

    ruleset = _counting(kind)
    async with open_target(guest.target) as target:
        if "(a)" in kind:
            target.live.inline_hooks = False  # the IDT breakpoint, the hooks' fallback
        engine = Engine(source_for(target), ruleset, [ListSink()], options=UNLIMITED)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            while engine.summary.traps == 0 and not engine.summary.inactive:
                await trio.sleep(0.05)
            t0 = time.perf_counter()
            guest_seconds, pgfaults = await trio.to_thread.run_sync(_timed, guest, procs, faults)
            wall = time.perf_counter() - t0
            engine.stop()
    hooks = engine.runs.get("sensor.page_fault_hooks")
    stops = hooks.calls if hooks is not None else 0
    return engine.runs["bench.count"].state.get("n", 0), wall, guest_seconds, pgfaults, stops


def main() -> None:
    from vmwatch.lab import LabGuest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=30)
    parser.add_argument("--faults", type=int, default=20)
    args = parse_args(parser)
    guest = LabGuest.start()
    try:
        _timed(guest, 5, 1)  # warm caches
        bare, bare_faults = min(_timed(guest, args.procs, args.faults) for _ in range(2))
        print(f"'scenario procs {args.procs}' and {args.faults} x 'fault ud' without vmwatch: "
              f"{bare:.2f} s of guest time, guest pgfault/s {bare_faults / bare:,.0f}")
        for kind in (*PAGE_FAULTS, "#UD (ud2)", "cr3 writes", "local APIC writes"):
            events, wall, seconds, pgfaults, stops = trio.run(_under_watch, guest, kind, args.procs, args.faults)
            print(f"  {kind:24} {events:>7,} events in {wall:6.2f} s ({events / wall:>6,.0f}/s); "
                  f"guest time {seconds:6.2f} s, slowdown {seconds / bare:6.2f}x"
                  + (f"; guest pgfault/s {pgfaults / seconds:,.0f}, hook stops {stops:,}" if "#PF" in kind else ""))
    finally:
        guest.stop()


if __name__ == "__main__":
    main()
