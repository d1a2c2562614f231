"""The kernel's resource tree (``iomem_resource``): what /proc/iomem lists, read from memory.

Each ``struct resource`` (include/linux/ioport.h) has ``start``, ``end`` (inclusive), ``name``
and ``parent``/``sibling``/``child`` pointers; offsets come from BTF. The walk is depth first,
bounded and cycle-checked: guest memory is hostile input.
"""

from __future__ import annotations

import attrs

from vmwatch.errors import GuestDataError

MAX_RESOURCES = 10_000
MAX_DEPTH = 32


@attrs.frozen
class Resource:
    """One node of the tree: ``[start, end]`` (inclusive, as the kernel keeps it) and its name."""

    name: str
    start: int
    end: int
    depth: int


def iomem(linux) -> list[Resource]:
    """Every resource under ``iomem_resource``, in /proc/iomem order.

    Raises:
        GuestDataError: the tree loops or holds more than :data:`MAX_RESOURCES` nodes.
        VmwatchError: a node cannot be read.
    """
    types, memory = linux.types, linux.memory
    off = {f: types.offset("resource", f) for f in ("start", "end", "name", "sibling", "child")}
    out: list[Resource] = []
    seen: set[int] = set()
    stack = [(memory.u64(linux.symbols["iomem_resource"] + off["child"]), 0)]
    while stack:
        node, depth = stack.pop()
        if not node:
            continue
        if node in seen or len(seen) >= MAX_RESOURCES or depth > MAX_DEPTH:
            raise GuestDataError(f"the iomem resource tree loops or is too large at {node:#x}")
        seen.add(node)
        name_ptr = memory.u64(node + off["name"])
        name = memory.cstring(name_ptr, 64) if name_ptr else ""
        out.append(Resource(name, memory.u64(node + off["start"]), memory.u64(node + off["end"]), depth))
        stack.append((memory.u64(node + off["sibling"]), depth))  # after the children
        stack.append((memory.u64(node + off["child"]), depth + 1))
    return out
