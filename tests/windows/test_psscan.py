"""The pool-tag process scan (psscan) on guests built around the real ntoskrnl: truth is what the builder wrote."""

from __future__ import annotations

import pytest

from vmwatch.memory import BufferMemory
from vmwatch.os.windows import psscan
from vmwatch.os.windows.kernel import Windows
from vmwatch.testing.windowsguest import POOL_PA, WindowsGuest


@pytest.fixture(params=[7601, 19041])
def guest(request, ntoskrnl) -> WindowsGuest:
    g = WindowsGuest(ntoskrnl, build=request.param)
    g.build_objects(clean=True)
    return g


def _scan(guest: WindowsGuest):
    return Windows.from_memory(BufferMemory(guest.buffer), (guest.registers,)).scan_processes()


class TestScan:
    def test_finds_every_process(self, guest):
        """Each EPROCESS the builder put in a pool block, at its physical and virtual address."""
        hits = _scan(guest)
        assert hits.skipped == []
        assert [(h.paddr, h.process.address, h.process.pid, h.process.name.encode()) for h in hits] == [
            (guest.paddr(p.address), p.address, p.pid, p.name) for p in guest.processes]

    def test_unlinked_process_still_found(self, guest):
        """A process taken off ActiveProcessLinks: its self-pointing links still give its address."""
        hidden = guest.unlink(348)
        assert [(h.process.pid, h.process.address) for h in _scan(guest) if h.process.pid == 348] == \
            [(348, hidden.address)]

    def test_exited_process_not_counted(self, guest):
        """ExitTime set (an exited process whose block is not reused yet): not alive."""
        gone = guest.processes[2]
        guest.put_u64(gone.address + guest.profile.eprocess["ExitTime"], 133_000_000_000_000_000)
        assert gone.pid not in [h.process.pid for h in _scan(guest)]


class TestHostile:
    def test_tag_flood_is_bounded(self, ntoskrnl, monkeypatch):
        """Memory full of process pool tags: the scan stops at MAX_HITS and says so."""
        g = WindowsGuest(ntoskrnl)
        g.build_objects(clean=True)
        flood = POOL_PA + 0x200000
        for off in range(0, 0x10000, 16):
            g.buffer[flood + off + 4:flood + off + 8] = b"Proc"
        monkeypatch.setattr(psscan, "MAX_HITS", 1000)
        hits = _scan(g)
        assert hits.skipped == ["pool scan stopped after 1000 process pool tags"]

    def test_body_past_the_end_of_memory(self, ntoskrnl):
        """A tag in the last bytes of RAM: no body fits, nothing found there, no error."""
        g = WindowsGuest(ntoskrnl)
        g.build_objects(clean=True)
        g.buffer[len(g.buffer) - 12:len(g.buffer) - 8] = b"Proc"
        assert len(_scan(g)) == len(g.processes)


class TestCrossView:
    def test_thread_pointing_nowhere_is_flagged(self, ntoskrnl):
        """Processor 0's current thread aimed at unmapped memory: one flagged entry, no exception."""
        g = WindowsGuest(ntoskrnl)
        g.build_objects(clean=True)
        g.put_u64(g.kpcr + 0x180 + 0x8, 0xFFFFFA80DEAD0000)
        hidden = Windows.from_memory(BufferMemory(g.buffer), (g.registers,)).hidden_processes(pool=True)
        assert [(h.process, h.view) for h in hidden] == [(None, "the processors")]
        assert "0xfffffa80dead0070" in hidden[0].error

    def test_process_pointer_unreadable_is_flagged(self, ntoskrnl):
        """The running thread's ApcState.Process aimed at unmapped memory: flagged with its address."""
        g = WindowsGuest(ntoskrnl)
        g.build_objects(clean=True)
        thread = g.run_on_cpu(4)
        g.put_u64(thread + 0x70, 0xFFFFFA80BEEF0000)
        hidden = Windows.from_memory(BufferMemory(g.buffer), (g.registers,)).hidden_processes(pool=False)
        assert [(h.process, h.view, h.address) for h in hidden] == [(None, "processor 0", 0xFFFFFA80BEEF0000)]
