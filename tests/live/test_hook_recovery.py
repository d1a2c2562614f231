"""Inline hooks a watch leaves behind when it dies, and hooks governance takes away and puts back.

On a guest of its own (one boot for the module): ``vmwatch watch --rules security timeline`` plus
a page-fault rule arms the three kinds of hook (guarded ones on the fault path, the ``mov crN``
of ``native_write_cr0/4``, plain ftrace-NOP ones of the Linux sensors) and is killed with
SIGKILL. The calls it patched stay in the guest (QEMU's own view, HMP ``x`` on the lab's
monitor, shows them). The next watch takes them over -- or, for a guarded hook whose guard is
not its own, puts the NOP back and places its own -- sees events through them, and when it
ends every hooked function's bytes are what QEMU showed before the first watch; the guest's
shell still answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import vmwatch
from vmwatch.engine import Engine, ListSink
from vmwatch.engine.governance import Budget
from vmwatch.engine.sources import source_for
from vmwatch.engine.watch_options import WatchOptions
from vmwatch.rules import RuleSet

pytestmark = pytest.mark.guest
FUNCTIONS = ("handle_mm_fault", "do_kern_addr_fault", "__bad_area_nosemaphore", "native_write_cr0",
             "native_write_cr4", "wake_up_new_task", "begin_new_exec", "do_exit")
SPAN = 64
PF_RULES = """
from vmwatch.rules import rule

@rule.on_exception("page_fault", {filters})
def faults(event, guest):
    pass
"""


@pytest.fixture(scope="module")
def own_guest(lab_guest_factory):
    return lab_guest_factory()


def kallsyms(guest) -> dict[str, int]:
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    out = guest.shell("grep -E ' (" + "|".join(FUNCTIONS) + ")$' /proc/kallsyms", check=True)
    found = {name: int(addr, 16) for addr, _, name in (line.split() for line in out.splitlines() if line.strip())
             if name in FUNCTIONS}
    assert set(found) == set(FUNCTIONS), out
    return found


def executed(guest, address: int, n: int = SPAN) -> bytes:
    """The bytes QEMU executes at ``address`` (HMP ``x`` on the lab's own monitor)."""
    text = str(guest.qmp().execute("human-monitor-command", {"command-line": f"x /{n}xb {address:#x}"}))
    return bytes(int(tok, 16) for line in text.splitlines() for tok in line.split(":", 1)[1].split())


def rules_file(tmp: Path, filters: str) -> Path:
    path = tmp / "pf_rules.py"
    path.write_text(PF_RULES.format(filters=filters))
    return path


def first_watch_dies(guest, tmp: Path, rules: Path, addresses: dict[str, int], before: dict[str, bytes]) -> None:
    """Start the watch, wait until every function's bytes changed in the guest, SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=str(Path(vmwatch.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "vmwatch", "watch", guest.target, "--rules", "security",
                             "timeline", str(rules), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240

        def all_patched() -> None:  # (governance may have a hot one unhooked for a while)
            while True:
                patched = {n for n, a in addresses.items() if executed(guest, a) != before[n]}
                if patched == set(addresses):
                    return
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, sorted(set(addresses) - patched)
                time.sleep(0.2)

        all_patched()
        guest.shell("scenario procs 2; scenario fault pf", timeout=120)  # the trampolines run
        all_patched()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


async def second_watch(guest, rules: Path, addresses: dict[str, int]) -> tuple[set[str], dict[str, int], dict, dict]:
    """The kinds of events stored, the calls of each rule and sensor, the backend's stats, and
    each function's bytes as QEMU executes them while the watch runs."""
    from vmwatch.target import open_target

    async with open_target(guest.target) as target:
        ruleset = RuleSet.load(["security", "timeline", str(rules)])
        sink = ListSink()
        engine = Engine(source_for(target), ruleset, [sink],
                        options=WatchOptions(budget=Budget(max_hits=10**6, max_cost=1e6)))
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(120):
                while engine.summary.traps == 0:
                    await trio.sleep(0.05)
            armed = {n: await trio.to_thread.run_sync(executed, guest, a) for n, a in addresses.items()}
            out = await trio.to_thread.run_sync(lambda: guest.shell(
                "scenario procs 2; scenario fault pf; echo 1 > /proc/sys/vm/drop_caches", timeout=120))
            assert "scenario procs" in out, out
            await trio.sleep(1)
            engine.stop()
        stats = dict(target.live.stats)
        assert not engine.summary.rule_errors, engine.summary
    calls = {name: run.calls for name, run in engine.runs.items()}
    return {r.kind for r in sink.events}, calls, stats, armed


@pytest.mark.parametrize("filters", ['user=True', 'user=False'], ids=["same-guards", "other-guards"])
async def test_hooks_left_by_a_killed_watch_are_taken_back(own_guest, tmp_path, filters):
    """Killed with the same rules as the next watch's, or with another page-fault filter (the
    guarded trampolines left behind then test another guard than the next watch wants)."""
    addresses = kallsyms(own_guest)
    before = {n: executed(own_guest, a) for n, a in addresses.items()}
    first_watch_dies(own_guest, tmp_path, rules_file(tmp_path, filters), addresses, before)
    left = {n: executed(own_guest, a) for n, a in addresses.items()}
    assert all(left[n] != before[n] for n in addresses), [n for n in addresses if left[n] == before[n]]

    kinds, calls, stats, armed = await second_watch(own_guest, rules_file(tmp_path, "user=True"), addresses)
    print(f"{filters}: {stats} {calls}")
    assert calls["sensor.page_fault_hooks"] > 0 and "ProcessStart" in kinds, (calls, kinds)
    after = {n: executed(own_guest, a) for n, a in addresses.items()}
    assert {n for n in addresses if after[n] != before[n]} == set(), \
        {n: (before[n][:16].hex(), after[n][:16].hex()) for n in addresses if after[n] != before[n]}
    # the 2 movs are put back then hooked again; guarded hooks with another guard get their NOP
    # back and a trampoline of their own; the rest (3 sensors' + the CR3 switch hook) taken over
    restored = 2 if filters == "user=True" else 2 + 3
    assert stats.get("hooks_restored") == restored, stats
    assert stats.get("hooks_taken_over", 0) >= len(FUNCTIONS) - restored, stats
    assert stats["guarded_hooks"] == 3, stats
    # while it ran: the same calls to the same trampolines, but where another guard's were left
    same = {n for n in addresses if armed[n] == left[n]}
    guarded = {"handle_mm_fault", "do_kern_addr_fault", "__bad_area_nosemaphore"}
    assert same == (set(addresses) if filters == "user=True" else set(addresses) - guarded), same
    assert stats["trampolines_reused"] == 2, stats  # the movs' (a taken-over hook's is counted above)
    assert own_guest.shell("echo alive", check=True).strip().endswith("alive")
