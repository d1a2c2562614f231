"""``@rule.on_interrupt`` on the live lab guest, against the guest's own interrupt counters.

The local APIC timer (LOC in /proc/interrupts) is Linux's LOCAL_TIMER_VECTOR 0xec; the error
interrupt (ERR, vector 0xfe) never happens on a healthy guest. The guest's counters are read
before the watch starts and after it ends, so every event the rule saw lies between the two reads:
the rule must fire at least once and at most as often as the guest's own counter grew.
"""

from __future__ import annotations

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.sources import source_for
from vmwatch.rules import RuleSet, rule, rules_of

pytestmark = pytest.mark.guest
TIMER, ERROR = 0xEC, 0xFE
SLOW = 180.0


def _counters(lab_guest) -> dict[str, int]:
    """Total per row of the guest's /proc/interrupts (summed over CPUs)."""
    lines = lab_guest.shell("cat /proc/interrupts", timeout=SLOW).splitlines()
    ncpu = sum(1 for word in lines[0].split() if word.startswith("CPU"))
    rows = {}
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        counts = rest.split()[:ncpu]
        if name.strip() and len(counts) == ncpu and all(c.isdigit() for c in counts):
            rows[name.strip()] = sum(map(int, counts))
    return rows


def _ruleset(seen: dict[str, list]) -> RuleSet:
    @rule.on_interrupt(TIMER)
    def timer(event, guest):
        seen["timer"].append((event.vector, event.vcpu))
        guest.alert("info", f"vector {event.vector:#x}")

    @rule.on_interrupt(ERROR)
    def apic_error(event, guest):
        seen["error"].append((event.vector, event.vcpu))
        guest.alert("info", f"vector {event.vector:#x}")

    return RuleSet(rules_of({"__name__": __name__, "timer": timer, "apic_error": apic_error}, "irq"))


async def test_interrupt_rule_fires_for_the_guest_timer(lab_guest):
    from vmwatch.target import open_target

    shell = lab_guest.shell
    before = await trio.to_thread.run_sync(_counters, lab_guest)
    assert {"LOC", "ERR"} <= set(before), before
    seen: dict[str, list] = {"timer": [], "error": []}
    sink = ListSink()
    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), _ruleset(seen), [sink])
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(60):
                while engine.summary.traps == 0:  # armed in the background after start
                    await trio.sleep(0.05)
            assert engine.summary.traps >= 2 and not engine.summary.inactive, engine.summary
            # the IDT the sensor armed: the timer vector's handler is the kernel's APIC timer entry
            async with engine.guest_stopped():
                cpu0 = (await engine.source.all_registers())[0]
                names = {e.vector: e.symbol for e in engine.guest.linux.idt(cpu0)}
            assert names[TIMER] == "asm_sysvec_apic_timer_interrupt", names[TIMER]
            # keep the guest busy for a while (it ticks even when idle, but less often)
            await trio.to_thread.run_sync(lambda: shell("i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; "
                                                        "sleep 2", timeout=SLOW))
            engine.stop()
    summary = engine.summary
    after = await trio.to_thread.run_sync(_counters, lab_guest)

    assert not summary.rule_errors, summary
    ticks = after["LOC"] - before["LOC"]
    assert ticks > 0, (before, after)
    assert seen["timer"], (summary, ticks)
    assert {vector for vector, _ in seen["timer"]} == {TIMER}
    assert {vcpu for _, vcpu in seen["timer"]} <= {0}  # a one-vCPU guest
    assert len(seen["timer"]) <= ticks, (len(seen["timer"]), ticks)  # a demoted trap sees fewer, never more
    assert after["ERR"] == before["ERR"]
    assert seen["error"] == []
    assert [a.rule for a in sink.alerts] == ["irq.timer"] * len(seen["timer"])
