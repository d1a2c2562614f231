"""The real Volatility 3 through ``vmwatch vol``: a lab dump and the live guest agree with /proc and vmwatch."""

from __future__ import annotations

import json

import pytest

from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

from tests.linux.guesttruth import LISTING, NAMES, parse_listing, parse_names, snapshot, stable

pytest.importorskip("volatility3")
pytestmark = pytest.mark.guest


def vol_json(*argv: str) -> list[dict]:
    result = run_cli("vol", *argv, "--renderer", "json")
    assert result.status == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def snap(lab_guest, tmp_path_factory):
    return snapshot(lab_guest, tmp_path_factory.mktemp("vol") / "guest.elf")


def test_pslist_and_lsmod_on_a_dump_match_proc_and_vmwatch(snap):
    rows = vol_json(snap.dump, "linux.pslist")
    pids = {row["PID"]: row["COMM"] for row in rows}
    assert set(snap.stable) <= set(pids) <= snap.possible
    ours = json.loads(run_cli("ps", snap.dump, "--json").stdout)
    raw_comm = {p["pid"]: p["comm"] for p in ours}
    for pid, proc in snap.stable.items():
        # Volatility shows the kernel's 15-byte comm; /proc's name extends it (kworker desc, long kthread names).
        assert proc.comm.startswith(pids[pid]) and pids[pid] == raw_comm[pid], (pid, pids[pid], proc.comm)
    assert {p["pid"] for p in ours if p["pid"] == p.get("tgid", p["pid"])} <= set(pids) | {0}
    modules = {row["Module Name"] for row in vol_json(snap.dump, "linux.lsmod")}
    assert modules == {name for name, _, _ in snap.modules}
    assert modules == {m["name"] for m in json.loads(run_cli("modules", snap.dump, "--json").stdout)}


def test_pslist_on_the_live_guest_matches_proc_and_leaves_it_running(lab_guest):
    before = parse_listing(lab_guest.shell(LISTING, timeout=120))
    rows = vol_json(f"qemu:{lab_guest.qmp_path}", "linux.pslist")
    after = parse_names(lab_guest.shell(NAMES, timeout=60))
    pids = {row["PID"]: row["COMM"] for row in rows}
    lasting = stable(before, set(after))
    assert set(lasting) <= set(pids) <= set(before) | set(after)
    for pid, proc in lasting.items():
        assert proc.comm.startswith(pids[pid]), (pid, pids[pid], proc.comm)
    assert lab_guest.qmp().execute("query-status")["status"] == "running"


def test_lsmod_and_check_syscall_on_the_live_guest_match_proc_and_vmwatch(lab_guest, snap):
    target = f"qemu:{lab_guest.qmp_path}"
    assert {row["Module Name"] for row in vol_json(target, "linux.lsmod")} == {name for name, _, _ in snap.modules}
    rows = [row for row in vol_json(target, "linux.check_syscall") if row["Table Name"] == "64bit"]
    ours = json.loads(run_cli("syscalls", target, "--json").stdout)
    mask = (1 << 48) - 1
    assert len(rows) > 300
    assert {(r["Index"], r["Handler Address"]) for r in rows} <= {(s["index"], s["address"] & mask) for s in ours}


@pytest.fixture(scope="module")
def rewrapped(snap, tmp_path_factory):
    """The lab dump's RAM and vCPU state re-wrapped as a VirtualBox core and a VMware .vmsn."""
    out = tmp_path_factory.mktemp("rewrapped")
    with open_image(snap.dump) as image:
        ram = image.runs[0]
        assert ram.start == 0
        memory = image.read(0, ram.size)
        regs = build.registers_dict(image.cpus[0])
    # QEMU's ELF notes hold no EFER; the lab guest runs in long mode with NX, as a VBCPU would say.
    regs.setdefault("efer", 0xD01)
    (out / "guest.core").write_bytes(build.vbox_core([build.Load(0, memory)], [regs]))
    (out / "guest.vmsn").write_bytes(build.vmware_checkpoint(memory, regions=[(0, 0, ram.size >> 12)], cpus=[regs]))
    return out


@pytest.mark.parametrize("name", ["guest.core", "guest.vmsn"])
def test_pslist_on_formats_volatility_cannot_open(snap, rewrapped, name):
    rows = vol_json(str(rewrapped / name), "linux.pslist")
    pids = {row["PID"]: row["COMM"] for row in rows}
    assert set(snap.stable) <= set(pids) <= snap.possible
    for pid, proc in snap.stable.items():
        assert proc.comm.startswith(pids[pid]), (pid, pids[pid], proc.comm)
    assert pids == {row["PID"]: row["COMM"] for row in vol_json(snap.dump, "linux.pslist")}


def test_bad_input_is_one_line_and_status_2(snap):
    for argv in (("linux.nosuch",), ("linux.pslist", "--bogus", "1")):
        result = run_cli("vol", snap.dump, *argv)
        assert result.status == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_check_syscall_on_a_dump_matches_vmwatch_syscalls(snap):
    rows = [row for row in vol_json(snap.dump, "linux.check_syscall") if row["Table Name"] == "64bit"]
    ours = json.loads(run_cli("syscalls", snap.dump, "--json").stdout)
    mask = (1 << 48) - 1  # Volatility shows 48-bit addresses on its Intel32e layer
    # Volatility sizes the table from its symbols (a few short of NR_syscalls): every row it has agrees.
    assert len(rows) > 300
    assert {(r["Index"], r["Handler Address"]) for r in rows} <= {(s["index"], s["address"] & mask) for s in ours}
    by_index = {r["Index"]: r["Handler Symbol"] for r in rows}
    assert [by_index[i] for i in (0, 1, 59)] == ["__x64_sys_read", "__x64_sys_write", "__x64_sys_execve"]
