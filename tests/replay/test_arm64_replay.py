"""Recording a watch of the live arm64 guest and replaying it with no hypervisor; aarch64 registers records."""

from __future__ import annotations

import json

import pytest

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import RecordingError
from vmwatch.replay import Recording, _codec
from vmwatch.testing.cli import run_cli


def test_aarch64_registers_round_trip_and_hostile_x() -> None:
    """Aarch64Registers survive a record; x0..x30 of the wrong length or type are refused."""
    regs = Aarch64Registers(vcpu=1, x=tuple(range(31)), sp=0xFFFF800008003F00, pc=0xFFFF800008010000,
                            pstate=0x3C5, sp_el0=0xFFFF000001230000, ttbr1_el1=0x41858000, tcr_el1=0x6080100010)
    assert _codec.decode_registers(_codec.encode_registers(regs)) == regs
    good = json.loads(_codec.encode_registers(regs))
    for bad in ({"$tuple": [1, 2, 3]}, {"$tuple": ["x"] * 31}, 5):
        good["fields"]["x"] = bad
        with pytest.raises(RecordingError, match="x0..x30"):
            _codec.decode_registers(json.dumps(good).encode())


FIVES = ("sh -c 'rm -f /tmp/five.pids; for i in $(seq 1 200); do sh -c \"exit 5\" & echo $! >> /tmp/five.pids;"
         " wait; sleep 0.1; done' >/dev/null 2>&1 & echo $!")
"""A background loop of processes that exit with status 5; the shell writes down each one's pid."""


@pytest.mark.guest
def test_replay_of_an_arm64_watch_prints_the_same_lines(arm64_guest, tmp_path) -> None:
    """A recorded watch (security and timeline packs) replays to the same JSON lines, the x86 rules set
    aside again (the recording says aarch64); the exits it saw are the guest's own status-5 processes."""
    record = tmp_path / "arm64.vmwr"
    loop = int(arm64_guest.shell(FIVES, check=True).split()[-1])
    try:
        live = run_cli("watch", arm64_guest.target, "--rules", "security", "timeline", "--json", "--duration", "8",
                       "--record", record)
    finally:
        arm64_guest.shell(f"kill {loop}")
    assert live.status == 0, live.stderr
    fives = {int(p) for p in arm64_guest.shell("cat /tmp/five.pids", check=True).split() if p.isdigit()}
    lines = [json.loads(line) for line in live.stdout.splitlines()]
    exits = {x["pid"]: x["message"] for x in lines if x.get("rule") == "timeline.process_exit" and x["pid"] in fives}
    assert exits and all(message.endswith("exited with status 5") for message in exits.values())
    with Recording.open(record) as recording:
        assert recording.meta["arch"] == "aarch64"
    replay = run_cli("--log-level", "info", "replay", record, "--rules", "security", "timeline", "--json")
    assert replay.status == 0, replay.stderr
    assert replay.stdout == live.stdout
    assert "x86 only, the guest is aarch64" in replay.stderr
