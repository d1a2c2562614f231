"""`vmwatch info qemu:...` on the real lab guest: RAM map and registers of a running QEMU."""

from __future__ import annotations

import json

import pytest

from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest


def test_info_json_on_live_guest(lab_guest) -> None:
    """The live RAM map covers the guest's own MemTotal and vCPU 0 is in 4-level long mode."""
    result = run_cli("info", lab_guest.target, "--json")
    assert result.status == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "qemu-live"
    assert info["cpus"] == 1
    mem_total_kib = int(lab_guest.shell("grep MemTotal /proc/meminfo").split()[1])
    assert sum(run["size"] for run in info["runs"]) >= mem_total_kib * 1024
    regs = info["registers"][0]
    assert regs["cr0"] & (1 << 31) and regs["cr4"] & (1 << 5) and regs["efer"] & (1 << 10)


def test_info_on_missing_socket_is_one_line() -> None:
    """A QMP socket that does not exist is exit 2 with one line, no traceback."""
    result = run_cli("info", "qemu:/nonexistent/qmp.sock")
    assert result.status == 2
    assert len(result.stderr.strip().splitlines()) == 1
