"""A paused live guest whose task list ``vmwatch write --write`` makes cyclic, at the offsets BTF
gives: ``ps`` ends in bounded time with one warning naming the list; the bytes put back, the
guest resumes and ps equals /proc again."""

from __future__ import annotations

import json
import struct
import time

import pytest
import trio

from vmwatch.os.linux.kernel import Linux
from vmwatch.target import open_target
from vmwatch.testing.cli import run_cli

from .guesttruth import NAMES, parse_names

pytestmark = pytest.mark.guest


def _layout(qmp: str) -> tuple[list[int], int, int]:
    """pids in list order, and the address of task 10's ``tasks.next`` and of task 3's ``tasks``."""
    async def read():
        async with open_target(qmp) as target:
            linux = Linux.from_memory(target.memory, await target.cpu_state())
            tasks = linux.tasks()
            off = linux.types.offset("task_struct", "tasks")
            return [t.pid for t in tasks], tasks[10].address + off, tasks[3].address + off
    return trio.run(read)


def test_cyclic_task_list_in_a_paused_live_guest(lab_guest_factory):
    guest = lab_guest_factory()
    qmp = f"qemu:{guest.qmp_path}"
    try:
        guest.qmp().execute("stop")
        pids, link, target = _layout(qmp)
        cycle = struct.pack("<Q", target).hex()

        refused = run_cli("write", qmp, hex(link), cycle)  # read-only stays the default
        assert refused.status == 2 and refused.stderr.count("\n") == 1 and "--write" in refused.stderr
        assert _layout(qmp)[0] == pids

        wrote = run_cli("write", qmp, hex(link), cycle, "--write", "--json")
        assert wrote.status == 0, wrote.stderr
        old = json.loads(wrote.stdout)["old"]
        assert old != cycle and len(old) == 16

        start = time.monotonic()
        ps = run_cli("ps", qmp, "--json")
        assert time.monotonic() - start < 60
        assert ps.status == 0, ps.stderr
        assert [p["pid"] for p in json.loads(ps.stdout)] == pids[:11]
        warnings = [line for line in ps.stderr.splitlines() if line.startswith("vmwatch: warning:")]
        assert len(warnings) == 1, ps.stderr
        assert "init_task.tasks list broken after" in warnings[0] and "cycle" in warnings[0]
        assert guest.status() == "paused"  # ps resumes only a guest it paused itself

        restored = run_cli("write", qmp, hex(link), old, "--write", "--json")
        assert restored.status == 0 and json.loads(restored.stdout)["old"] == cycle
    finally:
        guest.qmp().execute("cont")
    before = parse_names(guest.shell(NAMES, timeout=60))
    ps = run_cli("ps", qmp, "--json")
    after = parse_names(guest.shell(NAMES, timeout=60))
    assert ps.status == 0 and "warning" not in ps.stderr, ps.stderr
    ours = {p["pid"] for p in json.loads(ps.stdout) if p["pid"]}
    assert set(before) & set(after) <= ours <= set(before) | set(after)
    guest.stop()
