"""A live watch of the lab guest, recorded with `watch --record`, replayed: identical JSON lines."""

from __future__ import annotations

import json
import textwrap

import pytest

from vmwatch.replay import Recording
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest
pytest.importorskip("vmwatch.live.qemu")  # the live QEMU backend must be there

RULES = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_breakpoint("do_nanosleep")
    def sleeping(event, guest):
        cur = guest.current
        request = guest.memory.read(guest.registers.rdi, 16) if guest.registers.rdi else b""
        guest.alert("info", f"{cur.comm if cur else '?'} sleeps", rip=hex(guest.registers.rip),
                    first_bytes=request.hex())
''')


def test_recorded_live_session_replays_identically(lab_guest, tmp_path):
    """Alerts and events printed by the live watch and by its replay are the same lines."""
    rules = tmp_path / "sleepers.py"
    rules.write_text(RULES)
    record = tmp_path / "live.vmwr"
    pid = int(lab_guest.shell("sh -c 'while :; do sleep 0.2; done' >/dev/null 2>&1 & echo $!").split()[-1])
    try:
        live = run_cli("watch", lab_guest.target, "--rules", rules, "--json", "--duration", "6",
                       "--record", record)
    finally:
        lab_guest.shell(f"kill {pid}")
    assert live.status == 0, live.stderr
    alerts = [json.loads(line) for line in live.stdout.splitlines() if '"event": "alert"' in line]
    assert len(alerts) >= 3 and any(a["message"] == "sleep sleeps" for a in alerts)
    with Recording.open(record) as recording:
        assert len(recording.events) >= len(alerts)
    replay = run_cli("replay", record, "--rules", rules, "--json")
    assert replay.status == 0, replay.stderr
    live_alerts = [line for line in live.stdout.splitlines() if '"event": "alert"' in line]
    replay_alerts = [line for line in replay.stdout.splitlines() if '"event": "alert"' in line]
    assert replay_alerts == live_alerts
