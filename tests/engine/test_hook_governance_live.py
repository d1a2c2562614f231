"""Governance on inline hooks, on the lab guest: a hot hook is unhooked, re-armed on its own slot.

A watch with a tight budget (30 hits a second, 2 s cooldown) hooks ``handle_mm_fault`` (a guarded
hook: user-mode page faults) and ``ksys_write`` (a plain ftrace-NOP hook). ``dd bs=1`` makes
both hot: each is demoted ("unhook"). After the cooldown QEMU's own view of each function (HMP
``x`` on the lab's monitor) shows the call again, to the trampoline it had before the demotion,
and a few faults and writes made then reach the rules again.
"""

from __future__ import annotations

import struct

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.governance import Budget
from vmwatch.engine.sources import source_for
from vmwatch.engine.watch_options import WatchOptions
from vmwatch.live import inline_hooks as ih
from vmwatch.rules import RuleSet, rule, rules_of

pytestmark = pytest.mark.guest
TIGHT = WatchOptions(budget=Budget(max_hits=30, cooldown=2.0, max_cooldown=2.0))
HOT = "dd if=/dev/zero of=/dev/null bs=1 count=3000"


def kallsyms(guest, name: str) -> int:
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    return int(guest.shell(f"grep ' {name}$' /proc/kallsyms", check=True).split()[0], 16)


def call_target(guest, address: int) -> int | None:
    """Where the call QEMU executes at ``address`` goes (None: no call there)."""
    text = str(guest.qmp().execute("human-monitor-command", {"command-line": f"x /5xb {address:#x}"}))
    code = bytes(int(tok, 16) for line in text.splitlines() for tok in line.split(":", 1)[1].split())
    if code[0] != ih.CALL_REL32:
        return None
    return address + ih.SITE_SIZE + struct.unpack_from("<i", code, 1)[0]


async def test_a_demoted_hook_comes_back_on_its_slot(lab_guest):
    from vmwatch.target import open_target

    sites = {name: kallsyms(lab_guest, name) for name in ("handle_mm_fault", "ksys_write")}
    hits = {"faults": 0, "writes": 0}
    rules = {
        "faults": rule.on_exception("page_fault", user=True)(lambda e, g: hits.__setitem__("faults", hits["faults"] + 1)),
        "writes": rule.on_breakpoint("ksys_write")(lambda e, g: hits.__setitem__("writes", hits["writes"] + 1)),
    }

    async def shell(command: str) -> str:
        return await trio.to_thread.run_sync(lambda: lab_guest.shell(command, timeout=120))

    async def slots() -> dict[str, int | None]:
        return {n: await trio.to_thread.run_sync(call_target, lab_guest, a) for n, a in sites.items()}

    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), RuleSet(rules_of({"__name__": __name__, **rules}, "gov")), [ListSink()],
                        options=TIGHT)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(120):
                while engine.summary.traps < 4:  # 3 guarded fault hooks and ksys_write
                    await trio.sleep(0.05)
                first = await slots()
                assert None not in first.values(), first
                while {n for n in sites if any(f" {n} " in d.trap for d in engine.summary.demotions)} != set(sites):
                    await shell(HOT)
                assert all(d.action.startswith("unhooked") for d in engine.summary.demotions), engine.summary.demotions
                while (again := await slots()) != first:  # re-armed after the cooldown
                    await trio.sleep(0.1)
                before = dict(hits)
                demoted = len(engine.summary.demotions)
                await shell("echo hello > /dev/null; cat /proc/version > /dev/null")
                await trio.sleep(0.5)
            engine.stop()
        stats = dict(target.live.stats)
    print(f"{demoted} demotions, {stats}, hits {before} -> {hits}")
    assert hits["faults"] > before["faults"] and hits["writes"] > before["writes"], (before, hits)
    assert stats["trampolines_reused"] >= 2, stats
    assert again == first
    assert await slots() == {n: None for n in sites}  # the watch ended: NOPs back
    assert "alive" in lab_guest.shell("echo alive", check=True)
