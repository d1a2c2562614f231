"""The debugger on a QEMU dump of the lab guest: read-only, truth from the guest's own /proc."""

from __future__ import annotations

import re

import pytest

from vmwatch.debug import Debugger
from vmwatch.debug.shell import hexdump
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def dump(lab_guest, tmp_path_factory):
    """A dump of the lab guest plus truth taken from inside it just before."""
    lab_guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict")
    kallsyms = lab_guest.shell(r"grep -E ' [Tt] (commit_creds|do_nanosleep|schedule)$' /proc/kallsyms")
    truth = {m.group(2): int(m.group(1), 16) for m in re.finditer(r"([0-9a-f]{16}) [Tt] (\w+)", kallsyms)}
    version = lab_guest.shell("cat /proc/version").strip()
    path = lab_guest.dump(tmp_path_factory.mktemp("dbg") / "lab.elf")
    return path, truth, version


class TestDumpSession:
    def test_symbols_match_kallsyms(self, dump):
        """Symbol expressions resolve to the addresses /proc/kallsyms shows inside the guest."""
        path, truth, _ = dump
        assert set(truth) == {"commit_creds", "do_nanosleep", "schedule"}
        with Debugger.open(str(path)) as dbg:
            assert dbg.read_only
            for name, address in truth.items():
                assert dbg.evaluate(name) == address
                assert dbg.evaluate(f"{name}+0x10") == address + 0x10
                assert dbg.symbolize(address + 3) == f"{name}+0x3"

    def test_memory_and_disassembly(self, dump):
        """x/s of linux_banner is /proc/version; disassembly starts at the symbol and decodes the bytes read."""
        path, truth, version = dump
        with Debugger.open(str(path)) as dbg:
            banner = dbg.read("linux_banner", 256).split(b"\0")[0].decode().strip()
            assert banner == version
            insns = dbg.disassemble("commit_creds", 8)
            assert insns[0].address == truth["commit_creds"]
            raw = dbg.read(truth["commit_creds"], sum(i.size for i in insns))
            assert b"".join(i.raw for i in insns) == raw
            assert [i.address for i in insns] == [truth["commit_creds"] + sum(i.size for i in insns[:k])
                                                   for k in range(len(insns))]

    def test_saved_state_backtrace_and_task(self, dump):
        """Registers come from the dump; the backtrace starts at RIP and finds return addresses after calls."""
        path, _, _ = dump
        with Debugger.open(str(path)) as dbg:
            regs = dbg.registers()
            frames = dbg.backtrace()
            assert frames[0].address == regs.rip
            assert len(frames) >= 2 and all(f.symbol for f in frames)
            for frame in frames[1:]:
                assert regs.rsp <= frame.stack_address < (regs.rsp | 0x3FFF) + 1
            task = dbg.current_task()
            if frames[0].symbol.startswith(("native_safe_halt", "default_idle", "pv_native_safe_halt")):
                assert (task.pid, task.comm) == (0, "swapper/0")  # the idle task: the shell was waiting
            assert 0 <= task.pid < 1 << 22 and task.comm


class TestDumpScript:
    def test_script_errors_do_not_stop_the_session(self, dump, tmp_path):
        """Bad addresses, commands and read-only control each print one error line; later commands run."""
        path, truth, _ = dump
        script = tmp_path / "s.txt"
        script.write_text("x/8b 0xdeadbeef\nbogus\nstep\nbreak commit_creds\np nosuchsym\n"
                          "dis commit_creds 2\nx/2g $rsp\ntask\n")
        result = run_cli("debug", path, "--script", script)
        assert result.status == 1
        errors = result.stderr.splitlines()
        assert len(errors) == 5 and all(e.startswith("error: ") for e in errors)
        assert "0xdeadbeef" in errors[0] and "read-only" in errors[2] and "read-only" in errors[3]
        assert f"{truth['commit_creds']:#018x} <commit_creds>:" in result.stdout
        assert "comm 'swapper/0'" in result.stdout or "comm '" in result.stdout
        assert "Traceback" not in result.stderr


def test_hexdump_units():
    """Byte dumps show ASCII; word dumps are little-endian units."""
    data = bytes(range(0x41, 0x51)) + (0x1122334455667788).to_bytes(8, "little")
    lines = hexdump(0x1000, data)
    assert lines[0].endswith("ABCDEFGHIJKLMNOP") and lines[0].startswith("0x0000000000001000  41 42")
    assert hexdump(0x1000, data, 8)[1] == "0x0000000000001010  0x1122334455667788"
