"""Interrupt events derived from breakpoints on the IDT's handler entries.

The IDT (at IDTR.base) names one entry point per vector; Linux gives every vector its own stub
(``asm_exc_*``, ``irq_entries_start + 8*n``...), so a breakpoint on a vector's entry means that
vector was delivered. Vectors sharing an entry are reported as the lowest one listened to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from vmwatch.errors import VmwatchError
from vmwatch.events import Breakpoint, Interrupt

if TYPE_CHECKING:
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()


class InterruptSensor:
    """Breakpoint at a handler entry -> :class:`Interrupt` of its vector."""

    def __init__(self, vectors: dict[int, int]) -> None:
        self.vectors = vectors
        """Handler address -> vector."""

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        vector = self.vectors.get(event.address)
        if vector is not None:
            guest.emit(Interrupt(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, vector=vector))


async def plan(engine: SensorHost, wanted: dict[str, list]) -> None:
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler, Trap

    vectors = sorted(int(k.split(":", 1)[1]) for k in wanted if k.startswith("interrupt:"))
    if not vectors or caps.BREAKPOINTS not in engine.capabilities:
        return
    try:
        cpus = tuple(await engine.source.all_registers()) if caps.REGISTERS in engine.capabilities else ()
        if not cpus:
            raise VmwatchError("the source gives no registers (IDTR)")
        entries = {e.vector: e for e in engine.guest.kernel.idt(cpus[0])}
    except VmwatchError as exc:
        engine.inactive(f"interrupt sensor (vectors {vectors})", str(exc))
        return
    by_address: dict[int, int] = {}
    for vector in vectors:
        entry = entries.get(vector)
        if entry is None or not entry.address:
            engine.inactive(f"interrupt sensor (vector {vector})", "no handler in the IDT")
            continue
        by_address.setdefault(entry.address, vector)
    run = engine.sensor_run("sensor.interrupts")
    run.func = InterruptSensor(by_address)
    for address, vector in by_address.items():
        await engine.add_trap(Trap("breakpoint", address, 1, f"vector {vector} entry"), Handler(run, None))
    log.info("interrupt sensor armed", vectors=vectors)
