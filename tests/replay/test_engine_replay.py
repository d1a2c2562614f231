"""A session watched by the real engine, recorded, then replayed by `vmwatch replay`: same alerts."""

from __future__ import annotations

import io
import json
import textwrap

import pytest
import trio

from vmwatch.engine.pump import watch
from vmwatch.engine.sinks import JsonLinesSink
from vmwatch.replay import Recording, recording_source
from vmwatch.rules import RuleSet
from vmwatch.testing.cli import run_cli

from .synthetic import synthetic_source

RULES = textwrap.dedent('''
    import hashlib
    from vmwatch.events import Tick
    from vmwatch.rules import rule

    @rule.on_breakpoint(0xFFFFFFFF81000003)
    @rule.on_breakpoint(0xFFFFFFFF81000006)
    @rule.on_breakpoint(0xFFFFFFFF81000015)
    def bp(event, guest):
        data = guest.phys.read(0x1000 + event.seq * 0x100, 64)
        guest.alert("warning", f"breakpoint {event.address:#x}", pid=1, digest=hashlib.sha256(data).hexdigest(),
                    rip=hex(guest.registers.rip))

    @rule.on_write(0x1004)
    @rule.on_write(0x1010)
    def wrote(event, guest):
        page = guest.phys.read(0x8000 + 0x1000 * (event.seq % 4), 4096)
        guest.alert("error", "watched write", pid=2, value=event.value.hex(), ones=sum(page) % 251)

    @rule.on(Tick)
    def tick(event, guest):
        if event.seq % 4 == 2:
            guest.alert("info", "tick", pid=3, word=guest.phys.read(0x5FF8, 16).hex())
''')

CACHED_RULES = textwrap.dedent('''
    import hashlib
    from vmwatch.rules import rule

    @rule.on_breakpoint(0xFFFFFFFF81000003)
    @rule.on_breakpoint(0xFFFFFFFF81000006)
    @rule.on_breakpoint(0xFFFFFFFF81000009)
    @rule.on_breakpoint(0xFFFFFFFF8100000C)
    def cached(event, guest):
        # through GuestMemory's page cache: fresh only if the cache is flushed when the guest ran
        low = guest.memory.read_phys(0, 0x20000)
        guest.alert("info", "low memory", pid=1, digest=hashlib.sha256(low).hexdigest())
''')

OTHER_RULES = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_breakpoint(0xFFFFFFFF81000003)
    def elsewhere(event, guest):
        guest.alert("info", "reads a page nobody recorded", pid=1, data=guest.phys.read(0x80000, 8).hex())
''')


def _watch(tmp_path, rules_text, **source_options):
    rules = tmp_path / "pack.py"
    rules.write_text(rules_text)
    path = tmp_path / "session.vmwr"
    out = io.StringIO()

    async def session():
        with recording_source(synthetic_source(count=30, **source_options), path) as source:
            return await watch(source, RuleSet.load([rules]), [JsonLinesSink(out)])

    summary = trio.run(session)
    return path, rules, out.getvalue().splitlines(), summary


@pytest.fixture
def live_session(tmp_path):
    """Watch the synthetic source with the engine, recording; return (recording, rules, alert lines)."""
    rules = tmp_path / "pack.py"
    rules.write_text(RULES)
    path = tmp_path / "session.vmwr"
    out = io.StringIO()

    async def session():
        with recording_source(synthetic_source(count=30), path) as source:
            return await watch(source, RuleSet.load([rules]), [JsonLinesSink(out)])

    summary = trio.run(session)
    assert summary.total_alerts >= 6 and not summary.rule_errors
    return path, rules, out.getvalue().splitlines()


class TestEngineReplay:
    def test_same_rules_same_alert_lines(self, live_session):
        """The alert JSON lines of the replay equal the live run's, byte for byte."""
        path, rules, live_lines = live_session
        result = run_cli("replay", path, "--rules", rules, "--json")
        assert result.status == 0, result.stderr
        assert result.stdout.splitlines() == live_lines
        kinds = {json.loads(line)["message"] for line in live_lines}
        assert {"watched write", "tick"} <= kinds and any(k.startswith("breakpoint") for k in kinds)
        assert "replayed 30 events" in result.stderr

    def test_recording_holds_the_events(self, live_session):
        """Every event the engine consumed is in the recording, in order."""
        path, _, _ = live_session
        with Recording.open(path) as recording:
            assert [e.seq for e in recording.events] == list(range(30))
            assert recording.meta["capabilities"] == ["breakpoints", "pause", "registers", "watchpoints"]

    def test_other_rules_reading_outside(self, live_session, tmp_path):
        """A rule reading a page the recording lacks: exit 2, one line naming the address."""
        path, _, _ = live_session
        other = tmp_path / "other.py"
        other.write_text(OTHER_RULES)
        result = run_cli("replay", path, "--rules", other, "--json")
        assert result.status == 2
        last = result.stderr.splitlines()[-1]
        assert last == "vmwatch: error: physical address 0x80000 is not in the recording (at event 3)"
        assert "Traceback" not in result.stderr

    def test_cache_flushes_replayed(self, tmp_path):
        """A source that reports when the guest ran: the engine's cache flushes happen in replay too."""
        path, rules, live_lines, _ = _watch(tmp_path, CACHED_RULES, on_resume=True)
        digests = {json.loads(line)["details"]["digest"] for line in live_lines if "low memory" in line}
        assert len(digests) == 4  # the guest changed low memory between the events: fresh reads live
        result = run_cli("replay", path, "--rules", rules, "--json")
        assert result.status == 0, result.stderr
        assert result.stdout.splitlines() == live_lines

    def test_info(self, live_session):
        """--info describes the recording without rules: source, events by kind, pages."""
        path, _, _ = live_session
        result = run_cli("replay", path, "--info", "--json")
        assert result.status == 0, result.stderr
        facts = json.loads(result.stdout)
        assert facts["source"] == "synthetic" and facts["events"] == 30
        assert facts["events_by_kind"] == {"Breakpoint": 10, "MemoryAccess": 10, "Tick": 10}
        assert 0 < facts["pages_stored"] < facts["page_reads"]

    def test_truncated_file_exit_2(self, tmp_path):
        """A truncated recording: one line, exit 2."""
        path = tmp_path / "cut.vmwr"
        path.write_bytes(b"VMWREC\r\n\x01\x00")
        result = run_cli("replay", path, "--rules", tmp_path)
        assert result.status == 2 and "too short" in result.stderr and result.stderr.count("\n") == 1
