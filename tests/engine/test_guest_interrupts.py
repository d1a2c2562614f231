"""``@rule.on_interrupt`` on the live lab guest, against the guest's own interrupt counters.

The local APIC timer (LOC in /proc/interrupts) is Linux's LOCAL_TIMER_VECTOR 0xec; the serial
port's IRQ (the ttyS0 row) gets a vector at boot, found in the guest's per-CPU ``vector_irq``;
the APIC error interrupt (ERR, vector 0xfe) never happens on a healthy guest. The counters are
read before the watch starts and after it ends, so every event a rule saw lies between the two
reads: a rule must fire at least once and at most as often as the guest's own counter grew.
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


def _counters(lab_guest) -> tuple[dict[str, int], int]:
    """Totals per row of the guest's /proc/interrupts (summed over CPUs), and ttyS0's IRQ number."""
    lines = lab_guest.shell("cat /proc/interrupts", timeout=SLOW).splitlines()
    ncpu = sum(1 for word in lines[0].split() if word.startswith("CPU"))
    rows, serial = {}, None
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        counts = rest.split()[:ncpu]
        if name.strip() and len(counts) == ncpu and all(c.isdigit() for c in counts):
            rows[name.strip()] = sum(map(int, counts))
            if rest.split()[-1] == "ttyS0":
                serial = int(name)
    assert serial is not None, lines
    return rows, serial


def _vector_of_irq(linux, irq: int) -> int:
    """The vector CPU 0 delivers ``irq`` on: the guest's ``vector_irq[vector]->irq_data.irq``."""
    table = linux.per_cpu("vector_irq", 0)
    field = linux.types.offset("irq_desc", "irq_data.irq")
    for vector in range(0x20, 256):
        desc = linux.memory.u64(table + 8 * vector)
        if desc and desc < 2**64 - 16 and linux.memory.u32(desc + field) == irq:  # not VECTOR_UNUSED/SHUTDOWN
            return vector
    raise AssertionError(f"IRQ {irq} has no vector on CPU 0")


def _ruleset(seen: dict[str, list], serial: int) -> RuleSet:
    def record(name, event, guest):
        seen[name].append((event.vector, event.vcpu))
        guest.alert("info", f"vector {event.vector:#x}")

    @rule.on_interrupt(TIMER)
    def timer(event, guest):
        record("timer", event, guest)

    @rule.on_interrupt(serial)
    def serial_port(event, guest):
        record("serial_port", event, guest)

    @rule.on_interrupt(ERROR)
    def apic_error(event, guest):
        record("apic_error", event, guest)

    return RuleSet(rules_of({"__name__": __name__, "timer": timer, "serial_port": serial_port,
                             "apic_error": apic_error}, "irq"))


async def test_interrupt_rules_fire_for_interrupts_the_guest_counts(lab_guest):
    from vmwatch.os.linux import Linux
    from vmwatch.target import open_target

    shell = lab_guest.shell
    before, irq = await trio.to_thread.run_sync(_counters, lab_guest)
    assert {"LOC", "ERR"} <= set(before), before
    seen: dict[str, list] = {"timer": [], "serial_port": [], "apic_error": []}
    sink = ListSink()
    async with open_target(lab_guest.target) as target:
        linux = Linux.from_memory(target.memory, registers=tuple(await target.cpu_state()))
        serial = _vector_of_irq(linux, irq)
        engine = Engine(source_for(target), _ruleset(seen, serial), [sink])
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(60):
                while engine.summary.traps == 0:  # armed in the background after start
                    await trio.sleep(0.05)
            assert engine.summary.traps == 3 and not engine.summary.inactive, engine.summary
            # the IDT the sensor armed: the timer vector's handler is the kernel's APIC timer entry
            async with engine.guest_stopped():
                cpu0 = (await engine.source.all_registers())[0]
                names = {e.vector: e.symbol for e in engine.guest.linux.idt(cpu0)}
            assert names[TIMER] == "asm_sysvec_apic_timer_interrupt", names[TIMER]
            # work and serial output inside the guest (it ticks even when idle, but less often)
            await trio.to_thread.run_sync(lambda: shell("i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; "
                                                        "seq 200; sleep 2", timeout=SLOW))
            engine.stop()
    summary = engine.summary
    after, _ = await trio.to_thread.run_sync(_counters, lab_guest)

    assert not summary.rule_errors, summary
    for name, vector, row in (("timer", TIMER, "LOC"), ("serial_port", serial, str(irq))):
        taken = after[row] - before[row]
        assert seen[name], (name, summary, taken)
        assert {v for v, _ in seen[name]} == {vector}
        assert {vcpu for _, vcpu in seen[name]} <= {0}  # a one-vCPU guest
        assert len(seen[name]) <= taken, (name, len(seen[name]), taken)  # a demoted trap sees fewer, never more
    assert after["ERR"] == before["ERR"]
    assert seen["apic_error"] == []
    assert sorted(a.rule for a in sink.alerts) == sorted(f"irq.{n}" for n, hits in seen.items() for _ in hits)
