"""Zero-config arm64 Linux on the real arm64 lab guest (KASLR on): a dump and the live guest
against the guest's own /proc, and QEMU's own view of SP_EL0 for init_task."""

from __future__ import annotations

import json
import struct

import pytest
import trio

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux
from vmwatch.target import open_target
from vmwatch.testing.cli import run_cli

from .guesttruth import LISTING, NAMES, name_matches, parse_listing, parse_names, snapshot, stable
from .test_guest import check_modules, check_ps

pytestmark = pytest.mark.guest

SAMPLE = ("_stext", "_etext", "do_exit", "ksys_read", "show_state_filter", "print_modules", "schedule",
          "__arm64_sys_openat", "vfs_read", "el0_svc", "copy_process", "kernel_clone")
"""Text symbols compared with the guest's /proc/kallsyms."""


@pytest.fixture(scope="module")
def arm64_snap(arm64_guest, tmp_path_factory):
    return snapshot(arm64_guest, tmp_path_factory.mktemp("arm64") / "arm64.elf")


def proc_kallsyms(guest, names) -> dict[str, int]:
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    pattern = " ".join(f"-e ' {n}$'" for n in names)
    lines = guest.shell(f"grep {pattern} /proc/kallsyms", check=True).splitlines()
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in lines) if len(parts) == 3}


def test_ps_on_the_dump_matches_proc(arm64_snap) -> None:
    """Every pid /proc lists around the dump is found with the same comm, ppid and uid; user tasks have a TTBR0."""
    check_ps(arm64_snap)


def test_modules_on_the_dump_match_proc_modules(arm64_snap) -> None:
    """Module names, sizes and bases equal /proc/modules (the modules list head came from print_modules' code)."""
    check_modules(arm64_snap)


@pytest.fixture(scope="module")
def arm64_kallsyms_map(arm64_guest, tmp_path_factory):
    """The guest's own /proc/kallsyms (the kernel's lines), saved as a System.map."""
    arm64_guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    text = arm64_guest.shell("grep -v '\\[' /proc/kallsyms", timeout=900, check=True)
    path = tmp_path_factory.mktemp("arm64-map") / "System.map"
    path.write_text(text)
    return path


def test_ps_and_modules_with_a_system_map(arm64_snap, arm64_kallsyms_map) -> None:
    """``--symbols`` with the guest's kallsyms as a System.map: the same pids, comms, ppids, uids and
    modules as /proc (data symbols it lacks are found from code as without it)."""
    check_ps(arm64_snap, "--symbols", str(arm64_kallsyms_map))
    check_modules(arm64_snap, "--symbols", str(arm64_kallsyms_map))


def test_another_kernels_system_map_is_refused(arm64_snap, arm64_kallsyms_map, tmp_path) -> None:
    """Functions moved (another build's map), a file of no known kind, a vmlinux or ISF (types come
    from BTF on arm64): one line, exit 2."""
    moved = tmp_path / "moved.map"
    lines = []
    for line in arm64_kallsyms_map.read_text().splitlines():
        address, kind, name = line.split()[:3]
        if kind in "tT" and name not in ("_text", "_stext"):
            address = f"{int(address, 16) + 0x40:016x}"
        lines.append(f"{address} {kind} {name}")
    moved.write_text("\n".join(lines) + "\n")
    junk = tmp_path / "junk.map"
    junk.write_bytes(b"\x00\xffnot symbols\n" * 10)
    isf = tmp_path / "arm64.json"
    assert run_cli("symbols", "export", arm64_snap.dump, "-o", str(isf)).status == 0
    for path, why in ((moved, "is not this kernel's symbol file"), (junk, "not a System.map"),
                      (isf, "a System.map only")):
        result = run_cli("ps", arm64_snap.dump, "--symbols", str(path))
        assert result.status == 2 and why in result.stderr, (path.name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_kernel_symbols_and_release(arm64_snap, arm64_guest) -> None:
    """kallsyms read from the dump gives /proc/kallsyms's addresses; the banner is the guest's; the
    slide is 2 MiB-aligned; data symbols absent from kallsyms were recovered."""
    truth = proc_kallsyms(arm64_guest, SAMPLE)
    assert set(truth) == set(SAMPLE)
    assert "init_task" not in proc_kallsyms(arm64_guest, ("init_task", "_stext"))  # CONFIG_KALLSYMS_ALL off
    with open_image(arm64_snap.dump) as image:
        linux = Linux.from_memory(image, image.cpus)
        assert {name: linux.symbols[name] for name in SAMPLE} == truth
        assert linux.kernel.release == arm64_guest.kernel_release
        assert linux.kernel.banner == arm64_guest.shell("cat /proc/version", check=True).strip()
        assert linux.kernel.slide % (2 << 20) == 0 and linux.kernel.slide
        init = linux.memory.read(linux.symbols["init_task"], 0x1000)
        assert b"swapper" in init


def test_syscalls_on_the_dump(arm64_snap, arm64_guest) -> None:
    """sys_call_table (from do_el0_svc's code) has __NR_syscalls entries (from el0_svc_common's), all in
    kernel text; read (63) and write (64) are the handlers /proc/kallsyms names."""
    truth = proc_kallsyms(arm64_guest, ("__arm64_sys_read", "__arm64_sys_write", "__arm64_sys_io_setup"))
    result = run_cli("syscalls", arm64_snap.dump, "--json")
    assert result.status == 0, result.stderr
    table = json.loads(result.stdout)
    assert 440 <= len(table) <= 500 and all(e["in_text"] for e in table)
    assert [table[i]["address"] for i in (0, 63, 64)] == [truth[n] for n in ("__arm64_sys_io_setup",
                                                                            "__arm64_sys_read", "__arm64_sys_write")]
    assert all(e["symbol"].startswith("__arm64_sys_") for e in table)


def test_symbols_export(arm64_snap, tmp_path) -> None:
    """ISF and ELF exports of the dump carry the recovered data symbols at the addresses ps used."""
    isf = tmp_path / "arm64.json"
    result = run_cli("symbols", "export", arm64_snap.dump, "-o", str(isf))
    assert result.status == 0, result.stderr
    doc = json.loads(isf.read_text())
    assert {"init_task", "modules", "linux_banner", "swapper_pg_dir", "_stext"} <= set(doc["symbols"])
    assert "task_struct" in doc["user_types"]
    elf = run_cli("symbols", "export", arm64_snap.dump, "-o", str(tmp_path / "arm64.elf"))
    assert elf.status == 0 and "KASLR slide 0x" in elf.stdout


def test_live_guest(arm64_guest) -> None:
    """Tasks and modules of the running arm64 guest match /proc; SP_EL0 (QEMU's `current`) is a task we list,
    or init_task itself when the vCPU idles."""

    async def walk():
        async with open_target(f"qemu:{arm64_guest.qmp_path}") as target:
            await target.live.pause()
            try:
                cpus = await target.cpu_state()
                linux = Linux.from_memory(target.memory, cpus)
                return linux.tasks(), linux.modules(), linux.symbols["init_task"], cpus[0]
            finally:
                await target.live.resume()

    arm64_guest.shell("grep -q '^tcp_yeah ' /proc/modules || scenario module", timeout=60)
    before = parse_listing(arm64_guest.shell(LISTING, timeout=120))
    tasks, modules, init_task, regs = trio.run(walk)
    after = parse_names(arm64_guest.shell(NAMES, timeout=60))
    ours = {t.pid: t for t in tasks}
    stable_procs = stable(before, after)
    assert len(stable_procs) > 20 and set(stable_procs) <= set(ours), set(stable_procs) - set(ours)
    for pid, proc in stable_procs.items():
        assert name_matches(ours[pid].name, proc.comm, after.get(pid)), (pid, ours[pid].name, proc.comm)
        assert ours[pid].ppid == proc.ppid and ours[pid].uid == proc.uid
    proc_modules = {line.split()[0] for line in arm64_guest.shell("cat /proc/modules").strip().splitlines()}
    assert {m.name for m in modules} == proc_modules and "tcp_yeah" in proc_modules
    if regs.el == 1:
        assert regs.sp_el0 == init_task or regs.sp_el0 in {t.address for t in tasks} | {
            t.address for t in tasks if t.threads}
    assert arm64_guest.status() == "running"


def test_corrupted_copies_end_with_one_line(arm64_snap, tmp_path) -> None:
    """A copy of the dump with the kernel root zeroed, the BTF header zeroed, a cyclic task list or no
    CPU notes: exit 2 with one line naming what is missing, or (cycle, no notes) a bounded listing."""
    import shutil

    with open_image(arm64_snap.dump) as image:
        delta = image.runs[0].file_offset - image.runs[0].start
        linux = Linux.from_memory(image, image.cpus)
        tasks = linux.tasks()
        link = linux.types.member("task_struct", "tasks").offset
        patches = {
            "swapper": (linux.kernel.kernel_cr3, bytes(4096)),
            "btf": (_btf_paddr(image, linux), bytes(8)),
            "cycle": (linux.memory.translate(tasks[3].address + link), struct.pack("<Q", tasks[1].address + link)),
        }
    copy = tmp_path / "copy.elf"
    shutil.copyfile(arm64_snap.dump, copy)
    copy.chmod(0o600)
    results = {}
    with open(copy, "r+b") as f:
        for name, (paddr, data) in patches.items():
            f.seek(paddr + delta)
            original = f.read(len(data))
            f.seek(paddr + delta)
            f.write(data)
            f.flush()
            results[name] = run_cli("ps", "--json", str(copy))
            f.seek(paddr + delta)
            f.write(original)
        f.seek(0)
        note = f.read(8192).find(b"CORE\0")
        f.seek(note - 4)
        f.write(struct.pack("<I", 99))  # NT_PRSTATUS -> an unknown note type: no CPU state at all
    results["no-notes"] = run_cli("ps", "--json", str(copy))
    for name, words in (("swapper", "swapper_pg_dir"), ("btf", "no BTF")):
        assert results[name].status == 2 and results[name].stderr.count("\n") == 1, (name, results[name].stderr)
        assert words in results[name].stderr
    cycled = json.loads(results["cycle"].stdout)
    assert results["cycle"].status == 0 and 0 < len(cycled) <= 4 and "init_task.tasks" in results["cycle"].stderr
    intact = [p["pid"] for p in json.loads(run_cli("ps", "--json", arm64_snap.dump).stdout)]
    assert results["no-notes"].status == 0 and [p["pid"] for p in json.loads(results["no-notes"].stdout)] == intact


def _btf_paddr(image, linux) -> int:
    from vmwatch.os.linux.arm64 import BTF_HEADER

    start = linux.kernel.text_paddr
    data = image.read(start, linux.kernel.kernel_cr3 - start)
    return start + data.index(BTF_HEADER)


def test_idt_is_x86s(arm64_snap) -> None:
    """`vmwatch idt` on an arm64 dump: exit 2, one line saying the IDT is x86's."""
    result = run_cli("idt", arm64_snap.dump)
    assert result.status == 2 and result.stderr.count("\n") == 1 and "VBAR_EL1" in result.stderr, result.stderr
