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
from vmwatch.engine.governance import Budget
from vmwatch.engine.sources import source_for
from vmwatch.engine.watch_options import WatchOptions
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


PING_PONG = 500
SERVER = ("mkfifo /tmp/pp.a /tmp/pp.b /tmp/pp.c; "
          # the server: echoes each line back; at EOF it blocks in open() of pp.c, so it stays
          # alive and switches no more while its counters are read from outside
          "sh -c 'exec 3</tmp/pp.a 4>/tmp/pp.b; while read x <&3; do echo $x >&4; done; read z </tmp/pp.c' & "
          "server=$!; "
          f"sh -c 'exec 3>/tmp/pp.a 4</tmp/pp.b; i=0; while [ $i -lt {PING_PONG} ]; do echo $i >&3; read y <&4; "
          "i=$((i + 1)); done'; "
          "sleep 0.5; echo $server; grep ctxt_switches /proc/$server/status")


def _switches(status: str) -> tuple[int, int]:
    found = dict(line.split(":") for line in status.splitlines() if "ctxt_switches" in line)
    return int(found["voluntary_ctxt_switches"]), int(found["nonvoluntary_ctxt_switches"])


async def test_cr3_loads_of_one_process_match_its_own_switch_count(lab_guest, start_armed):
    """A fifo ping-pong of two shells on the one vCPU: the server's CR3 is loaded once per switch to it.

    The guest's count is the server's own /proc/PID/status (voluntary + nonvoluntary switches
    away from it, since its fork). Bound, from how the scheduler loads CR3 (``switch_mm_irqs_off``
    loads only when the CPU's previous mm is another one):

    * at most switches + 1: each switch back to the server follows a switch away from it, and
      its exec loads the new mm once (``activate_mm``) with no switch at all; its loads before
      exec went to the mm it had from fork, another CR3;
    * at least one per line: the client (another mm) must run between the server's echo of a
      line and its read of the next, so the server is switched away (blocked, or preempted by
      the client it woke) and back, and coming back loads its CR3;
    * within 5% of switches: a switch away that comes back after kernel threads only (a
      kworker preempting the server borrows its mm) loads nothing; such preemptions are rare.

    Measured: 504 loads for 502 + 1 and for 501 + 5 switches, 520 for 395 + 127 (the server
    preempted at its echo by the client it woke).
    """
    from vmwatch.target import open_target

    loaded: list[int] = []

    @rule.on_register("cr3")
    def switches(event, guest):
        loaded.append(event.new & ~0xFFF & ((1 << 63) - 1))

    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), RuleSet(rules_of({"__name__": __name__, "switches": switches}, "as")),
                        [ListSink()], options=WatchOptions(budget=Budget(max_hits=10**6, max_cost=1e6)))
        async with trio.open_nursery() as nursery:
            await start_armed(nursery, engine, 1)
            out = await trio.to_thread.run_sync(lambda: lab_guest.shell(SERVER, timeout=SLOW))
            engine.stop()
        lines = out.strip().splitlines()
        pid = int(lines[-3])
        task = next(t for t in engine.guest.linux.tasks() if t.pid == pid)
    await trio.to_thread.run_sync(lambda: lab_guest.shell("echo > /tmp/pp.c; rm /tmp/pp.?", timeout=SLOW))
    voluntary, involuntary = _switches(out)
    mine = loaded.count(task.cr3)
    print(f"server pid {pid}: {mine} CR3 loads, {voluntary} voluntary + {involuntary} nonvoluntary switches; "
          f"{len(loaded)} loads in all")
    assert not engine.summary.rule_errors and not engine.summary.demotions, engine.summary
    switched = voluntary + involuntary
    assert PING_PONG <= mine <= switched + 1, (mine, voluntary, involuntary)
    assert switched - mine <= switched // 20, (mine, voluntary, involuntary)
