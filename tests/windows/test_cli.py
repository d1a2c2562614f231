"""ps/modules/syscalls on Windows images through the CLI: OS detected with no flag, tables and --json."""

from __future__ import annotations

import json

import pytest

from vmwatch.testing.cli import run_cli
from vmwatch.testing.windowsguest import WindowsGuest


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
