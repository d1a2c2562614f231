"""On the live lab guest the engine pauses the guest from its own tasks (no wake-up breakpoint):
periodic rules run on time and guest_stopped() gets the stopped guest at once."""

from __future__ import annotations

import statistics

import pytest
import trio

pytestmark = pytest.mark.guest

PACK = """
import trio
from vmwatch.rules import rule

@rule.every(0.2)
def often(event, guest):
    guest.state.setdefault("at", []).append(trio.current_time())
    guest.state.setdefault("jiffies", []).append(guest.linux.memory.u64_symbol("jiffies_64"))
"""


def test_ticks_on_time_and_quick_borrowing(lab_guest, tmp_path):
    """A 0.2 s periodic rule runs every 0.2 s while the consumer waits for events that do not come
    (no trap at all is armed), and another task gets the stopped guest within milliseconds."""
    from vmwatch.engine import Engine, ListSink
    from vmwatch.engine.sources import source_for
    from vmwatch.rules import RuleSet
    from vmwatch.target import open_target

    pack = tmp_path / "often.py"
    pack.write_text(PACK)
    waits, running = [], []

    async def session():
        async with open_target(lab_guest.target) as target:
            engine = Engine(source_for(target), RuleSet.load([pack]), [ListSink()])
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                await trio.sleep(0.5)
                for _ in range(8):
                    asked = trio.current_time()
                    async with engine.guest_stopped():
                        waits.append(trio.current_time() - asked)
                        running.append(await target.live.status())
                    await trio.sleep(0.3)
                engine.stop()
        return engine

    engine = trio.run(session)
    assert engine.summary.traps == 0 and not engine.summary.inactive
    state = engine.runs["often.often"].state
    gaps = [b - a for a, b in zip(state["at"], state["at"][1:])]
    assert len(gaps) >= 10
    assert 0.15 < statistics.mean(gaps) < 0.3 and max(gaps) < 0.6, gaps
    assert state["jiffies"] == sorted(state["jiffies"]) and len(set(state["jiffies"])) > len(gaps) // 2
    assert all(status != "running" for status in running), running  # QEMU itself says stopped
    assert statistics.median(waits) < 0.1, waits
