"""Periodic rules (``@rule.every``) recorded where the engine's timer fired, replayed there exactly."""

from __future__ import annotations

import io
import json
import textwrap

import trio
import trio.testing

from vmwatch.engine.pump import watch
from vmwatch.engine.sinks import JsonLinesSink
from vmwatch.events import Tick
from vmwatch.replay import Recording, recording_source
from vmwatch.rules import RuleSet

from .synthetic import replay_json, synthetic_source

RULES = textwrap.dedent('''
    import hashlib
    from vmwatch.rules import rule

    @rule.every(0.7)
    def hash_check(event, guest):
        # the pages change between events: the digest tells which moment the rule saw
        digest = hashlib.sha256(guest.phys.read(0x0, 0x8000)).hexdigest()
        if guest.state.get("last") not in (None, digest):
            guest.alert("warning", "low memory changed", pid=1, digest=digest, seq=event.seq,
                        cpus=len(guest.cpus), rip=hex(guest.cpus[0].rip))
        guest.state["last"] = digest

    @rule.every(2.0)
    def census(event, guest):
        guest.alert("info", "census", pid=2, word=guest.phys.read(0x5FF8, 16).hex(), at=event.time_ns)

    @rule.on_breakpoint(0xFFFFFFFF81000003)
    @rule.on_breakpoint(0xFFFFFFFF81000009)
    def bp(event, guest):
        guest.alert("info", f"breakpoint {event.address:#x}", pid=3, data=guest.phys.read(0x9000, 8).hex())
''')


class PacedSource:
    """The synthetic guest, its events spaced in (trio) time so the engine's timer fires between them."""

    def __init__(self, inner, gaps):
        self._inner = inner
        self._gaps = iter(gaps)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def events(self):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        await trio.sleep(next(self._gaps, 0.25))
        return await self._inner.__anext__()


def _record(tmp_path):
    rules = tmp_path / "pack.py"
    rules.write_text(RULES)
    path = tmp_path / "session.vmwr"
    out = io.StringIO()
    gaps = [0.25, 1.9, 0.1, 0.05, 3.3, 0.4, 0.9, 0.3, 1.2, 0.6] * 2

    async def session():
        inner = synthetic_source(count=20, seed=7)
        with recording_source(PacedSource(inner, gaps), path) as source:
            return await watch(source, RuleSet.load([rules]), [JsonLinesSink(out)])

    summary = trio.run(session, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not summary.rule_errors, summary.rule_errors
    return path, rules, out.getvalue().splitlines()


def test_periodic_rules_replay_identical_lines(tmp_path):
    """Alerts of periodic rules reading memory that changes: the replay prints the live lines, in order."""
    path, rules, live = _record(tmp_path)
    messages = [json.loads(line)["message"] for line in live]
    assert messages.count("low memory changed") >= 3 and messages.count("census") >= 3
    assert any(m.startswith("breakpoint") for m in messages)
    # the replay runs at once (real clock): the ticks come from the recording, not a timer
    assert replay_json(path, rules)[0] == live


def test_ticks_recorded_between_events(tmp_path):
    """Each engine tick is an event of the recording naming the listeners that ran, placed by time."""
    path, _, live = _record(tmp_path)
    with Recording.open(path) as recording:
        ticks = [e for e in recording.events if type(e) is Tick and e.periodic is not None]
        others = [e for e in recording.events if not (type(e) is Tick and e.periodic is not None)]
        own_ticks = sum(1 for e in others if type(e) is Tick)  # the source's ticks: every periodic rule
    assert [e.seq for e in others] == list(range(20))
    assert {name for tick in ticks for name, _ in tick.periodic} == {"pack.hash_check", "pack.census"}
    assert {period for tick in ticks for _, period in tick.periodic} == {0.7, 2.0}
    census = sum(1 for line in live if json.loads(line)["message"] == "census")
    timed = sum(1 for tick in ticks if ("pack.census", 2.0) in tick.periodic)
    assert timed >= 5 and census == timed + own_ticks
    # a tick's seq is the last event handled before it: ticks sit between the events by time
    order = [e.seq for e in recording.events if type(e) is Tick and e.periodic is not None]
    assert order == sorted(order) and len(set(order)) > 3


def test_replay_runs_only_the_recorded_rules(tmp_path):
    """A pack lacking one periodic rule: the other still runs at the recorded ticks, no timer ticks."""
    path, rules, live = _record(tmp_path)
    (tmp_path / "fewer").mkdir()
    only_census = tmp_path / "fewer" / "pack.py"  # same pack name: rules are matched by name
    only_census.write_text(RULES.split("@rule.every(2.0)")[0].split("@rule.every(0.7)")[0]
                           + "@rule.every(2.0)" + RULES.split("@rule.every(2.0)")[1].split("@rule.on_breakpoint")[0])
    lines = replay_json(path, only_census)[0]
    assert lines and [line for line in live if '"census"' in line] == lines
