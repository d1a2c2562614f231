"""Linux zero-config on the real lab guest: processes and modules against the guest's own /proc."""

from __future__ import annotations

import json

import pytest

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux
from vmwatch.testing.cli import run_cli

from .guesttruth import name_matches, worker_descs

pytestmark = pytest.mark.guest


def check_ps(snap, *extra: str) -> None:
    result = run_cli("ps", snap.dump, "--json", *extra)
    assert result.status == 0, result.stderr
    ours = {p["pid"]: p for p in json.loads(result.stdout)}
    stable = snap.stable
    assert len(stable) > 20
    missing = set(stable) - set(ours)
    assert not missing, f"processes /proc listed before and after the dump but ps missed: {missing}"
    extra = set(ours) - snap.possible
    assert not extra, f"ps shows pids /proc never listed: {extra}"
    descs = worker_descs({pid: p.comm for pid, p in snap.before.items()}, snap.after_names)
    for pid, proc in stable.items():
        name = ours[pid]["name"]
        assert name_matches(name, proc.comm, snap.after_names.get(pid), descs), (pid, name, proc.comm,
                                                                                 snap.after_names.get(pid))
        assert name.startswith(ours[pid]["comm"]) and len(ours[pid]["comm"]) <= 15, (pid, ours[pid])
        assert ours[pid]["ppid"] == proc.ppid, (pid, ours[pid], proc)
        assert ours[pid]["uid"] == proc.uid, (pid, ours[pid], proc)
    workers = [p["name"] for p in ours.values() if p["comm"].startswith("kworker/") and p["name"] != p["comm"]]
    assert workers, "no kworker shows its workqueue (kworker/0:0-rcu_gp) as /proc does"
    sleepers = [p for p in ours.values() if p["comm"] == "sleep"]
    assert sleepers and all(p["cr3"] for p in sleepers)


def check_modules(snap, *extra: str) -> None:
    result = run_cli("modules", snap.dump, "--json", *extra)
    assert result.status == 0, result.stderr
    ours = {m["name"]: m for m in json.loads(result.stdout)}
    assert {name for name, _, _ in snap.modules} == set(ours)
    assert "tcp_yeah" in ours
    for name, size, base in snap.modules:
        assert ours[name]["size"] == size
        if base:  # /proc/modules prints 0 unless kptr_restrict allows addresses
            assert ours[name]["base"] == base


class TestDefaultGuest:
    def test_ps_matches_proc(self, default_snap):
        """Every pid /proc lists around the dump is found with the same comm, ppid and uid."""
        check_ps(default_snap)

    def test_modules_match_proc_modules(self, default_snap):
        """Module names, sizes and bases equal /proc/modules."""
        check_modules(default_snap)

    def test_without_registers(self, default_snap):
        """Scanning physical memory (no CPU state) finds the same kernel as the saved CR3 does."""
        with open_image(default_snap.dump) as image:
            with_regs = Linux.from_memory(image, image.cpus)
            blind = Linux.from_memory(image, ())
            assert blind.kernel == with_regs.kernel
            assert [t.pid for t in blind.tasks()] == [t.pid for t in with_regs.tasks()]

    def test_kernel_info(self, default_snap, lab_guest):
        """The banner read through the found mapping names the release the guest reports."""
        with open_image(default_snap.dump) as image:
            linux = Linux.from_memory(image, image.cpus)
        assert linux.kernel.release == lab_guest.kernel_release
        assert linux.kernel.slide % (2 << 20) == 0

    def test_current_task_from_gs(self, default_snap):
        """current_task at the saved GS base is the same task as through __per_cpu_offset[cpu]."""
        with open_image(default_snap.dump) as image:
            linux = Linux.from_memory(image, image.cpus)
            for cpu, regs in enumerate(image.cpus):
                task = linux.current_task(regs)
                assert task.address == linux.memory.pointer(linux.per_cpu("current_task", cpu))
                assert task.pid == 0 or task.tgid in {t.pid for t in linux.tasks()}

    def test_syscalls_and_idt(self, default_snap):
        """Syscall 0 is read, 1 is write; the IDT's divide-error gate resolves to its handler."""
        result = run_cli("syscalls", default_snap.dump, "--json")
        assert result.status == 0, result.stderr
        table = json.loads(result.stdout)
        assert table[0]["symbol"].endswith("sys_read") and table[1]["symbol"].endswith("sys_write")
        assert all(e["in_text"] for e in table)
        result = run_cli("idt", default_snap.dump, "--json")
        gates = {g["vector"]: g for g in json.loads(result.stdout)}
        assert "divide_error" in gates[0]["symbol"]


def test_isf_export_round_trip(default_snap, tmp_path):
    """ps through the exported ISF (--symbols) lists the same processes as zero-config ps."""
    isf = tmp_path / "kernel.json"
    result = run_cli("symbols", "export", default_snap.dump, "-o", str(isf))
    assert result.status == 0, result.stderr
    plain = json.loads(run_cli("ps", default_snap.dump, "--json").stdout)
    via_isf = run_cli("ps", default_snap.dump, "--json", "--symbols", str(isf))
    assert via_isf.status == 0, via_isf.stderr
    assert [(p["pid"], p["comm"], p["uid"]) for p in json.loads(via_isf.stdout)] == [
        (p["pid"], p["comm"], p["uid"]) for p in plain]


def test_live_guest(lab_guest):
    """Tasks and modules of the running guest through qemu:<qmp socket> match /proc around the walk."""
    import trio

    from vmwatch.target import open_target

    from .guesttruth import LISTING, NAMES, parse_listing, parse_names, stable

    async def walk():
        async with open_target(f"qemu:{lab_guest.qmp_path}") as target:
            await target.live.pause()  # the lists change while the guest runs
            try:
                linux = Linux.from_memory(target.memory, await target.cpu_state())
                return linux.tasks(), linux.modules()
            finally:
                await target.live.resume()

    before = parse_listing(lab_guest.shell(LISTING, timeout=120))
    tasks, modules = trio.run(walk)
    after = parse_names(lab_guest.shell(NAMES, timeout=60))
    ours = {t.pid: t for t in tasks}
    stable_procs = stable(before, after)
    assert len(stable_procs) > 20 and set(stable_procs) <= set(ours), set(stable_procs) - set(ours)
    assert set(ours) <= set(before) | set(after)
    for pid, proc in stable_procs.items():
        assert name_matches(ours[pid].name, proc.comm, after.get(pid)), (pid, ours[pid].name, proc.comm)
        assert ours[pid].ppid == proc.ppid
    proc_modules = {line.split()[0] for line in lab_guest.shell("cat /proc/modules").strip().splitlines()}
    assert {m.name for m in modules} == proc_modules
    assert lab_guest.status() == "running"


def test_la57_two_cpus_above_4g(lab_guest_factory):
    """5-level paging, 2 vCPUs, 5 GiB read live: tasks sit above 4 GiB and match /proc, modules too."""
    import trio

    from vmwatch.target import open_target

    from .guesttruth import LISTING, NAMES, parse_listing, parse_names, stable

    guest = lab_guest_factory(memory="5G", cpus=2, cpu_model="qemu64,+la57")
    try:
        guest.shell("scenario module; scenario sleeper 900", timeout=60)

        async def walk():
            async with open_target(f"qemu:{guest.qmp_path}") as target:
                await target.live.pause()
                try:
                    registers = await target.cpu_state()
                    linux = Linux.from_memory(target.memory, registers)
                    tasks = linux.tasks()
                    paddrs = [linux.memory.translate(t.address) for t in tasks]
                    return len(registers), linux.kernel.mode.value, tasks, paddrs, linux.modules()
                finally:
                    await target.live.resume()

        before = parse_listing(guest.shell(LISTING, timeout=120))
        cpus, mode, tasks, paddrs, modules = trio.run(walk)
        after = parse_names(guest.shell(NAMES, timeout=60))
        proc_modules = {line.split()[0]: int(line.split()[1]) for line in guest.shell("cat /proc/modules").splitlines()
                        if line.strip()}
    finally:
        guest.stop()
    assert (cpus, mode) == (2, "5-level")
    assert max(paddrs) >= 4 << 30, f"highest task_struct at {max(paddrs):#x}"
    ours = {t.pid: t for t in tasks}
    stable_procs = stable(before, after)
    assert len(stable_procs) > 20 and set(stable_procs) <= set(ours) and set(ours) <= set(before) | set(after)
    for pid, proc in stable_procs.items():
        assert name_matches(ours[pid].name, proc.comm, after.get(pid)), (pid, ours[pid].name, proc.comm)
        assert ours[pid].ppid == proc.ppid
    assert {m.name: m.size for m in modules} == proc_modules


def check_live_cli(guest, *extra: str) -> None:
    """`vmwatch ps/modules qemu:<qmp>` match /proc around the walk and leave the guest running."""
    from .guesttruth import LISTING, NAMES, parse_listing, parse_names, stable

    before = parse_listing(guest.shell(LISTING, timeout=120))
    ps = run_cli("ps", f"qemu:{guest.qmp_path}", "--json", *extra)
    after = parse_names(guest.shell(NAMES, timeout=60))
    assert ps.status == 0, ps.stderr
    ours = {p["pid"]: p for p in json.loads(ps.stdout)}
    stable_procs = stable(before, after)
    assert len(stable_procs) > 20 and set(stable_procs) <= set(ours) and set(ours) <= set(before) | set(after)
    for pid, proc in stable_procs.items():
        assert name_matches(ours[pid]["name"], proc.comm, after.get(pid)), (pid, ours[pid]["name"], proc.comm)
        assert (ours[pid]["ppid"], ours[pid]["uid"]) == (proc.ppid, proc.uid), (pid, ours[pid], proc)
    modules = run_cli("modules", f"qemu:{guest.qmp_path}", "--json", *extra)
    assert modules.status == 0, modules.stderr
    proc_modules = {line.split()[0] for line in guest.shell("cat /proc/modules").strip().splitlines()}
    assert {m["name"] for m in json.loads(modules.stdout)} == proc_modules
    assert guest.status() == "running"


def test_live_cli(lab_guest):
    """`vmwatch ps/modules qemu:<qmp>` print JSON that matches /proc, and leave the guest running."""
    check_live_cli(lab_guest)
