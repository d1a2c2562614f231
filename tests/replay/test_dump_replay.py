"""A real watch over a dump of the lab guest, recorded and replayed: the Linux layer's reads
(KASLR, kallsyms, BTF, task list) all come from the recording."""

from __future__ import annotations

import json
import textwrap

import pytest

from vmwatch.replay import Recording
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

RULES = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_start
    def tasks(event, guest):
        for t in guest.linux.tasks():
            guest.alert("info", f"task {t.comm}", pid=t.pid, comm=t.comm, ppid=t.ppid)
''')

OTHER = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_start
    def modules(event, guest):
        for m in guest.linux.modules():
            guest.alert("info", f"module {m.name}", base=hex(m.base))
''')


@pytest.fixture(scope="module")
def recorded(lab_guest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dumprec")
    ps = lab_guest.shell("ps -o pid,comm")  # busybox ps: truth from inside the guest
    dump = lab_guest.dump(tmp / "lab.elf")
    rules = tmp / "tasks.py"
    rules.write_text(RULES)
    record = tmp / "watch.vmwr"
    live = run_cli("watch", dump, "--rules", rules, "--json", "--record", record)
    assert live.status == 0, live.stderr
    dump.unlink()  # replay must not need the dump
    return record, rules, live.stdout, ps


def test_replay_without_the_dump_is_identical(recorded):
    """Replaying with the same rules prints the same JSON lines, with the dump deleted."""
    record, rules, live_out, ps = recorded
    alerts = [json.loads(line) for line in live_out.splitlines() if '"event": "alert"' in line]
    comms = {a["comm"] for a in alerts}
    assert "init" in comms and "sh" in comms  # the guest's own processes (truth: its ps below)
    assert all(c in ps for c in ("init", "sh"))
    replay = run_cli("replay", record, "--rules", rules, "--json")
    assert replay.status == 0, replay.stderr
    assert replay.stdout == live_out
    with Recording.open(record) as recording:
        assert recording.page_count < recording.end["page_reads"]


def test_other_rules_name_the_missing_address(recorded, tmp_path):
    """Rules that walk the module list read pages the task rules never did: a clear error."""
    record, _, _, _ = recorded
    other = tmp_path / "modules.py"
    other.write_text(OTHER)
    replay = run_cli("replay", record, "--rules", other, "--json")
    last = replay.stderr.strip().splitlines()[-1]
    assert replay.status == 2 and "is not in the recording" in last and "physical address 0x" in last
