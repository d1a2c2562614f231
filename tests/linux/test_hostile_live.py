"""A paused live guest whose kernel lists ``vmwatch write --write`` corrupts at the offsets BTF
gives (tasks cyclic, modules cyclic, modules into unmapped memory): ``ps``/``modules`` end in
bounded time with one warning naming the list; the bytes put back, the guest resumes and both
equal /proc again."""

from __future__ import annotations

import json
import struct
import time

import pytest
import trio

from vmwatch.os.linux.kernel import Linux
from vmwatch.target import open_target
from vmwatch.testing.cli import run_cli

from .guesttruth import assert_lists_match_proc

pytestmark = pytest.mark.guest


def _layout(qmp: str) -> dict:
    """What the corruptions need, from the guest's BTF: pids and module names in list order, and
    the addresses of list links (task 10's and module 1's ``next``) and what they are made to point to."""
    async def read():
        async with open_target(qmp) as target:
            linux = Linux.from_memory(target.memory, await target.cpu_state())
            tasks, modules = linux.tasks(), linux.modules()
            t_off, m_off = linux.types.offset("task_struct", "tasks"), linux.types.offset("module", "list")
            return {"pids": [t.pid for t in tasks], "modules": [m.name for m in modules],
                    "task10": tasks[10].address + t_off, "task3": tasks[3].address + t_off,
                    "module0": modules[0].address + m_off, "module1": modules[1].address + m_off}
    return trio.run(read)


def _pointer(value: int) -> str:
    return struct.pack("<Q", value).hex()


# (link to overwrite, value, command, what it still lists, the warning)
CORRUPTIONS = {
    "cyclic tasks": (lambda g: g["task10"], lambda g: g["task3"], "ps", lambda g: g["pids"][:11],
                     "init_task.tasks list broken after 11 entries: cycle at"),
    "cyclic modules": (lambda g: g["module0"], lambda g: g["module0"], "modules", lambda g: g["modules"][:1],
                       "modules list broken after 1 entries: cycle at"),
    "modules into unmapped memory": (lambda g: g["module1"], lambda g: 0xFFFF_DEAD_0000_0000, "modules",
                                     lambda g: g["modules"][:2],
                                     "modules list broken after 2 entries: unreadable pointer at 0xffffdead00000000"),
}


def _listed(command: str, stdout: str) -> list:
    return [row["pid" if command == "ps" else "name"] for row in json.loads(stdout)]


def test_corrupted_lists_in_a_paused_live_guest(lab_guest_factory):
    """Each corruption written with ``vmwatch write --write``, the command run, the bytes put back."""
    guest = lab_guest_factory()
    qmp = f"qemu:{guest.qmp_path}"
    guest.shell("scenario module", timeout=60)
    try:
        guest.qmp().execute("stop")
        layout = _layout(qmp)
        assert len(layout["modules"]) >= 2
        refused = run_cli("write", qmp, hex(layout["task10"]), _pointer(layout["task3"]))  # read-only by default
        assert refused.status == 2 and refused.stderr.count("\n") == 1 and "--write" in refused.stderr
        assert _layout(qmp) == layout
        for what, (link, value, command, listed, warning) in CORRUPTIONS.items():
            new = _pointer(value(layout))
            wrote = run_cli("write", qmp, hex(link(layout)), new, "--write", "--json")
            assert wrote.status == 0, (what, wrote.stderr)
            old = json.loads(wrote.stdout)["old"]
            assert old != new, what
            start = time.monotonic()
            result = run_cli(command, qmp, "--json")
            took = time.monotonic() - start
            assert took < 60 and result.status == 0, (what, took, result.stderr)
            assert _listed(command, result.stdout) == listed(layout), what
            warnings = [line for line in result.stderr.splitlines() if line.startswith("vmwatch: warning:")]
            assert len(warnings) == 1 and warning in warnings[0], (what, result.stderr)
            assert "Traceback" not in result.stderr
            assert guest.status() == "paused"  # a command resumes only a guest it paused itself
            restored = run_cli("write", qmp, hex(link(layout)), old, "--write", "--json")
            assert restored.status == 0 and json.loads(restored.stdout)["old"] == new, what
        assert _layout(qmp) == layout
    finally:
        guest.qmp().execute("cont")
    assert_lists_match_proc(guest, qmp)
    guest.stop()
