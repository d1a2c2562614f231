"""``vmwatch gdbserver`` serving the arm64 lab guest and its dump to a real ``gdb-multiarch`` (batch mode).

What gdb prints is compared with what QEMU says at the same moment (HMP ``info registers`` and ``x``,
QEMU's own MMU), with the guest's /proc/kallsyms and /proc/version: never with vmwatch's own reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

from vmwatch.testing.arm64truth import hmp_registers, hmp_words, kallsyms
from vmwatch.testing.cli import run_cli

pytestmark = [pytest.mark.guest, pytest.mark.skipif(shutil.which("gdb-multiarch") is None,
                                                    reason="gdb-multiarch is missing (Debian package gdb-multiarch)")]


def gdb_argv(target: str, *commands: str, symbol_file=None) -> list[str]:
    argv = ["gdb-multiarch", "-batch", "-nx", "-ex", "set remotetimeout 120", "-ex", "set pagination off"]
    if symbol_file is not None:
        argv += ["-ex", f"symbol-file {symbol_file}"]
    argv += ["-ex", f"target remote | {sys.executable} -m vmwatch gdbserver --stdio {target}"]
    for command in commands:
        argv += ["-ex", command]
    return argv


def gdb_register(out: str, name: str) -> int:
    match = re.search(rf"^{name}\s+(0x[0-9a-f]+)", out, re.M)
    assert match, (name, out)
    return int(match.group(1), 16)


def gdb_words(out: str, address: int, count: int) -> list[int]:
    """The ``count`` words gdb's ``x/Ngx`` printed from ``address`` on (two a line)."""
    words: dict[int, int] = {}
    for line in out.splitlines():
        match = re.match(r"(0x[0-9a-f]+)(?: <[^>]*>)?:((?:\s+0x[0-9a-f]{16})+)$", line)
        if match and address <= int(match.group(1), 16) < address + 8 * count:
            at = int(match.group(1), 16)
            words.update({at + 8 * i: int(w, 16) for i, w in enumerate(match.group(2).split())})
    return [words.get(address + 8 * i) for i in range(count)]


def test_gdb_multiarch_reads_the_dump(arm64_guest, arm64_idle_dump, tmp_path) -> None:
    """An aarch64 target.xml: pc/sp/x30/cpsr are QEMU's at the dump, x/4gx $sp the words QEMU read there, the
    dump's missing system registers <unavailable>, and the pc's function where /proc/kallsyms puts it."""
    path, _live, hmp, stack = arm64_idle_dump
    symbol_file = tmp_path / "kernel.sym"
    assert run_cli("symbols", "export", path, "-o", symbol_file).status == 0
    result = subprocess.run(gdb_argv(path, "show architecture", "info registers pc sp x30 cpsr", "x/4gx $sp",
                                     "info registers ttbr1_el1", "info symbol $pc", "detach", symbol_file=symbol_file),
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert "(currently \"aarch64\")" in out, out
    assert [gdb_register(out, r) for r in ("pc", "sp", "x30", "cpsr")] == [hmp["PC"], hmp["SP"], hmp["X30"],
                                                                         hmp["PSTATE"]]
    assert gdb_words(out, hmp["SP"], 4) == stack[:4]
    assert re.search(r"^ttbr1_el1\s+<unavailable>", out, re.M), out
    name, offset = re.search(r"^(\S+) \+ (\d+) in section \.text", out, re.M).groups()
    assert kallsyms(arm64_guest, name)[name] + int(offset) == hmp["PC"]


def test_gdb_multiarch_on_the_live_guest(arm64_guest, tmp_path) -> None:
    """A breakpoint by address stops in ksys_write; while gdb holds the guest, QEMU's registers and stack
    words are gdb's; the banner read through the kernel's tables is /proc/version; a stepi moves one
    instruction; after detach the guest runs on."""
    truth = kallsyms(arm64_guest, "ksys_write")["ksys_write"]
    version = arm64_guest.shell("cat /proc/version", check=True).strip()
    stopped, read = tmp_path / "stopped", tmp_path / "read"
    symbol_file = tmp_path / "kernel.sym"
    assert run_cli("symbols", "export", arm64_guest.target, "-o", symbol_file).status == 0
    arm64_guest.shell("scenario busy start", check=True)
    try:
        gdb = subprocess.Popen(gdb_argv(
            arm64_guest.target, f"break *{truth:#x}", "continue", "info registers pc sp x0 sp_el0 ttbr1_el1",
            "x/4gx $sp", "x/s (char *)&linux_banner", f"shell touch {stopped}; while [ ! -e {read} ]; do sleep 0.1; done",
            "stepi", "info registers pc", "delete", "detach", symbol_file=symbol_file),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not stopped.exists():
            assert gdb.poll() is None and time.monotonic() < deadline, gdb.communicate()
            time.sleep(0.1)
        hmp = hmp_registers(arm64_guest)
        stack = hmp_words(arm64_guest, hmp["SP"], 4)
        read.touch()
        out, _ = gdb.communicate(timeout=240)
    finally:
        arm64_guest.shell("scenario busy stop", check=True)
    assert gdb.returncode == 0, out
    pcs = [int(m, 16) for m in re.findall(r"^pc\s+(0x[0-9a-f]+)", out, re.M)]
    assert pcs == [truth, truth + 4] and hmp["PC"] == truth, out
    assert gdb_register(out, "sp") == hmp["SP"] and gdb_register(out, "x0") == hmp["X00"]
    assert gdb_register(out, "sp_el0") >> 48 == 0xFFFF and gdb_register(out, "ttbr1_el1") != 0
    assert gdb_words(out, hmp["SP"], 4) == stack
    assert version[:60] in out.replace("\\n", "\n"), out
    assert "detached" in out and arm64_guest.status() == "running"
