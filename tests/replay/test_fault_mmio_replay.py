"""Fault and MmioAccess events through a recording: replayed byte for byte, stored in the timeline,
shown by ``vmwatch timeline`` (hex addresses, a guest's device name escaped on the terminal and
exact in --json) and counted by ``vmwatch trend``.

The source delivers the events itself (no breakpoints: the sensors that derive them from stops
on a live guest report themselves inactive); the live derivations are replayed in
tests/engine/test_guest_exceptions.py and test_guest_mmio.py.
"""

from __future__ import annotations

import json

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.sinks import SqliteSink
from vmwatch.events import Access, Fault, MmioAccess, Tick
from vmwatch.replay import open_replay, recording_source
from vmwatch.rules import RuleSet, rule, rules_of
from vmwatch.testing.cli import run_cli

from .synthetic import SyntheticLive, synthetic_source

DEVICE = "IOAPIC\x1b[2J 0"
"""A device name as a hostile guest's resource tree may spell it."""
T0 = 1_796_000_000 * 10**9
EVENTS = [
    Fault(seq=1, time_ns=T0 + 1, vector=14, name="page_fault", rip=0x4000AB, user=True, error_code=6,
          cr2=0x7F12_3456_7000),
    Fault(seq=2, time_ns=T0 + 2, vcpu=1, vector=6, name="invalid_opcode", rip=0x40009F, user=True),
    Tick(seq=3, time_ns=T0 + 3),
    Fault(seq=4, time_ns=T0 + 4, vector=13, name="general_protection", rip=0xFFFFFFFF81234567, user=False,
          error_code=0),
    MmioAccess(seq=5, time_ns=T0 + 5, access=Access.WRITE, paddr=0xFEE000B0, size=4, value=0,
               rip=0xFFFFFFFF81001234, watched=(0xFEE00000, 0x1000)),
    MmioAccess(seq=6, time_ns=T0 + 6, vcpu=1, access=Access.READ, paddr=0xFEC00000, watched=(DEVICE, 0)),
]


class Delivering(SyntheticLive):
    """The synthetic guest, delivering :data:`EVENTS` with no breakpoints or watchpoints."""

    def __init__(self, base: SyntheticLive) -> None:
        super().__init__(base.memory, base._buffer, len(EVENTS), 1)
        self.capabilities = frozenset({"registers", "pause"})

    def event(self, i: int):
        return EVENTS[i]


def _ruleset(seen: list) -> RuleSet:
    def keeper():
        def keep(event, guest):
            seen.append(event)
        return keep

    funcs = {"__name__": __name__,
             "faults": rule.on_exception("page_fault")(rule.on_exception(6)(rule.on_exception(13)(keeper()))),
             "apic": rule.on_mmio(0xFEE00000, 0x1000, "w")(keeper()),
             "ioapic": rule.on_mmio(DEVICE, access="r")(keeper())}
    return RuleSet(rules_of(funcs, "hw"))


@pytest.fixture
def recorded(tmp_path):
    """(recording, timeline db, events the rules saw, what the list sink stored) of one watch."""
    path, db = tmp_path / "hw.vmwr", tmp_path / "hw.db"
    seen: list = []
    sink = ListSink()

    async def session():
        with recording_source(Delivering(synthetic_source()), path) as source:
            return await Engine(source, _ruleset(seen), [sink, SqliteSink(db)]).run()

    summary = trio.run(session)
    assert not summary.rule_errors and len(summary.inactive) == 2, summary  # both sensors: no stops to derive from
    return path, db, seen, [r.as_dict() for r in sink.events if r.kind in ("Fault", "MmioAccess")]


def test_replayed_byte_for_byte(recorded):
    path, _, seen, stored = recorded
    assert seen == [e for e in EVENTS if not isinstance(e, Tick)]
    again: list = []
    sink = ListSink()

    async def replay():
        with open_replay(path) as source:
            summary = await Engine(source, _ruleset(again), [sink]).run()
            assert source.first_failure() is None
            return summary

    assert not trio.run(replay).rule_errors
    assert again == seen  # every field, the enum and the device name included
    assert [r.as_dict() for r in sink.events if r.kind in ("Fault", "MmioAccess")] == stored
    assert len(stored) == 5


def test_timeline_shows_them(recorded):
    _, db, _, _ = recorded
    table = run_cli("timeline", db, "--kind", "Fault", "--kind", "MmioAccess")
    assert table.status == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 5 and "\x1b" not in table.stdout
    assert "name=page_fault" in lines[0] and "cr2=0x7f1234567000" in lines[0] and "rip=0x4000ab" in lines[0]
    assert "name=invalid_opcode" in lines[1] and "error_code=null" in lines[1] and "user=true" in lines[1]
    assert "paddr=0xfee000b0" in lines[3] and "access=WRITE" in lines[3]
    assert 'IOAPIC\\\\u001b[2J 0' in lines[4]  # escaped for the terminal (the details' JSON)
    exact = [json.loads(line) for line in run_cli("timeline", db, "--kind", "MmioAccess", "--json").stdout.splitlines()]
    assert exact[1]["details"]["watched"] == [DEVICE, 0] and exact[0]["details"]["value"] == 0


def test_trend_counts_them(recorded, tmp_path):
    _, db, _, _ = recorded
    result = run_cli("trend", db, "--bucket", "1m", "-o", tmp_path / "trend.png")
    assert result.status == 0, result.stderr
    assert "Fault 3" in result.stdout and "MmioAccess 2" in result.stdout, result.stdout
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
