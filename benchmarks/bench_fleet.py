"""Pump throughput with one guest vs several in one process (a fleet watch).

Each guest is an :class:`Engine` on a synthetic stream of its own, all in one trio nursery,
feeding shared sinks through :class:`vmwatch.engine.fleet.SharedSink`, as ``vmwatch watch A B``
runs them. Two streams: breakpoint events to a no-op rule (the pump alone), and ProcessStart
events every one of which is recorded into a shared SQLite timeline (the pump plus the sink).
One trio thread runs every engine, so the total rate is what to compare: the ratio shows what
running guests side by side costs over running them one after the other.

With ``--live``: two lab guests (TCG) watched with the timeline pack by one :class:`Fleet`,
first one guest, then both, each running ``scenario procs N`` (2N short-lived processes) at the
same time; events/s the pump took in while the scenarios ran, and their wall time.

Run: ``.venv/bin/python benchmarks/bench_fleet.py [--events N] [--guests 1 2 4] [--live [--procs N]]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _cli import parse_args

import trio

from vmwatch.engine import Budget, Engine, ListSink, SqliteSink, SyntheticSource, WatchOptions
from vmwatch.engine.fleet import SharedSink
from vmwatch.events import Breakpoint, ProcessStart
from vmwatch.rules import RuleSet, rule, rules_of

ADDRESS = 0xFFFFFFFF81000000


@rule.on_breakpoint(ADDRESS)
def noop(event, guest):
    pass


@rule.on(ProcessStart)
def started(event, guest):
    pass


def _rate(func, make_event, guests: int, n: int, db: Path | None) -> float:
    """Events per second, all guests together, from the first engine start to the last end."""
    ruleset = RuleSet(rules_of({func.__name__: func, "__name__": __name__}, "bench"))
    options = WatchOptions(budget=Budget(max_hits=1 << 62, max_cost=float("inf")), sink_queue=1 << 16)

    async def main() -> float:
        sink = SqliteSink(db) if db is not None else ListSink()
        shared = [SharedSink(sink)]
        engines = [Engine(SyntheticSource([make_event(i) for i in range(n)], name=f"vm{g}", batch=512),
                          ruleset, shared, options=options) for g in range(guests)]
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for engine in engines:
                nursery.start_soon(engine.run)
        await sink.aclose()
        seconds = time.perf_counter() - t0
        for engine in engines:
            assert engine.summary.events == n + 1 and not engine.summary.dropped_records, engine.summary
        return guests * n / seconds

    return trio.run(main)


def bench_live(procs: int) -> None:
    from vmwatch.lab import LabConfig, LabGuest

    print(f"live fleet, lab guests (TCG), timeline pack, 'scenario procs {procs}' in every watched guest at once")
    guests = []
    try:
        for i in range(2):
            guests.append(LabGuest.start(LabConfig(name=f"bench-{i}", kaslr=False)))
        base = None
        for k in (1, 2):
            events, seconds = trio.run(_live_round, guests[:k], procs)
            total = sum(events.values()) / seconds
            base = base or total
            print(f"    {k} guest{'s' if k > 1 else ' '}: {total:>7,.0f} events/s in total "
                  f"({', '.join(f'{vm} {n:,}' for vm, n in events.items())} events in {seconds:.1f} s); "
                  f"total vs 1 guest {total / base:4.2f}x")
    finally:
        for guest in guests:
            guest.stop()


async def _live_round(guests: list, procs: int) -> tuple[dict[str, int], float]:
    from vmwatch.engine.fleet import Fleet

    fleet = Fleet([g.target for g in guests], RuleSet.load(["timeline"]), [ListSink()])
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        engines = fleet.engines
        while len(engines) < len(guests) or any(not e.summary.traps and not e.summary.inactive
                                                for e in engines.values()):
            await trio.sleep(0.05)
        await trio.sleep(1.0)
        before = {vm: e.summary.events for vm, e in engines.items()}
        t0 = time.perf_counter()
        async with trio.open_nursery() as work:
            for guest in guests:
                work.start_soon(trio.to_thread.run_sync, guest.shell, f"scenario procs {procs}", 600.0)
        seconds = time.perf_counter() - t0
        events = {vm: e.summary.events - before[vm] for vm, e in engines.items()}
        fleet.stop()
    return events, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per guest")
    parser.add_argument("--guests", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--live", action="store_true", help="also two live lab guests")
    parser.add_argument("--procs", type=int, default=100, help="live: scenario procs N per guest")
    args = parse_args(parser)
    n = args.events
    print(f"fleet pump throughput, {n:,} synthetic events per guest, best of 3")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("no-op breakpoint rule, no sink writes", noop, lambda i: Breakpoint(seq=i, time_ns=i, address=ADDRESS),
                  False),
                 ("ProcessStart, each recorded in a shared SQLite timeline", started,
                  lambda i: ProcessStart(seq=i, time_ns=i, pid=i, comm="bench"), True)]
        for title, func, make_event, with_db in cases:
            print(f"  {title}:")
            base = None
            for guests in args.guests:
                best = 0.0
                for attempt in range(3):
                    db = Path(tmp) / f"{func.__name__}-{guests}-{attempt}.db" if with_db else None
                    best = max(best, _rate(func, make_event, guests, n, db))
                base = base or best
                print(f"    {guests} guest{'s' if guests > 1 else ' '}: {best:>10,.0f} events/s in total, "
                      f"{best / guests:>10,.0f}/s per guest; total vs 1 guest {best / base:4.2f}x")
    if args.live:
        bench_live(args.procs)


if __name__ == "__main__":
    main()
