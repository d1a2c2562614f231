"""Event storms demote traps live (overhead governance); the replay makes the very same decisions."""

from __future__ import annotations

import io
import json
import struct
import textwrap

import pytest
import trio
import trio.testing

from vmwatch.engine.governance import Budget
from vmwatch.engine.pump import WatchOptions, watch
from vmwatch.engine.sinks import JsonLinesSink
from vmwatch.errors import RecordingError
from vmwatch.events import Breakpoint
from vmwatch.replay import Recording, recording_source
from vmwatch.replay.format import GOVERN, RecordType, RecordWriter, iter_records
from vmwatch.rules import RuleSet
from vmwatch.testing.cli import run_cli

from .synthetic import replay_json, synthetic_source
from .test_format import _rewrite_header

HOT, COLD = 0xFFFFFFFF81000100, 0xFFFFFFFF81000200

RULES = textwrap.dedent(f'''
    from vmwatch.events import Demotion
    from vmwatch.rules import rule

    @rule.on_breakpoint({HOT:#x})
    def hot(event, guest):
        data = guest.phys.read(0x1000 + (event.seq % 16) * 0x100, 16) if guest.phys is not None else b""
        if event.seq % 7 == 0:
            guest.alert("info", "hot", pid=1, seq=event.seq, data=data.hex())

    @rule.on_breakpoint({COLD:#x})
    def cold(event, guest):
        guest.alert("warning", "cold", pid=2, seq=event.seq)

    @rule.on(Demotion)
    def demoted(event, guest):
        guest.alert("warning", "demoted", pid=3, trap=event.trap, action=event.action, hits=event.hits)
''')


class StormLive:
    """A breakpoint hit 1000 times a second (and a calm one), memory changing under every event.

    With ``trap_control`` a pausable guest delivering hits only while armed, as a hypervisor does;
    without, a stream of trap events nobody can stop (the governor can only sample).
    """

    def __init__(self, count: int, *, trap_control: bool = True) -> None:
        inner = synthetic_source(count=0)
        self.name = "storm"
        self.memory = inner.memory
        self._buffer = inner._buffer
        self.capabilities = frozenset({"pause", "breakpoints"} if trap_control else ())
        self.replays_traps = not trap_control
        self.realtime = False
        self.armed: set[int] = set() if trap_control else {HOT, COLD}
        self.suppressed = 0
        self._count = count

    async def events(self):
        for i in range(self._count):
            await trio.sleep(0.001)
            address = COLD if i % 50 == 0 else HOT
            if address not in self.armed:
                self.suppressed += 1
                continue
            self._buffer[0x1000 + (i % 16) * 0x100] = i & 0xFF
            yield Breakpoint(seq=i, time_ns=1_000_000 * i, address=address)

    async def add_breakpoint(self, vaddr: int, *, entry: bool = False) -> None:
        self.armed.add(vaddr)

    async def remove_breakpoint(self, vaddr: int) -> None:
        self.armed.discard(vaddr)

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass


def _live(tmp_path, source, budget: Budget, **run_options):
    rules = tmp_path / "storm.py"
    rules.write_text(RULES)
    path = tmp_path / "storm.vmwr"
    out = io.StringIO()

    async def session():
        with recording_source(source, path) as recorded:
            return await watch(recorded, RuleSet.load([rules]), [JsonLinesSink(out)],
                               options=WatchOptions(budget=budget))

    summary = trio.run(session, **run_options)
    assert not summary.rule_errors, summary.rule_errors
    return path, rules, out.getvalue().splitlines(), summary


def _messages(lines):
    """Alert messages, and the kind of event records (``Demotion``)."""
    items = [json.loads(line) for line in lines]
    return [item["message"] if item["event"] == "alert" else item["event"] for item in items]


@pytest.fixture(scope="module")
def unhooked(tmp_path_factory):
    """A storm recorded while the governor unhooks the hot breakpoint (and re-arms it)."""
    source = StormLive(6000)
    live = _live(tmp_path_factory.mktemp("unhook"), source, Budget(max_hits=200, cooldown=0.5),
                 clock=trio.testing.MockClock(autojump_threshold=0))
    return (*live, source)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A storm recorded from a source without trap control: the governor samples the hot trap."""
    return _live(tmp_path_factory.mktemp("sample"), StormLive(4000, trap_control=False),
                 Budget(max_hits=150, window=3600), clock=trio.testing.MockClock(autojump_threshold=0))


class TestStormReplay:
    def test_unhook_replays_identical(self, unhooked):
        """The live run unhooked the hot trap (events never delivered meanwhile): the replay reports
        the same demotions at the same events and prints the same lines."""
        path, rules, live, summary, source = unhooked
        assert source.suppressed > 1000  # the hot trap really was removed for a while
        assert len(summary.demotions) >= 2 and summary.demotions[0].action == "unhooked for 0.5s"
        assert _messages(live).count("demoted") == len(summary.demotions)
        assert _messages(live).count("Demotion") == len(summary.demotions)
        lines, replayed = replay_json(path, rules)
        assert lines == live
        assert replayed.demotions == summary.demotions and replayed.events == summary.events

    def test_sampling_replays_identical(self, sampled):
        """The live run dispatched one hot hit in N: the replay skips exactly the hits it skipped."""
        path, rules, live, summary = sampled
        assert summary.demotions and summary.demotions[0].action.startswith("sampled 1/")
        assert summary.sampled_out > 1000
        hot = [json.loads(line)["details"]["seq"] for line in live if '"message": "hot"' in line]
        assert len(hot) < 4000 // 7 // 2  # most hot alerts were sampled out with their hits
        assert _messages(live).count("cold") == 80  # the calm trap was never demoted
        lines, replayed = replay_json(path, rules)
        assert lines == live
        assert replayed.sampled_out == summary.sampled_out and replayed.demotions == summary.demotions

    def test_cli_replay_identical(self, sampled):
        """`vmwatch replay --json` prints the live lines."""
        path, rules, live, _ = sampled
        result = run_cli("replay", path, "--rules", rules, "--json")
        assert result.status == 0, result.stderr
        assert result.stdout.splitlines() == live

    def test_verdicts_are_recorded(self, sampled):
        """Each sampled-out hit and each demotion is a GOVERN record of its event."""
        path, _, _, summary = sampled
        with Recording.open(path) as recording:
            verdicts = recording.verdicts
            skips = [ctx for ctx, v in verdicts.items() if v[0] == "skip"]
            demotions = [v for v in verdicts.values() if v[0] == "sample"]
            assert len(skips) == summary.sampled_out and len(demotions) == len(summary.demotions)
            assert all(recording.events[ctx].address == HOT for ctx in verdicts)
        facts = json.loads(run_cli("replay", path, "--info", "--json").stdout)
        assert facts["governor_verdicts"] == {"skip": summary.sampled_out, "sample": len(summary.demotions)}


def _rewrite(path, change) -> bytes:
    """The recording's records passed through ``change(kind, payload) -> [(kind, payload), ...]``."""
    out = io.BytesIO()
    writer = RecordWriter(out)
    for record in iter_records(path.read_bytes()):
        for kind, payload in change(record.kind, bytes(record.payload)):
            writer.write(kind, payload)
    return out.getvalue()


class TestOlderAndHostile:
    def test_version_1_1_replays_every_hit(self, sampled, tmp_path):
        """A 1.1 recording (no verdicts) still reads: its replay dispatches every hit, as 1.1 did."""
        path, rules, live, _ = sampled
        old = tmp_path / "old.vmwr"
        old.write_bytes(_rewrite_header(_rewrite(path, lambda k, p: [] if k == RecordType.GOVERN else [(k, p)]), 1, 1))
        lines, replayed = replay_json(old, rules)
        assert replayed.sampled_out == 0 and not replayed.demotions
        assert _messages(lines).count("hot") == len(range(0, 4000, 7)) - len(range(0, 4000, 350))

    @pytest.mark.parametrize(("damage", "message"), [
        (lambda p: p + b"\0", "wrong size"),
        (lambda p: struct.pack("<q", -1) + p[8:], "out of place"),
        (lambda p: struct.pack("<q", 0) + p[8:], "out of place"),
        (lambda p: p[:8] + b"\x07" + p[9:], "bad governor verdict 7"),
        (lambda p: p[:8] + b"\x02" + p[9:17] + struct.pack("<d", float("nan")) + p[25:], "bad governor verdict"),
        (lambda p: p[:8] + b"\x01" + p[9:25] + bytes(8), "bad governor verdict 1"),
    ])
    def test_hostile_verdicts(self, sampled, tmp_path, damage, message):
        """Malformed GOVERN records (CRC correct) are RecordingErrors naming the record."""
        path = sampled[0]
        first = []

        def change(kind, payload):
            if kind == RecordType.GOVERN and not first:
                first.append(payload)
                return [(kind, damage(payload))]
            return [(kind, payload)]

        bad = tmp_path / "bad.vmwr"
        bad.write_bytes(_rewrite(path, change))
        assert len(first[0]) == GOVERN.size
        with pytest.raises(RecordingError, match=message):
            Recording.open(bad)

    def test_two_verdicts_for_one_event(self, sampled, tmp_path):
        path = sampled[0]

        def change(kind, payload):
            return [(kind, payload)] * (2 if kind == RecordType.GOVERN else 1)

        bad = tmp_path / "twice.vmwr"
        bad.write_bytes(_rewrite(path, change))
        with pytest.raises(RecordingError, match="two governor verdicts for event"):
            Recording.open(bad)
