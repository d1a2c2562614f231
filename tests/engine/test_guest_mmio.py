"""``@rule.on_mmio`` on the live lab guest: the local APIC, named as the guest's own /proc/iomem names it.

The lab CPU model has no x2APIC, so Linux drives its local APIC through MMIO: it acknowledges
every interrupt by writing 0 to the EOI register (offset 0xb0), and re-arms its one-shot timer
through the initial-count register (0x380). /proc/interrupts, read before and after the watch,
bounds the EOIs: at most one per interrupt the guest counted, and the timer alone counts several.
The resource tree vmwatch reads from memory to find "Local APIC" must be the guest's /proc/iomem.
"""

from __future__ import annotations

import pytest
import trio

from vmwatch.engine import Budget, Engine, ListSink, WatchOptions
from vmwatch.engine.sources import source_for
from vmwatch.events import Access
from vmwatch.os.linux import resources
from vmwatch.rules import RuleSet, rule, rules_of

pytestmark = pytest.mark.guest
SLOW = 180.0
EOI, TMICT = 0xB0, 0x380
UNLIMITED = WatchOptions(budget=Budget(max_hits=10**6, max_cost=1e6))
"""Every hit dispatched: the checks are about what an access looks like, not governance."""


def _local_apic(iomem: str) -> tuple[int, int]:
    for line in iomem.splitlines():
        span, _, name = line.partition(" : ")
        if name.strip() == "Local APIC":
            start, end = (int(x, 16) for x in span.strip().split("-"))
            return start, end + 1 - start
    raise AssertionError(iomem)


def _interrupts(lab_guest) -> int:
    """Interrupts of every source the guest counted (all rows, all CPUs)."""
    total = 0
    for line in lab_guest.shell("cat /proc/interrupts", timeout=SLOW).splitlines()[1:]:
        for word in line.partition(":")[2].split():
            if not word.isdigit():
                break
            total += int(word)
    return total


async def test_apic_writes_seen_with_register_and_value(lab_guest, start_armed, tmp_path):
    """EOIs are writes of 0 at 0xb0, no more than the guest's interrupts; a replay derives the same events."""
    from vmwatch.replay import open_replay, recording_source
    from vmwatch.target import open_target

    iomem = await trio.to_thread.run_sync(lambda: lab_guest.shell("cat /proc/iomem"))
    start, size = _local_apic(iomem)
    seen: list = []

    @rule.on_mmio("Local APIC")
    def apic(event, guest):
        seen.append(event)

    before = await trio.to_thread.run_sync(_interrupts, lab_guest)
    sink, path = ListSink(), tmp_path / "apic.vmwr"
    ruleset = RuleSet(rules_of({"__name__": __name__, "apic": apic}, "mmio"))
    async with open_target(lab_guest.target) as target:
        with recording_source(source_for(target), path) as recorded:
            engine = Engine(recorded, ruleset, [sink], options=UNLIMITED)
            async with trio.open_nursery() as nursery:
                await start_armed(nursery, engine, 1)
                async with engine.guest_stopped():
                    tree = resources.iomem(engine.guest.linux)
                await trio.to_thread.run_sync(lambda: lab_guest.shell("seq 100; sleep 2", timeout=SLOW))
                engine.stop()
    after = await trio.to_thread.run_sync(_interrupts, lab_guest)
    assert not engine.summary.rule_errors, engine.summary
    eois = [e for e in seen if e.paddr == start + EOI]
    print(f"{len(seen)} APIC writes, {len(eois)} EOIs; guest interrupts +{after - before}")
    assert [f"{'  ' * r.depth}{r.start:08x}-{r.end:08x} : {r.name}" for r in tree] == iomem.strip("\n").splitlines()
    assert all(e.access is Access.WRITE and e.watched == ("Local APIC", 0) for e in seen)
    assert all(start <= e.paddr < start + size and e.size == 4 for e in seen), seen[:5]
    assert 3 <= len(eois) <= after - before, (len(eois), after - before)
    assert {e.value for e in eois} == {0}
    assert any(e.paddr == start + TMICT and e.value for e in seen)  # the timer re-armed with a count

    stored = [r.as_dict() for r in sink.events if r.kind == "MmioAccess"]
    assert len(stored) == len(seen)
    replayed = ListSink()
    with open_replay(path) as source:
        again = await Engine(source, ruleset, [replayed]).run()
        assert source.first_failure() is None
    assert not again.rule_errors, again
    assert [r.as_dict() for r in replayed.events if r.kind == "MmioAccess"] == stored
