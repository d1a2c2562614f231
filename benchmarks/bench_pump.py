"""Engine throughput and guest slowdown.

1. Events per second through the pump on a synthetic stream of breakpoint events, with a no-op
   rule (goal 200,000/s) and with a rule doing cached guest-memory reads (goal 50,000/s). The
   baseline is the same rule called in a bare Python loop over the same events, so the ratio is
   the pump's own cost (dispatch index, governance, trio).
2. Guest slowdown with the shipped packs on the live lab guest: a timed loop inside the guest
   (``scenario writes N``: N one-byte write() calls, timed by the guest's own clock, which does
   not run while the guest is stopped), without and with ``vmwatch watch`` attached (goal: under
   2x). Skipped with ``--no-guest``. The ratio depends on the host: a gdbstub breakpoint stop
   costs the TCG guest re-translation time (~5 ms on an idle host per DESIGN.md, ~100-200 ms on
   the shared 2-core CI host); the packs' sensors are inline hooks whose stops flush nothing, and
   their periodic checks pause the guest (no flush either).

Run: ``.venv/bin/python benchmarks/bench_pump.py [--events N] [--no-guest] [--rules PACK]... [--enable RULE]...
[--disable RULE]... [--runs N]``
(``--events 0`` skips part 1).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from _cli import parse_args

import trio

from vmwatch.engine import Budget, Engine, ListSink, SyntheticSource, WatchOptions
from vmwatch.events import Breakpoint
from vmwatch.rules import RuleSet, rule, rules_of
from vmwatch.testing.fakeguest import FakeGuest

ADDRESS = 0xFFFFFFFF81000000


@rule.on_breakpoint(ADDRESS)
def noop(event, guest):
    pass


@rule.on_breakpoint(ADDRESS)
@rule.configure(base=ADDRESS)
def reads(event, guest):
    # four cached reads, as a rule following task->mm->pgd would do
    memory = guest.memory
    base = guest.config["base"]
    memory.u64(base)
    memory.u64(base + 8)
    memory.u32(base + 0x100)
    memory.u64(base + (event.seq & 0xFF) * 8)


def _pump_rate(func, events: list, fake: FakeGuest, base: int) -> float:
    ruleset = RuleSet(rules_of({func.__name__: func, "__name__": __name__}, "bench"))
    # no trap demotion: we measure throughput, not governance
    options = WatchOptions(budget=Budget(max_hits=1 << 62, max_cost=float("inf")))

    async def main() -> float:
        source = SyntheticSource(events, memory=fake.memory, batch=512)
        engine = Engine(source, ruleset, [ListSink()], options=options)
        engine.guest.registers = fake.registers  # the vCPU state rules read memory with
        t0 = time.perf_counter()
        await engine.run()
        seconds = time.perf_counter() - t0
        assert engine.summary.events == len(events) + 1, engine.summary
        return len(events) / seconds

    return trio.run(main)


def _bare_rate(func, events: list, fake: FakeGuest, base: int) -> float:
    from vmwatch.engine.dispatch import RuleRun
    from vmwatch.engine.guest import Guest

    guest = Guest(vm="bench", phys=fake.memory)
    guest.registers = fake.registers
    guest.rule = RuleRun("bench", func, config={"base": base})
    t0 = time.perf_counter()
    for event in events:
        func(event, guest)
    return len(events) / (time.perf_counter() - t0)


def bench_pump(n: int) -> None:
    fake = FakeGuest(seed=7, memory_size=16 << 20)
    mapping = fake.map(ADDRESS, 0x200000, 0x1000)
    assert mapping is not None
    events = [Breakpoint(seq=i, time_ns=i, address=ADDRESS) for i in range(n)]
    print(f"pump throughput, {n:,} synthetic breakpoint events")
    for func, goal in ((noop, 200_000), (reads, 50_000)):
        best = max(_pump_rate(func, events, fake, ADDRESS) for _ in range(3))
        bare = max(_bare_rate(func, events, fake, ADDRESS) for _ in range(3))
        verdict = "meets" if best >= goal else "MISSES"
        print(f"  {func.__name__:6} rule: {best:>10,.0f} events/s through the pump; bare loop {bare:>10,.0f}/s "
              f"(pump overhead {bare / best:4.1f}x); goal {goal:,}/s: {verdict}")


def bench_guest(writes: int, packs: list[str], enable: list[str], disable: list[str], runs: int) -> None:
    from vmwatch.lab import LabGuest

    names = "+".join(packs) + "".join(f" +{name}" for name in enable)
    without = [f"-{name}" for name in disable]
    print(f"guest slowdown, lab guest, 'scenario writes {writes}' timed by the guest; rules {names}; "
          f"{runs} rounds of: bare, watched, watched {' '.join(without) or '(same)'}")
    guest = LabGuest.start()
    try:
        def timed() -> float:
            out = guest.shell(f"scenario writes {writes}", timeout=300)
            cs = int(re.search(r"cs (\d+)", out).group(1))
            return cs / 100

        guest.shell("scenario writes 1000")  # warm caches
        rows = []
        for _ in range(runs):  # interleaved: a neighbour's load on the host hits all three alike
            rows.append((timed(), trio.run(_timed_under_watch, guest, timed, packs, enable, []),
                         trio.run(_timed_under_watch, guest, timed, packs, enable, disable)))
        bare, watched, reduced = (statistics.median(col) for col in zip(*rows))
        for b, w, r in rows:
            print(f"  round: bare {b:.2f} s, watched {w:.2f} s ({w / b:.2f}x), without {r:.2f} s ({r / b:.2f}x)")
        print(f"  medians: without vmwatch {bare:.2f} s; with {names} {watched:.2f} s, slowdown {watched / bare:.2f}x "
              f"(goal <= 1.25x: {'meets' if watched / bare <= 1.25 else 'MISSES'}); {' '.join(without) or 'same'}: "
              f"{reduced:.2f} s, {reduced / bare:.2f}x")
    finally:
        guest.stop()


async def _timed_under_watch(guest, timed, packs: list[str], enable: list[str], disable: list[str]) -> float:
    from vmwatch.engine.sources import source_for
    from vmwatch.target import open_target

    ruleset = RuleSet.load(packs)
    for name in enable:
        ruleset.enable(name)
    for name in disable:
        ruleset.disable(name)
    async with open_target(guest.target) as target:
        engine = Engine(source_for(target), ruleset, [ListSink()])
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            while engine.summary.traps == 0 and not engine.summary.inactive:
                await trio.sleep(0.05)
            await trio.sleep(1.0)
            result = await trio.to_thread.run_sync(timed)
            inline = sum(target.live.is_inline(t.address) for t in engine.dispatcher.traps.values()
                         if t.kind == "breakpoint")
            engine.stop()
    s = engine.summary
    print(f"  (watch: {s.traps} traps, {inline} of them inline hooks, {s.events:,} events, {s.total_alerts} alerts, "
          f"{len(s.demotions)} demotions, inactive: {'; '.join(s.inactive) or 'none'})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--writes", type=int, default=200_000)
    parser.add_argument("--no-guest", action="store_true")
    parser.add_argument("--rules", action="append", help="packs watched (default: security, timeline)")
    parser.add_argument("--enable", action="append", default=[], help="also enable this rule")
    parser.add_argument("--disable", action="append", default=None, help="the third watch of each round "
                        "leaves this rule out (default: security.control_register_write)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians reported)")
    args = parse_args(parser)
    if args.events:
        bench_pump(args.events)
    if not args.no_guest:
        bench_guest(args.writes, args.rules or ["security", "timeline"], args.enable,
                    ["security.control_register_write"] if args.disable is None else args.disable, args.runs)


if __name__ == "__main__":
    main()
