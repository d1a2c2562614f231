"""The lab's /bin/fault: its bytes are the instructions its listing names, and it faults as it says."""

from __future__ import annotations

import platform
import re
import signal
import subprocess

import capstone
import pytest

from vmwatch.lab.fault_program import CODE, DIGITS, ENTRY, LISTING, fault_program


def test_code_is_its_listing():
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    decoded = [f"{m} {o}".strip() for _, _, m, o in md.disasm_lite(CODE[:-len(DIGITS)], ENTRY)]
    assert decoded == [text for _, text in LISTING]
    lea = next(i for i, (_, text) in enumerate(LISTING) if text.startswith("lea rcx"))
    after = ENTRY + sum(len(bytes.fromhex(h)) for h, _ in LISTING[:lea + 1])
    assert after + 0x37 == ENTRY + len(CODE) - len(DIGITS)  # rip-relative: the digits


@pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux", reason="an x86-64 Linux program")
@pytest.mark.parametrize(("argv", "status"), [(["ud"], -signal.SIGILL), (["gp"], -signal.SIGSEGV),
                                              (["pf"], -signal.SIGSEGV), ([], 2), (["x"], 2), (["ud", "gp"], 2)])
def test_runs_on_the_host(tmp_path, argv, status):
    program = tmp_path / "fault"
    program.write_bytes(fault_program())
    program.chmod(0o755)
    done = subprocess.run([str(program), *argv], capture_output=True, timeout=10)
    assert done.returncode == status
    assert re.fullmatch(rb"0x7[0-9a-f]{7,11}\n", done.stdout) if argv == ["pf"] else done.stdout == b""
