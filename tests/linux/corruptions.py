"""Corruptions of a Linux kernel's lists and tables, at the addresses BTF and kallsyms give.

Each corruption is a function ``linux -> [(vaddr, bytes)]``: the patches, in kernel virtual
addresses, so one list serves a copy of a dump (``overlay_patches``: written at the physical
addresses) and a paused live guest (``vmwatch write VADDR HEX --write``, one call per patch).
"""

from __future__ import annotations

import struct

UNMAPPED = 0xFFFF_DEAD_0000_0000
"""A canonical kernel address no lab guest maps."""
PAGE = 4096
UNUSED_SYSCALL = 184


def _pointer(value: int) -> bytes:
    return struct.pack("<Q", value)


def _task_link(linux, index: int) -> int:
    return linux.tasks()[index].address + linux.types.offset("task_struct", "tasks")


def _module_link(linux, index: int) -> int:
    return linux.modules()[index].address + linux.types.offset("module", "list")


def _free_ram(linux, size: int) -> int:
    """A guest-physical range of ``size`` zero bytes above 128 MiB (free memory of the lab guest)."""
    for paddr in range(128 << 20, 250 << 20, 1 << 16):
        if not any(linux.memory.read_phys(paddr, size, pad=True)):
            return paddr
    raise AssertionError("no free RAM to build a chain in")


def _chain(linux, link: int, count: int) -> list[tuple[int, bytes]]:
    """``link`` points at ``count`` list nodes in free RAM (direct map), each ``next`` the following
    one: a list with no cycle and no end in reach, longer than any walk's limit."""
    start = linux.kernel.page_offset + _free_ram(linux, count * 8 + 8)
    nodes = b"".join(_pointer(start + 8 * (i + 1)) for i in range(count))
    return [(start, nodes), (link, _pointer(start))]


def cyclic_tasks(linux):
    return [(_task_link(linux, 10), _pointer(_task_link(linux, 3)))]


def unmapped_tasks(linux):
    return [(_task_link(linux, 5), _pointer(UNMAPPED))]


def endless_tasks(linux):
    return _chain(linux, _task_link(linux, 5), 70_000)  # > MAX_LIST (65,536)


def cyclic_modules(linux):
    return [(_module_link(linux, 0), _pointer(_module_link(linux, 0)))]


def unmapped_modules(linux):
    return [(_module_link(linux, 1), _pointer(UNMAPPED))]


def endless_modules(linux):
    return _chain(linux, _module_link(linux, 1), 9_000)  # > the modules walk's 8,192


def _runqueue_root(linux) -> int:
    t = linux.types
    return linux.per_cpu("runqueues", 0) + t.offset("rq", "cfs") + t.offset("cfs_rq", "tasks_timeline")


def cyclic_runqueue(linux):
    """CPU 0's CFS tree holding the current task's node, whose left child is itself."""
    t = linux.types
    curr = linux.memory.pointer(linux.per_cpu("runqueues", 0) + t.offset("rq", "curr"))
    node = curr + t.offset("task_struct", "se") + t.offset("sched_entity", "run_node")
    return [(_runqueue_root(linux), _pointer(node)), (node + t.offset("rb_node", "rb_left"), _pointer(node))]


def unmapped_runqueue(linux):
    return [(_runqueue_root(linux), _pointer(UNMAPPED))]


def names_without_nul(linux):
    """Task 2's comm and module 0's name filled to the end of their arrays, no NUL."""
    t = linux.types
    comm = linux.tasks()[2].address + t.offset("task_struct", "comm")
    name = linux.modules()[0].address + t.offset("module", "name")
    return [(comm, b"A" * t.size_of(t.member("task_struct", "comm").type_id)),
            (name, b"B" * t.size_of(t.member("module", "name").type_id))]


def syscall_unmapped(linux):
    """sys_call_table[184] (tuxcall: sys_ni_syscall, which no program calls, so a running guest
    lives on) pointing into unmapped memory."""
    assert linux.syscalls()[UNUSED_SYSCALL].symbol.endswith("sys_ni_syscall")
    return [(linux.symbols["sys_call_table"] + 8 * UNUSED_SYSCALL, _pointer(UNMAPPED))]


def absurd_cpus(linux):
    """nr_cpu_ids 2^31-1 and __per_cpu_offset[1..] into unmapped memory (the guest has one vCPU)."""
    return [(linux.symbols["nr_cpu_ids"], struct.pack("<I", 0x7FFF_FFFF)),
            (linux.symbols["__per_cpu_offset"] + 8, _pointer(UNMAPPED) * 7)]


# corruption -> (the broken list's warning, entries listed, how many of them the clean dump lists
# first): None where no list breaks
EXPECTED = {
    "cyclic_tasks": ("init_task.tasks list broken after 11 entries: cycle at", 11, 11),
    "unmapped_tasks": ("init_task.tasks list broken after 6 entries: unreadable pointer at 0xffffdead00000000", 6, 6),
    "endless_tasks": ("init_task.tasks list broken after 65536 entries: more than 65536 entries", 65536, 6),
    "cyclic_modules": ("modules list broken after 1 entries: cycle at", 1, 1),
    "unmapped_modules": ("modules list broken after 2 entries: unreadable pointer at 0xffffdead00000000", 2, 2),
    "endless_modules": ("modules list broken after 8192 entries: more than 8192 entries", 8192, 2),
    "cyclic_runqueue": ("runqueues[0].cfs list broken after 1 entries: node", None, None),
    "unmapped_runqueue": ("runqueues[0].cfs list broken after 0 entries: unreadable node 0xffffdead00000000",
                          None, None),
    "names_without_nul": (None, None, None),
    "syscall_unmapped": (None, None, None),
    "absurd_cpus": (None, None, None),
}


RUN_SAFE = ("cyclic_tasks", "unmapped_tasks", "cyclic_modules", "unmapped_modules", "names_without_nul",
            "syscall_unmapped")
"""What a running guest's own kernel lives with for the seconds of a watch. Not the chains: they sit in
free RAM the kernel may take meanwhile (putting its zeros back would corrupt it); not nr_cpu_ids:
the kernel's own for_each_cpu loops trust it; not the run queue: its scheduler walks it."""


def check_listing(command: str, name: str, rows: list[dict], stderr: str, clean: dict) -> None:
    """ps/modules/syscalls list what precedes the break, warn about the list they walk (at most ten
    problem lines and a count), and are untouched by corruptions of what they do not read."""
    broken, kept, real = EXPECTED[name]
    warnings = [line for line in stderr.splitlines() if line.startswith("vmwatch: warning:")]
    walks = {"ps": "init_task.tasks", "modules": "modules"}.get(command)
    if broken is not None and broken.startswith(f"{walks} "):
        assert broken in warnings[0] and len(warnings) <= 11, stderr
        assert len(rows) == kept
        listed = [r["pid" if command == "ps" else "base"] for r in rows]
        assert listed[:real] == clean["pids" if command == "ps" else "bases"][:real]
    else:
        assert not warnings, stderr
        if command == "ps":
            assert [r["pid"] for r in rows] == clean["pids"]
        elif command == "modules":
            assert [r["base"] for r in rows] == clean["bases"]
    if command == "syscalls":
        expected = list(clean["syscalls"])
        if name == "syscall_unmapped":
            expected[UNUSED_SYSCALL] = (UNMAPPED, None)
            assert [r["index"] for r in rows if not r["in_text"]] == [UNUSED_SYSCALL]
        assert [(r["address"], r["symbol"]) for r in rows] == expected


def check_watch(name: str, printed: list[dict], stderr: str) -> list[dict]:
    """watch with the shipped packs: no rule raised, a broken list is named in a warning with the
    entries read before it, the hooked entry is reported. Returns the alerts."""
    broken = EXPECTED[name][0]
    alerts = [e for e in printed if "rule" in e]
    assert not [a for a in alerts if a["rule"] == "engine"], alerts  # no rule raised or was isolated
    logged = [line for line in stderr.splitlines() if "list_broken" in line]
    if broken is None:
        assert not logged, stderr
    else:
        walked, _, entries = broken.partition(" list broken after ")
        assert any(f"list={walked}" in line and f"entries={entries.split()[0]}" in line for line in logged), stderr
    if name == "syscall_unmapped":
        hooked = [a["message"] for a in alerts if a["rule"] == "security.syscall_table"]
        assert hooked == [f"sys_call_table[{UNUSED_SYSCALL}] points outside kernel text: {UNMAPPED:#x}"]
    return alerts


def clean_facts(linux) -> dict:
    """What an uncorrupted kernel lists: pids, module names and bases, the system call table."""
    modules = linux.modules()
    return {"pids": [t.pid for t in linux.tasks()], "modules": [m.name for m in modules],
            "bases": [m.base for m in modules], "syscalls": [(s.address, s.symbol) for s in linux.syscalls()]}


def unmapped_syscall_page(linux):
    """The page-table entry that maps sys_call_table made not present (a 2 MiB page of the lab
    kernel's rodata: its BTF and banner go with it). Patched through the direct map."""
    table = linux.kernel.kernel_cr3 & ~0xFFF
    vaddr = linux.symbols["sys_call_table"]
    for shift in (39, 30, 21, 12):
        at = table + ((vaddr >> shift) & 0x1FF) * 8
        entry = struct.unpack("<Q", linux.memory.read_phys(at, 8))[0]
        if shift == 12 or entry & 0x80:  # a 4 KiB entry, or PS: a large page
            return [(linux.kernel.page_offset + at, struct.pack("<Q", entry & ~1))]
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError("unreachable")


def overlay_patches(linux, patches):
    """The patches at guest-physical addresses, split at page boundaries."""
    out = []
    for vaddr, data in patches:
        offset = 0
        while offset < len(data):
            size = min(len(data) - offset, PAGE - (vaddr + offset) % PAGE)
            out.append((linux.memory.translate(vaddr + offset), data[offset:offset + size]))
            offset += size
    return out
