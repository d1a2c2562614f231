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


def names_without_nul(linux):
    """Task 2's comm and module 0's name filled to the end of their arrays, no NUL."""
    t = linux.types
    comm = linux.tasks()[2].address + t.offset("task_struct", "comm")
    name = linux.modules()[0].address + t.offset("module", "name")
    return [(comm, b"A" * t.size_of(t.member("task_struct", "comm").type_id)),
            (name, b"B" * t.size_of(t.member("module", "name").type_id))]


def syscall_unmapped(linux):
    """sys_call_table[1] (write) pointing into unmapped memory."""
    return [(linux.symbols["sys_call_table"] + 8, _pointer(UNMAPPED))]


def absurd_cpus(linux):
    """nr_cpu_ids 2^31-1 and __per_cpu_offset[1..] into unmapped memory (the guest has one vCPU)."""
    return [(linux.symbols["nr_cpu_ids"], struct.pack("<I", 0x7FFF_FFFF)),
            (linux.symbols["__per_cpu_offset"] + 8, _pointer(UNMAPPED) * 7)]


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
