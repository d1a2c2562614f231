"""Page faults from the guarded hooks on the lab guest's C fault path, against what the guest reports.

* ``scenario fault pf`` writes to a page it unmapped and printed: the kernel logs the segfault
  (``fault[PID]: segfault at ADDR ip IP ... error 6``) and the watch sees that fault, with its
  cr2, rip, error code and pid, through ``__bad_area_nosemaphore``, with no IDT breakpoint armed.
* A filter that excludes it (kernel mode only, an address range elsewhere, pid 1) keeps it out;
  with the range or the pid, not one stop reaches the watch while the guest faults (the
  hook sensor's call count), the guard having said no in the guest.
* User/kernel split: the faults of ``cat /proc/self/stat`` the watch sees, user and kernel mode,
  are at most the minflt + majflt that cat prints of itself.
"""

from __future__ import annotations

import re

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.governance import Budget
from vmwatch.engine.sources import source_for
from vmwatch.engine.watch_options import WatchOptions
from vmwatch.rules import RuleSet, rule, rules_of

pytestmark = pytest.mark.guest
SLOW = 180.0
UNLIMITED = WatchOptions(budget=Budget(max_hits=10**6, max_cost=1e6))
FAULT_SEGV = re.compile(r"fault\[(\d+)\]: segfault at ([0-9a-f]+) ip ([0-9a-f]+) sp [0-9a-f]+ error ([0-9a-f]+)")


async def _watch(lab_guest, start_armed, rules: dict, command: str, traps: int = 3,
                 hooks: bool = True) -> tuple[Engine, str, dict]:
    from vmwatch.target import open_target

    async with open_target(lab_guest.target) as target:
        target.live.inline_hooks = target.live.inline_hooks and hooks
        source = source_for(target)
        engine = Engine(source, RuleSet(rules_of({"__name__": __name__, **rules}, "pfh")), [ListSink()],
                        options=UNLIMITED)
        async with trio.open_nursery() as nursery:
            await start_armed(nursery, engine, traps)
            out = await trio.to_thread.run_sync(lambda: lab_guest.shell(command, timeout=SLOW))
            engine.stop()
        stats = dict(target.live.stats)
    assert not engine.summary.rule_errors, engine.summary
    return engine, out, stats


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "idt-fallback"])
async def test_user_fault_at_the_printed_address(lab_guest, start_armed, hooks):
    """The same fault, the same fields, from the hooks and from their fallback (inline hooks off)."""
    seen: list = []

    def keep(event, guest):
        seen.append((event, guest.current.pid if guest.current else None))

    engine, out, stats = await _watch(lab_guest, start_armed,
                                      {"pf": rule.on_exception("page_fault", user=True, comm="fault")(keep)},
                                      "scenario fault pf; dmesg | grep ' fault\\[' | tail -1", 3 if hooks else 1, hooks)
    assert stats.get("guarded_hooks", 0) == (3 if hooks else 0), stats
    assert not engine.summary.demotions, engine.summary
    printed = int(re.search(r"^0x([0-9a-f]+)$", out, re.M).group(1), 16)
    match = FAULT_SEGV.search(out)
    assert match and int(match.group(2), 16) == printed, out
    pid, rip, code = int(match.group(1)), int(match.group(3), 16), int(match.group(4), 16)
    at = [(f, p) for f, p in seen if f.cr2 == printed]
    assert len(at) == 1, (hex(printed), seen)
    assert [(f.rip, f.error_code, f.user, f.vector, p) for f, p in at] == [(rip, code, True, 14, pid)]


@pytest.mark.parametrize(("filters", "hooks"), [({"user": False}, 3), ({"address": (0x1000, 0x2000)}, 2),
                                               ({"pid": 1}, 3)], ids=["kernel-only", "elsewhere", "pid-1"])
async def test_a_filter_that_excludes_the_fault_makes_no_stop(lab_guest, start_armed, filters, hooks):
    """(A range of user addresses needs no hook on do_kern_addr_fault.)"""
    seen: list = []
    rules = {"pf": rule.on_exception("page_fault", **filters)(lambda event, guest: seen.append(event))}
    engine, out, stats = await _watch(lab_guest, start_armed, rules, "scenario fault pf; scenario fault pf", hooks)
    printed = [int(m, 16) for m in re.findall(r"^0x([0-9a-f]+)$", out, re.M)]
    assert len(printed) == 2, out
    assert not [f for f in seen if f.cr2 in printed], seen
    stops = engine.runs["sensor.page_fault_hooks"].calls
    if "pid" in filters or "address" in filters:  # nothing in the guest matches: not one stop
        assert stops == 0 and seen == [], (stops, seen)
    else:
        assert stops == len(seen) and not any(f.user for f in seen), (stops, seen)
    assert stats["guarded_hooks"] == hooks, stats


async def test_user_and_kernel_split_within_the_guest_count(lab_guest, start_armed):
    """``cat /proc/self/stat`` prints its own minflt + majflt: every fault handle_mm_fault completed
    for it (get_user_pages' ones too), counted once for a retried one. The watch's faults of that
    pid, user and kernel mode, are at most that (+2: its faults after the read, writing it out)."""
    seen: list = []

    def keep(event, guest):
        seen.append((event, guest.current.pid if guest.current else None))

    engine, out, stats = await _watch(lab_guest, start_armed, {"all": rule.on_exception("page_fault")(keep)},
                                      "cat /proc/self/stat")
    line = next(x for x in out.splitlines() if ") " in x)
    pid, fields = int(line.split()[0]), line.rsplit(") ", 1)[1].split()
    counted = int(fields[7]) + int(fields[9])  # minflt, majflt: stat fields 10 and 12
    mine = [f for f, p in seen if p == pid]
    user = [f for f in mine if f.user]
    kernel = [f for f in mine if not f.user]
    assert user and kernel, (len(user), len(kernel), counted)  # exec's copy to the new stack: kernel mode
    assert len(mine) <= counted + 2, (len(user), len(kernel), counted)
    print(f"cat: {len(user)} user + {len(kernel)} kernel faults seen, {counted} counted by the guest")
    assert all(f.rip < 1 << 47 for f in user) and all(f.rip >= 1 << 63 for f in kernel)
    assert all(f.error_code & 4 for f in user) and not any(f.error_code & 4 for f in kernel)


async def test_the_pid_guard_keeps_exactly_that_process(lab_guest, start_armed):
    """pid= of the serial console's shell: the guard (tgid of gs:[current_task]) lets through
    only that shell's faults, so every stop is one the rule keeps, and its children's are absent."""
    shell_pid = int(lab_guest.shell("echo $$", check=True).split()[-1])
    seen: list = []

    def keep(event, guest):
        seen.append((event, guest.current.pid if guest.current else None))

    engine, out, _ = await _watch(lab_guest, start_armed,
                                  {"mine": rule.on_exception("page_fault", pid=shell_pid)(keep)},
                                  "x=$(seq 1 30000); echo ${#x}; scenario fault pf")
    printed = int(re.search(r"^0x([0-9a-f]+)$", out, re.M).group(1), 16)
    assert seen and {p for _, p in seen} == {shell_pid}, (shell_pid, seen[:5])
    assert engine.runs["sensor.page_fault_hooks"].calls == len(seen)  # nothing stopped for another pid
    assert not [f for f, _ in seen if f.cr2 == printed]
