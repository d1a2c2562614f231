"""The iomem resource tree read from memory: order and depth as /proc/iomem, and hostile trees."""

from __future__ import annotations

import struct

import attrs
import pytest

from vmwatch.errors import GuestDataError
from vmwatch.os.linux.resources import Resource, iomem

OFFSETS = {"start": 0, "end": 8, "name": 16, "sibling": 24, "child": 32}
ROOT, NAMES = 0x1000, 0x8000


@attrs.define
class _Memory:
    data: bytearray = attrs.Factory(lambda: bytearray(0x10000))

    def u64(self, vaddr: int) -> int:
        return struct.unpack_from("<Q", self.data, vaddr)[0]

    def cstring(self, vaddr: int, max_len: int = 256) -> str:
        raw = bytes(self.data[vaddr : vaddr + max_len])
        return raw.split(b"\0", 1)[0].decode("latin-1")


class _Types:
    def offset(self, struct_name: str, path: str) -> int:
        assert struct_name == "resource"
        return OFFSETS[path]


@attrs.define
class _Linux:
    memory: _Memory = attrs.Factory(_Memory)
    types: _Types = attrs.Factory(_Types)
    symbols: dict = attrs.Factory(lambda: {"iomem_resource": ROOT})

    def node(self, at: int, name: str, start: int, end: int, sibling: int = 0, child: int = 0) -> None:
        name_at = NAMES + at // 4
        self.memory.data[name_at : name_at + len(name) + 1] = name.encode() + b"\0"
        struct.pack_into("<5Q", self.memory.data, at, start, end, name_at, sibling, child)


def test_depth_first_like_proc_iomem():
    """Children come right after their parent, siblings after the children, depth counted."""
    linux = _Linux()
    linux.node(ROOT, "PCI mem", 0, 2**64 - 1, child=0x1100)
    linux.node(0x1100, "System RAM", 0x1000, 0x9FFFF, sibling=0x1200, child=0x1300)
    linux.node(0x1300, "Kernel code", 0x2000, 0x2FFF)
    linux.node(0x1200, "Local APIC", 0xFEE00000, 0xFEE00FFF)
    assert iomem(linux) == [Resource("System RAM", 0x1000, 0x9FFFF, 0), Resource("Kernel code", 0x2000, 0x2FFF, 1),
                            Resource("Local APIC", 0xFEE00000, 0xFEE00FFF, 0)]


@pytest.mark.parametrize("sibling, child", [(0x1100, 0), (0, 0x1100)])
def test_cyclic_tree_is_guest_data_error(sibling, child):
    """A node that points back at itself (as sibling or child) ends the walk with GuestDataError, not a hang."""
    linux = _Linux()
    linux.node(ROOT, "root", 0, 0, child=0x1100)
    linux.node(0x1100, "loop", 0, 0, sibling=sibling, child=child)
    with pytest.raises(GuestDataError, match="loops"):
        iomem(linux)
