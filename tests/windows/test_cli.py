"""ps/modules/syscalls on Windows images through the CLI: OS detected with no flag, tables and --json."""

from __future__ import annotations

import json

import pytest

from vmwatch.testing.cli import run_cli
from vmwatch.testing.windowsguest import KERNEL_VA, WindowsGuest


@pytest.fixture(scope="module")
def images(ntoskrnl, tmp_path_factory):
    g = WindowsGuest(ntoskrnl)
    g.build_objects()
    d = tmp_path_factory.mktemp("win")
    (d / "win.raw").write_bytes(g.raw())
    (d / "win.dmp").write_bytes(g.crashdump())
    return g, d


@pytest.mark.parametrize("name", ["win.raw", "win.dmp"])
class TestCli:
    def test_ps_json(self, images, name):
        """ps --json gives the processes the builder wrote."""
        g, d = images
        r = run_cli("ps", d / name, "--json")
        assert r.status == 0, r.stderr
        assert [(p["pid"], p["ppid"], p["name"]) for p in json.loads(r.stdout)] == \
            [(p.pid, p.ppid, p.name.decode()) for p in g.processes]

    def test_modules_table(self, images, name):
        """modules prints each driver with its path."""
        g, d = images
        r = run_cli("modules", d / name)
        assert r.status == 0, r.stderr
        for driver, _base, _size, path in g.drivers:
            assert driver in r.stdout and path in r.stdout

    def test_syscalls_suspicious(self, images, name):
        """syscalls --suspicious shows only the entry outside ntoskrnl."""
        g, d = images
        r = run_cli("syscalls", d / name, "--suspicious", "--json")
        assert r.status == 0, r.stderr
        assert [e["address"] for e in json.loads(r.stdout)] == [g.services[-1]]


def test_unknown_build_one_line(ntoskrnl, tmp_path):
    """An unknown build: exit 2 and one line naming the build and --symbols."""
    g = WindowsGuest(ntoskrnl)
    g.build_objects()
    g.put_u32(g.ksym("NtBuildNumber"), 0xF0000000 | 9999)
    (tmp_path / "w.raw").write_bytes(g.raw())
    r = run_cli("ps", tmp_path / "w.raw")
    assert r.status == 2 and "9999" in r.stderr and "--symbols" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class TestInfo:
    def test_crash_dump_kernel_facts(self, images):
        """info on a crash dump: header facts and what the Windows layer found, and how, with no flag."""
        g, d = images
        r = run_cli("info", d / "win.dmp", "--json")
        assert r.status == 0, r.stderr
        doc = json.loads(r.stdout)
        meta = doc["metadata"]
        assert (meta["ps_active_process_head"], meta["ps_loaded_module_list"]) == (g.process_head, g.module_head)
        assert (meta["bugcheck_code"], tuple(meta["bugcheck_parameters"])) == (g.BUGCHECK[0], g.BUGCHECK[1])
        assert meta["processors"] == 1
        kernel = doc["kernel"]
        assert (kernel["os"], kernel["name"], kernel["build"]) == ("windows", "ntoskrnl.exe", 7601)
        found = {f["what"]: (f["value"], f["how"]) for f in kernel["found"]}
        assert found["kernel base"][0] == KERNEL_VA
        assert found["DTB"] == (g.fake.cr3, "crash dump header DirectoryTableBase")
        assert found["KDBG"] == (g.kdbg_vaddr, "crash dump header KdDebuggerDataBlock")
        assert found["PsActiveProcessHead"] == (g.process_head, "KDBG")
        assert found["PsLoadedModuleList"] == (g.module_head, "KDBG")
        assert found["build"] == (7601, "ntoskrnl export NtBuildNumber")

    def test_raw_needs_os_flag(self, images):
        """A raw image shows OS facts only with --os; then the scans say what they found."""
        g, d = images
        plain = run_cli("info", d / "win.raw")
        assert plain.status == 0 and "Kernel:" not in plain.stdout
        r = run_cli("info", d / "win.raw", "--os")
        assert r.status == 0, r.stderr
        section = r.stdout[r.stdout.index("Kernel: windows (ntoskrnl.exe, build 7601)"):]
        assert f"{KERNEL_VA:#x}" in section and "KDBG KernBase" in section
        assert f"{g.kdbg_vaddr:#x}" in section and "physical scan for the KDBG tag" in section
        assert f"{g.fake.cr3:#x}" in section and "System EPROCESS found by scan" in section

    def test_no_kernel_is_a_line(self, tmp_path):
        """--os on memory with no kernel: the format facts, one 'not found' line, exit 0."""
        (tmp_path / "zero.raw").write_bytes(bytes(4 << 20))
        r = run_cli("info", tmp_path / "zero.raw", "--os")
        assert r.status == 0, r.stderr
        assert r.stdout.count("Kernel: not found:") == 1 and "no ntoskrnl" in r.stdout

    def test_debug_log_names_each_step(self, images):
        """--log-level debug logs every init step with how it was found."""
        _g, d = images
        r = run_cli("--log-level", "debug", "ps", d / "win.raw")
        assert r.status == 0, r.stderr
        steps = [line for line in r.stderr.splitlines() if "windows.found" in line]
        whats = ("kernel physical base", "build", "profile", "kernel base", "DTB", "KDBG", "PsActiveProcessHead")
        assert all(any(w in line for line in steps) for w in whats), steps


def test_header_lists_without_kdbg(ntoskrnl, tmp_path):
    """A dump whose KDBG is encoded (no keys): the header's list heads give the kernel base and both lists."""
    g = WindowsGuest(ntoskrnl, encoded=True)
    g.build_objects()
    (tmp_path / "enc.dmp").write_bytes(g.crashdump(kdbg=False))
    r = run_cli("info", tmp_path / "enc.dmp", "--json")
    found = {f["what"]: (f["value"], f["how"]) for f in json.loads(r.stdout)["kernel"]["found"]}
    assert found["kernel base"] == (KERNEL_VA, "DllBase of the first entry on the crash dump header's "
                                               "PsLoadedModuleList")
    assert found["PsLoadedModuleList"] == (g.module_head, "crash dump header PsLoadedModuleList")
    assert "KDBG" not in found
    r = run_cli("modules", tmp_path / "enc.dmp", "--json")
    assert r.status == 0, r.stderr
    assert [m["name"] for m in json.loads(r.stdout)] == [d[0] for d in g.drivers]
    r = run_cli("ps", tmp_path / "enc.dmp", "--json")
    assert [p["pid"] for p in json.loads(r.stdout)] == [p.pid for p in g.processes]
