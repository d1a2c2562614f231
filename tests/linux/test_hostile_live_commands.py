"""A live guest corrupted with ``vmwatch write --write`` at the addresses BTF gives, each corruption
of tests/linux/corruptions.py in turn: ps, modules and syscalls on the paused guest, then (for the
corruptions its own kernel lives with) a short ``watch`` with the shipped packs while it runs; each
ends in bounded time with the broken list named. The bytes are put back after each, and at the end
ps and modules equal the guest's /proc again."""

from __future__ import annotations

import json
import time

import pytest
import trio

from vmwatch.os.linux.kernel import Linux
from vmwatch.target import open_target
from vmwatch.testing.cli import run_cli

from . import corruptions as c
from .guesttruth import assert_lists_match_proc

pytestmark = pytest.mark.guest

LIMIT = {"ps": 60, "modules": 60, "syscalls": 60, "watch": 90}


def _on_kernel(qmp: str, work):
    async def read():
        async with open_target(qmp) as target:
            return work(Linux.from_memory(target.memory, await target.cpu_state()))
    return trio.run(read)


def _timed(*argv):
    start = time.monotonic()
    result = run_cli(*argv)
    took = time.monotonic() - start
    assert result.status == 0 and "Traceback" not in result.stderr, (argv, result.stderr)
    assert took < LIMIT[argv[0]], (argv, took)
    return result, took


def _write(qmp: str, vaddr: int, data: bytes) -> bytes:
    """Write ``data`` at ``vaddr`` with the CLI; the bytes it replaced."""
    wrote = run_cli("write", qmp, hex(vaddr), data.hex(), "--write", "--json")
    assert wrote.status == 0, wrote.stderr
    return bytes.fromhex(json.loads(wrote.stdout)["old"])


def test_commands_and_rules_on_a_corrupted_live_guest(lab_guest_factory, record_property):
    """Every corruption: listing commands paused, watch running (where safe), bytes restored exactly."""
    guest = lab_guest_factory()
    qmp = f"qemu:{guest.qmp_path}"
    guest.shell("scenario module", timeout=60)
    took: dict[str, float] = {}
    guest.qmp().execute("stop")
    try:
        clean = _on_kernel(qmp, c.clean_facts)
        for name in c.EXPECTED:
            patches = _on_kernel(qmp, getattr(c, name))
            olds = [_write(qmp, vaddr, data) for vaddr, data in patches]
            assert [old != data for old, (_, data) in zip(olds, patches)] == [True] * len(patches), name
            for command in ("ps", "modules", "syscalls"):
                result, took[f"{command} {name}"] = _timed(command, qmp, "--json")
                c.check_listing(command, name, json.loads(result.stdout), result.stderr, clean)
                assert guest.status() == "paused"  # a command resumes only a guest it paused itself
            if name in c.RUN_SAFE:
                result, took[f"watch {name}"] = _timed("watch", qmp, "--rules", "security", "--rules", "timeline",
                                                       "--json", "--duration", "5")
                c.check_watch(name, [json.loads(line) for line in result.stdout.splitlines()], result.stderr)
                guest.qmp().execute("stop")
            for (vaddr, data), old in reversed(list(zip(patches, olds))):
                assert _write(qmp, vaddr, old) == data, name  # nothing changed them meanwhile
        assert _on_kernel(qmp, c.clean_facts) == clean
    finally:
        guest.qmp().execute("cont")
        record_property("seconds", took)
    print({k: round(v, 2) for k, v in took.items()})
    assert_lists_match_proc(guest, qmp)
    guest.stop()
