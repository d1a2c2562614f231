"""``@rule.on_exception`` on the live lab guest, against what the guest itself reports.

* User mode: a shell recursing with a 64 KiB stack limit overflows its stack; the kernel kills it
  and logs ``sh[PID]: segfault at ADDR ip IP sp SP error CODE`` (read back with ``dmesg``). The
  watch must have seen that very page fault: user mode, cr2 ADDR, rip IP, error code CODE.
* Kernel mode: ``dd bs=256k`` reads /dev/zero into a fresh 256 KiB anonymous mapping, which the
  kernel's ``clear_user`` touches first, one not-present page at a time. The guest's
  /proc/PID/maps names the mapping; the watch must see kernel-mode write faults of that pid (error
  code: write, supervisor, not present) whose cr2 covers its pages, and none in user mode there.
* A breakpoint: the guest's own kprobe at ``ksys_read+5`` (not optimised, so an int3; the kernel
  lists its address in debugfs and counts its hits in tracefs' kprobe_profile) gives one
  kernel-mode #BP, RIP just past the int3, for each hit the guest counted.
* A divide error: busybox ``expr`` divides INT64_MIN by -1 (it only checks for zero), the CPU
  raises #DE, and the kernel logs ``traps: expr[PID] trap divide error ip:IP ... error:0``. The
  watch must see vector 0 from user mode at IP, with no error code pushed.
* #UD, #GP and a user #PF from the lab's /bin/fault (``scenario fault ud|gp|pf``): ``ud2``, a load
  from a non-canonical address, a write to a page it just unmapped and printed the address of.
  The kernel logs each (``traps: fault[PID] trap invalid opcode ip:IP ...``, ``... general
  protection fault ip:IP ... error:0``, ``fault[PID]: segfault at ADDR ip IP ... error 6``).

Page faults come from the guarded hooks of engine/page_fault_hooks.py here (3 traps), the other
vectors from IDT breakpoints. A gdbstub breakpoint costs a TCG guest ~20 ms (engine/sources.py
``trap_overhead``), so the default budget unhooks the page-fault trap within a second of a fault
storm; these checks are about what a fault looks like, so the watch gets a budget that lets
every hit through.
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
DIVIDE = re.compile(r"expr\[(\d+)\] trap divide error ip:([0-9a-f]+) ")
SEGFAULT = re.compile(r"sh\[(\d+)\]: segfault at ([0-9a-f]+) ip ([0-9a-f]+) sp [0-9a-f]+ error ([0-9a-f]+)")
BUFFER = 256 << 10
UNLIMITED = WatchOptions(budget=Budget(max_hits=10**6, max_cost=1e6))


def _ruleset(seen: dict[str, list]) -> RuleSet:
    @rule.on_exception("page_fault", user=True)
    def user_faults(event, guest):
        seen["user"].append(event)

    @rule.on_exception(14, user=False)
    def kernel_faults(event, guest):
        cur = guest.current
        seen["kernel"].append((event, cur.pid if cur else None))

    @rule.on_exception("divide_error")
    def divide(event, guest):
        seen["divide"].append(event)

    return RuleSet(rules_of({"__name__": __name__, "user_faults": user_faults, "kernel_faults": kernel_faults,
                             "divide": divide}, "exc"))


def _anonymous_mapping(maps: str, size: int) -> tuple[int, int]:
    """The one anonymous mapping of ``size`` bytes in a /proc/PID/maps listing."""
    found = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1].startswith("rw"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end - start == size:
                found.append((start, end))
    assert len(found) == 1, maps
    return found[0]


async def test_page_faults_match_what_the_guest_reports(lab_guest, start_armed, tmp_path):
    """The faults a watch sees are the ones the guest reports, and a replay of it derives them again, byte for byte."""
    from vmwatch.replay import open_replay, recording_source
    from vmwatch.target import open_target

    def shell(command: str) -> str:
        return lab_guest.shell(command, timeout=SLOW)

    seen: dict[str, list] = {"user": [], "kernel": [], "divide": []}
    sink = ListSink()
    path = tmp_path / "faults.vmwr"
    async with open_target(lab_guest.target) as target:
        with recording_source(source_for(target), path) as recorded:
            engine = Engine(recorded, _ruleset(seen), [sink], options=UNLIMITED)
            async with trio.open_nursery() as nursery:
                await start_armed(nursery, engine, 4)  # 3 page-fault hooks + #DE
                crash = await trio.to_thread.run_sync(shell, "(ulimit -s 64; sh -c 'f() { f; }; f'); "
                                                             "dmesg | grep ': segfault at ' | tail -1")
                dd = await trio.to_thread.run_sync(shell, "dd if=/dev/zero of=/dev/null bs=256k count=1000000 "
                                                          "</dev/null >/dev/null 2>&1 & p=$!; sleep 3; echo $p; "
                                                          "cat /proc/$p/maps; kill $p")
                divide = await trio.to_thread.run_sync(shell, "expr -9223372036854775808 / -1; "
                                                              "dmesg | grep 'expr.* trap divide error' | tail -1")
                engine.stop()
    summary = engine.summary
    assert not summary.rule_errors, summary

    match = SEGFAULT.search(crash)
    assert match, crash
    cr2, rip, code = (int(match.group(i), 16) for i in (2, 3, 4))
    hits = [f for f in seen["user"] if f.cr2 == cr2]
    assert hits, (crash, len(seen["user"]), summary.demotions)
    assert all(f.rip == rip and f.error_code == code and f.user and f.name == "page_fault" for f in hits), hits

    pid_line, _, maps = dd.partition("\n")
    pid = int(pid_line)
    start, end = _anonymous_mapping(maps, BUFFER)
    inside = [(f, p) for f, p in seen["kernel"] if start <= f.cr2 < end]
    assert inside, (hex(start), len(seen["kernel"]), summary.demotions)
    assert {p for _, p in inside} == {pid}
    assert all(f.error_code & 0b111 == 0b010 and not f.user and f.rip >= 1 << 63 for f, _ in inside), inside
    pages = {f.cr2 >> 12 for f, _ in inside}
    assert len(pages) == len(inside) and pages <= set(range(start >> 12, end >> 12))  # each page faults once
    assert not [f for f in seen["user"] if start <= f.cr2 < end]
    match = DIVIDE.search(divide)
    assert match, divide
    assert [(f.vector, f.name, f.user, f.rip, f.error_code, f.cr2) for f in seen["divide"]] == [
        (0, "divide_error", True, int(match.group(2), 16), None, None)]

    stored = [r.as_dict() for r in sink.events if r.kind == "Fault"]
    assert len(stored) == len(seen["user"]) + len(seen["kernel"]) + 1  # every Fault reaches the timeline

    replayed = ListSink()
    with open_replay(path) as source:
        again = await Engine(source, _ruleset({"user": [], "kernel": [], "divide": []}), [replayed]).run()
        assert source.first_failure() is None
    assert not again.rule_errors, again
    assert [r.as_dict() for r in replayed.events if r.kind == "Fault"] == stored


KPROBE_ON = ("grep -q ' /sys/kernel/tracing ' /proc/mounts || mount -t tracefs nodev /sys/kernel/tracing; "
             "grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs nodev /sys/kernel/debug; "
             # no optimisation: an optimised kprobe is a jump, not an int3
             "echo 0 > /proc/sys/debug/kprobes-optimization; "
             "echo 'p:vmw ksys_read+5' > /sys/kernel/tracing/kprobe_events; "
             "echo 1 > /sys/kernel/tracing/events/kprobes/vmw/enable; grep ksys_read /sys/kernel/debug/kprobes/list")
KPROBE_OFF = ("echo 0 > /sys/kernel/tracing/events/kprobes/vmw/enable; "
              "grep vmw /sys/kernel/tracing/kprobe_profile; echo > /sys/kernel/tracing/kprobe_events")


async def test_kprobe_int3_is_a_kernel_breakpoint_exception(lab_guest, start_armed):
    """The guest's own kprobe (an int3 at ksys_read+5) gives one kernel-mode #BP per hit it counts, at the int3."""
    from vmwatch.target import open_target

    hits: list = []

    @rule.on_exception("breakpoint", user=False)
    def int3(event, guest):
        hits.append(event)

    ruleset = RuleSet(rules_of({"__name__": __name__, "int3": int3}, "exc"))
    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), ruleset, [ListSink()], options=UNLIMITED)
        async with trio.open_nursery() as nursery:
            await start_armed(nursery, engine, 1)
            listed = await trio.to_thread.run_sync(lambda: lab_guest.shell(KPROBE_ON, timeout=SLOW))
            await trio.to_thread.run_sync(lambda: lab_guest.shell("cat /etc/passwd > /dev/null; seq 3", timeout=SLOW))
            profile = await trio.to_thread.run_sync(lambda: lab_guest.shell(KPROBE_OFF, timeout=SLOW))
            engine.stop()
    assert not engine.summary.rule_errors, engine.summary
    address = int(listed.split()[0], 16)  # "ffffffff8a167555  k  ksys_read+0x5": k = an int3 kprobe
    assert listed.split()[1] == "k", listed
    counted = int(profile.split()[1])
    at_probe = [f for f in hits if f.rip == address + 1]  # a trap: RIP is past the int3
    assert counted >= 3 and len(at_probe) == counted, (counted, len(at_probe), [hex(f.rip) for f in hits[:6]])
    assert all(f.vector == 3 and f.error_code is None and f.cr2 is None and not f.user for f in hits)


TRAPS = re.compile(r"fault\[(\d+)\] (trap invalid opcode|general protection fault) ip:([0-9a-f]+) "
                   r"sp:[0-9a-f]+ error:([0-9a-f]+)")
FAULT_SEGV = re.compile(r"fault\[(\d+)\]: segfault at ([0-9a-f]+) ip ([0-9a-f]+) sp [0-9a-f]+ error ([0-9a-f]+)")


async def test_ud2_gp_and_a_fault_at_the_printed_address(lab_guest, start_armed):
    """``scenario fault ud|gp|pf`` (the lab's /bin/fault): the #UD, #GP and user #PF the watch sees
    are the ones the kernel logs, and the #PF's cr2 is the address the program printed."""
    from vmwatch.target import open_target

    seen: dict[str, list] = {"ud": [], "gp": [], "pf": []}

    def keep(kind):
        def record(event, guest):
            cur = guest.current
            seen[kind].append((event, cur.pid if cur else None))
        return record

    rules = {"__name__": __name__,
             "ud": rule.on_exception("invalid_opcode")(keep("ud")),
             "gp": rule.on_exception(13)(keep("gp")),
             "pf": rule.on_exception("page_fault", user=True, comm="fault")(keep("pf"))}
    async with open_target(lab_guest.target) as target:
        engine = Engine(source_for(target), RuleSet(rules_of(rules, "exc")), [ListSink()], options=UNLIMITED)
        async with trio.open_nursery() as nursery:
            await start_armed(nursery, engine, 5)  # #UD, #GP, 3 page-fault hooks
            out = {kind: await trio.to_thread.run_sync(lambda k=kind: lab_guest.shell(f"scenario fault {k}",
                                                                                       timeout=SLOW))
                   for kind in ("ud", "gp", "pf")}
            logged = await trio.to_thread.run_sync(lambda: lab_guest.shell("dmesg | grep ' fault\\[' | tail -3",
                                                                           timeout=SLOW))
            engine.stop()
    assert not engine.summary.rule_errors and not engine.summary.demotions, engine.summary
    assert "scenario fault ud status 132" in out["ud"] and "status 139" in out["gp"], out  # SIGILL, SIGSEGV
    traps = {m.group(2): m for m in TRAPS.finditer(logged)}
    assert set(traps) == {"trap invalid opcode", "general protection fault"}, logged
    for kind, vector, line in (("ud", 6, "trap invalid opcode"), ("gp", 13, "general protection fault")):
        pid, rip, code = int(traps[line].group(1)), int(traps[line].group(3), 16), int(traps[line].group(4), 16)
        user = [(f, p) for f, p in seen[kind] if f.user]
        assert [(f.vector, f.rip, p) for f, p in user] == [(vector, rip, pid)], (kind, logged, seen[kind])
        assert user[0][0].error_code == (code if vector == 13 else None) and user[0][0].cr2 is None

    printed = int(re.search(r"^0x([0-9a-f]+)$", out["pf"], re.M).group(1), 16)
    match = FAULT_SEGV.search(logged)
    assert match and int(match.group(2), 16) == printed, (out["pf"], logged)
    pid, rip, code = int(match.group(1)), int(match.group(3), 16), int(match.group(4), 16)
    at = [(f, p) for f, p in seen["pf"] if f.cr2 == printed]
    assert at and all((f.rip, f.error_code, f.user, p) == (rip, code, True, pid) for f, p in at), (hex(printed), at)
