"""A lab dump taken while the vCPU runs a user-mode loop, re-wrapped as a VMware .vmsn: such a
checkpoint has no EFER and no segments, and rip is a user address, yet the 64-bit kernel is found
(the IDTR and GDTR bases above 4 GiB say long mode). Truth: the loop's pid from the guest's shell."""

from __future__ import annotations

import json

import pytest

from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest


def test_vmsn_of_a_guest_paused_in_user_mode_finds_the_kernel(lab_guest, tmp_path):
    loop = int(lab_guest.shell("(while :; do :; done) & echo $!", check=True).split()[-1])
    qmp = lab_guest.qmp()
    try:
        for _ in range(50):  # a busy loop holds the only vCPU nearly always; a stop may land in the kernel
            qmp.execute("stop")
            try:
                dump = lab_guest.dump(tmp_path / "user.elf")
            finally:
                qmp.execute("cont")
            with open_image(dump) as image:
                regs = build.registers_dict(image.cpus[0])
                if regs["rip"] < 1 << 47:
                    memory = image.read(0, image.runs[0].size)
                    break
        else:
            pytest.fail("50 stops of a busy guest all landed in the kernel")
    finally:
        lab_guest.shell(f"kill {loop}")
    vmsn = tmp_path / "user.vmsn"
    vmsn.write_bytes(build.vmware_checkpoint(memory, regions=[(0, 0, len(memory) >> 12)], cpus=[regs]))
    result = run_cli("ps", str(vmsn), "--json")
    assert result.status == 0, result.stderr
    tasks = {p["pid"]: p for p in json.loads(result.stdout)}
    assert tasks[loop]["comm"] == "sh"
    assert tasks == {p["pid"]: p for p in json.loads(run_cli("ps", str(dump), "--json").stdout)}
