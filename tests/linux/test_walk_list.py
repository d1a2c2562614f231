"""walk_list on lists laid out in a buffer: whole lists, exact limits, cycles, bad pointers, one warning each."""

from __future__ import annotations

import struct

import pytest
from structlog.testing import capture_logs

from vmwatch.cpu import PagingMode
from vmwatch.memory.guest import GuestMemory
from vmwatch.memory.physical import BufferMemory
from vmwatch.os.linux.objects import walk_list, warn_broken

HEAD, LINK = 0x100, 0x10
"""The list head's address; each node's ``list_head`` sits 0x10 into its struct."""


def _memory(nexts: dict[int, int]) -> GuestMemory:
    """Identity-mapped memory where ``next`` at each address is as given."""
    buf = bytearray(1 << 20)
    for at, to in nexts.items():
        struct.pack_into("<Q", buf, at, to)
    return GuestMemory(BufferMemory(buf), mode=PagingMode.NONE)


def _chain(count: int, *, end: int = HEAD) -> dict[int, int]:
    """HEAD -> node 1 -> ... -> node ``count`` -> ``end``; node i's link at 0x1000 * i."""
    links = [HEAD] + [0x1000 * i for i in range(1, count + 1)]
    return {a: b for a, b in zip(links, links[1:] + [end])}


class TestWalkList:
    @pytest.mark.parametrize("count", [0, 1, 5])
    def test_whole_list_is_every_struct(self, count):
        """A list closed through its head gives each struct (link minus offset) in order, no problem."""
        skipped: list[str] = []
        got = walk_list(_memory(_chain(count)), HEAD, LINK, name="t", skipped=skipped)
        assert got == [0x1000 * i - LINK for i in range(1, count + 1)] and skipped == []

    def test_limit_is_exact(self):
        """``limit`` nodes pass; one more is reported with exactly ``limit`` entries kept."""
        assert len(walk_list(_memory(_chain(4)), HEAD, LINK, name="t", limit=4)) == 4
        skipped: list[str] = []
        with capture_logs() as logs:
            got = walk_list(_memory(_chain(5)), HEAD, LINK, name="t", limit=4, skipped=skipped)
        assert len(got) == 4 and skipped == ["t list broken after 4 entries: more than 4 entries"]
        assert [(e["list"], e["entries"]) for e in logs] == [("t", 4)]

    def test_cycle_and_unreadable_pointer(self):
        """A node pointing back to an earlier one, or a next into no memory, ends the walk and says where."""
        cyclic = _chain(3, end=0x2000)
        skipped: list[str] = []
        assert len(walk_list(_memory(cyclic), HEAD, LINK, name="t", skipped=skipped)) == 3
        assert skipped == ["t list broken after 3 entries: cycle at 0x2000 not through the head 0x100"]
        skipped.clear()
        got = walk_list(_memory(_chain(3, end=0xFFFF_DEAD_0000_0000)), HEAD, LINK, name="t", skipped=skipped)
        assert len(got) == 3 and skipped == ["t list broken after 3 entries: unreadable pointer at 0xffffdead00000000"]

    def test_a_problem_is_logged_once_per_kernel(self):
        """With ``logged`` (Linux.logged_breaks) the same break walked again is not logged again; another is."""
        logged: set = set()
        memory = _memory(_chain(2, end=0x1000))
        with capture_logs() as logs:
            for _ in range(3):
                walk_list(memory, HEAD, LINK, name="t", logged=logged)
            warn_broken(logged, "u", HEAD, 0, "another list")
            walk_list(memory, HEAD, LINK, name="t", log_broken=False)
        assert [e["list"] for e in logs] == ["t", "u"]
