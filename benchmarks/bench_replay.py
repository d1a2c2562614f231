"""Replay throughput (events/s) against the same engine run on the original in-memory source.

Three runs of one synthetic session (N events, rules that read guest memory and registers):

1. baseline: the engine on the source itself (no recording);
2. record:   the same, through the recorder (what ``watch --record`` costs);
3. replay:   the engine on the recording (``vmwatch replay``), no source at all.

Prints events/s for each, the ratios to the baseline, and the recording's size.
Usage: .venv/bin/python benchmarks/bench_replay.py [EVENTS]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _cli import parse_args  # noqa: E402

from vmwatch.cpu import Registers  # noqa: E402
from vmwatch.engine.pump import WatchOptions, watch  # noqa: E402
from vmwatch.engine.governance import Budget  # noqa: E402
from vmwatch.engine.sinks import JsonLinesSink  # noqa: E402
from vmwatch.events import Breakpoint  # noqa: E402
from vmwatch.memory.physical import BufferMemory  # noqa: E402
from vmwatch.replay import open_replay, recording_source  # noqa: E402
from vmwatch.rules import RuleSet  # noqa: E402

RAM = 16 << 20
SITES = [0xFFFFFFFF81000000 + 0x40 * i for i in range(8)]
RULES = textwrap.dedent(f'''
    from vmwatch.rules import rule

    @rule.on_breakpoint({SITES[0]:#x})
    @rule.on_breakpoint({SITES[1]:#x})
    @rule.on_breakpoint({SITES[2]:#x})
    @rule.on_breakpoint({SITES[3]:#x})
    def look(event, guest):
        base = (event.seq * 0x3000) % ({RAM:#x} - 0x2000)
        data = guest.phys.read(base, 64) + guest.phys.read(0x1000 + (event.seq % 64) * 8, 8)
        if data[0] == 0x42:
            guest.alert("info", "byte 0x42", pid=1, at=hex(base), rip=hex(guest.registers.rip))
''')


class Source:
    """A pausable in-memory source: a breakpoint storm over 16 MiB of changing RAM."""

    name = "bench"
    capabilities = frozenset({"registers", "pause", "breakpoints"})
    realtime = False

    def __init__(self, count: int) -> None:
        rng = random.Random(5)
        self._buffer = bytearray(rng.randbytes(RAM))
        self.memory = BufferMemory(self._buffer, volatile=True)
        self._count = count
        self._rng = rng
        self.position = 0

    def events(self):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.position >= self._count:
            raise StopAsyncIteration
        i = self.position
        self.position += 1
        at = self._rng.randrange(RAM - 8)
        self._buffer[at:at + 8] = self._rng.randbytes(8)
        return Breakpoint(seq=i, time_ns=i * 1000, address=SITES[i % len(SITES)])

    async def aclose(self) -> None:
        pass

    async def registers(self, vcpu: int) -> Registers:
        return Registers(vcpu=vcpu, rip=SITES[self.position % len(SITES)], cr3=0x1000)

    async def all_registers(self):
        return (await self.registers(0),)

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False) -> None:
        pass

    async def remove_breakpoint(self, vaddr: int) -> None:
        pass


def run(source, ruleset) -> tuple[float, str, int]:
    out = io.StringIO()
    options = WatchOptions(budget=Budget(max_hits=1 << 62, max_cost=float("inf")))
    started = time.perf_counter()
    summary = trio.run(lambda: watch(source, ruleset, [JsonLinesSink(out, events=False)], options=options))
    return time.perf_counter() - started, out.getvalue(), summary.events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, nargs="?", default=20_000, help="events to pump (default 20,000)")
    count = parse_args(parser).count
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "bench_rules.py"
        pack.write_text(RULES)
        ruleset = RuleSet.load([pack])
        base_s, base_alerts, n = run(Source(count), ruleset)
        path = Path(tmp) / "bench.vmwr"
        with recording_source(Source(count), path) as source:
            rec_s, rec_alerts, _ = run(source, RuleSet.load([pack]))
        t0 = time.perf_counter()
        with open_replay(path) as source:
            open_s = time.perf_counter() - t0
            rep_s, rep_alerts, _ = run(source, RuleSet.load([pack]))
        size = os.path.getsize(path)
    assert base_alerts == rec_alerts == rep_alerts, "replay must reproduce the alerts exactly"
    print(f"events: {n}, alerts: {base_alerts.count(chr(10))} (identical in all three runs)")
    for label, seconds in (("baseline (engine on source)", base_s), ("record (watch --record)", rec_s),
                           ("replay (from the file)", rep_s)):
        print(f"{label:<30} {n / seconds:>10,.0f} events/s  {seconds:6.2f} s  x{base_s / seconds:.2f} of baseline")
    print(f"recording: {size / 1e6:.2f} MB, {size / n:.0f} bytes/event (random RAM: pages do not compress);"
          f" opening and checking it: {open_s:.2f} s ({size / 1e6 / open_s:.0f} MB/s)")


if __name__ == "__main__":
    main()
