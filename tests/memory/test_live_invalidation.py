"""Cache invalidation on a live guest: the RAM file changes while the guest runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.guest


async def test_resume_invalidates_the_caches(lab_guest):
    """Reads of a paused live guest are cached; after the guest ran, on_resume() makes the new
    contents visible, and the backend calls it by itself once it is registered."""
    from vmwatch.live.qemu import attach_qemu
    from vmwatch.os.linux import Linux

    async with attach_qemu(str(lab_guest.qmp_path)) as vm:
        await vm.pause()
        try:
            linux = Linux.from_memory(vm.memory, registers=await vm.all_registers())
            mem = linux.memory
            assert mem.phys.volatile
            jiffies = linux.symbols["jiffies"]
            first = mem.u64(jiffies)

            await vm.resume()
            lab_guest.shell("sleep 0.2")  # the guest runs: jiffies moves on
            await vm.pause()
            assert mem.u64(jiffies) == first  # nobody told the cache: still the cached page
            mem.on_resume()
            second = mem.u64(jiffies)
            assert second > first

            vm.on_resume.append(mem.on_resume)
            await vm.resume()
            lab_guest.shell("sleep 0.2")
            await vm.pause()
            assert mem.u64(jiffies) > second
            assert mem.stats()["tlb"]["size"] == 1  # flushed by the backend's resume, then one read
        finally:
            await vm.resume()
