"""A synthetic live engine Source for recording tests: RAM that changes between events, a hole, events."""

from __future__ import annotations

import io
import random

import trio

from vmwatch.cpu import Registers
from vmwatch.events import Access, Breakpoint, MemoryAccess, Tick
from vmwatch.images.base import Run
from vmwatch.memory.physical import BufferMemory

RAM = 0x40000
HOLE = (0x20000, 0x10000)  # unmapped frames 0x20..0x2f


class SyntheticLive:
    """Yields ``count`` events; before each, it scribbles on RAM as a running guest would."""

    def __init__(self, memory: BufferMemory, buffer: bytearray, count: int, seed: int) -> None:
        self.name = "synthetic"
        self.memory = memory
        self.capabilities = frozenset({"registers", "pause", "breakpoints", "watchpoints"})
        self.realtime = False
        self.vcpu_count = 2
        self._buffer = buffer
        self._count = count
        self._rng = random.Random(seed)
        self.position = 0

    def _mutate(self) -> None:
        for _ in range(3):
            at = self._rng.randrange(0, HOLE[0] - 8)
            self._buffer[at:at + 8] = self._rng.randbytes(8)

    def event(self, i: int):
        kinds = (
            lambda: Breakpoint(seq=i, time_ns=1000 * i, vcpu=i % 2, address=0xFFFFFFFF81000000 + i),
            lambda: MemoryAccess(seq=i, time_ns=1000 * i, access=Access.WRITE, address=0x1000 + i,
                                 size=8, value=i.to_bytes(8, "little")),
            lambda: Tick(seq=i, time_ns=1000 * i),
        )
        return kinds[i % 3]()

    def events(self):
        return self

    def __aiter__(self):
        return self

    async def aclose(self):
        pass

    async def __anext__(self):
        if self.position >= self._count:
            raise StopAsyncIteration
        for hook in getattr(self, "on_resume", ()):  # the guest runs before the next event
            hook()
        self._mutate()
        self.position += 1
        return self.event(self.position - 1)

    async def registers(self, vcpu: int = 0) -> Registers:
        return Registers(vcpu=vcpu, rip=0xFFFFFFFF81000000 + self.position, rsp=0x7000 + vcpu,
                         cr3=0x5000, cr0=0x80050033, cr4=0x3406F0, efer=0xD01, msrs={"lstar": 0x1234})

    async def all_registers(self):
        return tuple([await self.registers(v) for v in range(self.vcpu_count)])

    async def resume(self) -> None:
        pass

    async def pause(self) -> None:
        pass

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False) -> None:
        pass

    async def remove_breakpoint(self, vaddr: int) -> None:
        pass

    async def add_watchpoint(self, vaddr: int, size: int, access) -> None:
        pass

    async def remove_watchpoint(self, vaddr: int, size: int, access) -> None:
        pass


def synthetic_source(count: int = 30, seed: int = 1, *, on_resume: bool = False) -> SyntheticLive:
    rng = random.Random(seed)
    buffer = bytearray(rng.randbytes(RAM))
    buffer[0x30000:0x38000] = bytes(0x8000)  # zero pages: deduplicated to one
    runs = [Run(start=0, size=HOLE[0], file_offset=0),
            Run(start=HOLE[0] + HOLE[1], size=RAM - HOLE[0] - HOLE[1], file_offset=HOLE[0] + HOLE[1])]
    memory = BufferMemory(buffer, runs=runs, volatile=True)
    source = SyntheticLive(memory, buffer, count, seed)
    if on_resume:
        source.on_resume = []
    return source


def handler_reads(seq: int) -> list[tuple[int, int]]:
    """What a deterministic 'rule' reads for event ``seq`` (some straddle pages, some repeat)."""
    rng = random.Random(seq)
    reads = [(0x1000, 64), (0x5FF8, 16)]
    for _ in range(4):
        reads.append((rng.randrange(0, HOLE[0] - 0x200), rng.randrange(1, 0x200)))
    reads.append((0x30000 + 0x1000 * (seq % 8), 32))
    return reads


def replay_json(path, rules, **run_options):
    """Replay the recording ``path`` with the pack file ``rules``: (JSON lines printed, summary)."""
    from vmwatch.engine.pump import watch
    from vmwatch.engine.sinks import JsonLinesSink
    from vmwatch.replay import open_replay
    from vmwatch.rules import RuleSet

    out = io.StringIO()

    async def session():
        with open_replay(path) as source:
            summary = await watch(source, RuleSet.load([rules]), [JsonLinesSink(out)])
            assert source.first_failure() is None
            return summary

    summary = trio.run(session, **run_options)
    assert not summary.rule_errors, summary.rule_errors
    return out.getvalue().splitlines(), summary
