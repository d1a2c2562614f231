"""``@rule.on_register("cr3")`` on the live lab guest: one inline hook on ``load_new_mm_cr3``.

Two truths: the guest's own context-switch counter (/proc/stat ``ctxt``, read before and after
the watch) bounds the number of address-space switches (a switch to a kernel thread or within
one process keeps CR3), and the CPU's CR3 itself: at each switch the vCPU still runs with the
value the previous switch wrote, so every event's computed ``new`` must be the CR3 register QEMU
reports at the next event.
"""

from __future__ import annotations

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.sources import source_for
from vmwatch.rules import RuleSet, rule, rules_of

pytestmark = pytest.mark.guest
SLOW = 180.0


def _ctxt(lab_guest) -> int:
    for line in lab_guest.shell("cat /proc/stat", timeout=SLOW).splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise AssertionError("no ctxt line in /proc/stat")


async def test_cr3_switches_are_cheap_and_match_the_cpu(lab_guest, start_armed):
    from vmwatch.target import open_target

    seen: list[tuple[int, int | None, int]] = []

    @rule.on_register("cr3")
    def switches(event, guest):
        seen.append((guest.registers.cr3, event.old, event.new))

    before = await trio.to_thread.run_sync(_ctxt, lab_guest)
    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), RuleSet(rules_of({"__name__": __name__, "switches": switches}, "as")),
                        [ListSink()])
        async with trio.open_nursery() as nursery:
            await start_armed(nursery, engine, 1)
            assert target.live.is_inline(engine.guest.linux.symbols["load_new_mm_cr3"])  # no flush per stop
            t0 = trio.current_time()
            await trio.to_thread.run_sync(lambda: lab_guest.shell("scenario procs 20", timeout=SLOW))
            seconds = trio.current_time() - t0
            engine.stop()
    after = await trio.to_thread.run_sync(_ctxt, lab_guest)
    summary = engine.summary
    assert not summary.rule_errors and not summary.demotions, summary
    switched = after - before
    print(f"{len(seen)} CR3 switches in {seconds:.1f} s ({len(seen) / seconds:.0f}/s); guest ctxt +{switched}")
    assert 40 <= len(seen) <= switched, (len(seen), switched)  # 40 processes ran: each was switched to
    assert len(seen) * 20 >= switched, (len(seen), switched)  # the same order as the guest's count
    assert all(new & 0xFFF == 0 for _, _, new in seen)  # no PCID on this CPU model
    agree = sum(seen[i + 1][0] == seen[i][2] for i in range(len(seen) - 1))
    assert agree == len(seen) - 1, [(hex(c), hex(n)) for c, _, n in seen[:10]]
    assert all(seen[i + 1][1] == seen[i][2] for i in range(len(seen) - 1))  # old: the previous new
