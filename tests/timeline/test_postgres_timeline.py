"""``vmwatch timeline``/``trend`` on the PostgreSQL fleet database give what they give on SQLite.

The same rows (several guests on several hosts, hostile strings included) are written through
the real SqliteSink and the real PostgresSink into a throwaway cluster (tests/conftest.py
``pg_cluster``); every query and chart is run on both and compared.
"""

from __future__ import annotations

import json
import random

import pytest
import trio

from vmwatch.engine.alerts import Alert
from vmwatch.engine.open_sink import open_timeline_sink
from vmwatch.engine.sinks import EventRecord
from vmwatch.rules import Severity
from vmwatch.testing.cli import run_cli
from vmwatch.timeline.query import TimelineQuery, breakdown, bucket_counts, query_timeline
from vmwatch.timeline.timespec import parse_time

T0 = parse_time("2026-11-25T23:50:00Z")  # the half hour crosses midnight: two day partitions
MINUTE = 60_000_000_000
GUESTS = [("web-1", "hv-a"), ("web-2", "hv-a"), ("db\x1b[2J", "hv-b"), ("web-1", "hv-b")]


def _records(seed: int = 11) -> list[Alert | EventRecord]:
    rng = random.Random(seed)
    items: list[Alert | EventRecord] = []
    seqs = {guest: 0 for guest in GUESTS}
    for minute in range(30):
        for _ in range(rng.randrange(2, 15)):
            vm, host = guest = rng.choice(GUESTS)
            seqs[guest] += 1
            time_ns = T0 + minute * MINUTE + rng.randrange(MINUTE)
            kind = rng.choice(["Exec", "ProcessStart", "ProcessExit", "ModuleLoad"])
            pid = rng.choice([1, 42, 100])
            details = {"filename": rng.choice(["/bin/ls", "/tmp/\u202eevil", "é\u0000x"]), "argv": ["a", 1]}
            items.append(EventRecord(vm=vm, host=host, time_ns=time_ns, seq=seqs[guest], kind=kind, vcpu=rng.randrange(2),
                                     pid=pid, comm=rng.choice(["sh", None, "bad\nname"]), details=details))
            if rng.random() < 0.2:
                items.append(Alert(rule="security.exec_tmp", severity=rng.choice(list(Severity)), vm=vm, host=host,
                                   message=f"exec from /tmp by {pid}", time_ns=time_ns, seq=seqs[guest], pid=pid,
                                   comm="sh", details={"z": 1, "a": [1, 2]}))
    return items


@pytest.fixture(scope="module")
def stores(pg_cluster, tmp_path_factory):
    """(sqlite path, postgresql url, the items written to both)."""
    items = _records()
    path = str(tmp_path_factory.mktemp("pgtl") / "timeline.db")
    url = pg_cluster.create_database("timeline_compare")

    async def fill():
        for db in (path, url):
            async with open_timeline_sink(db) as sink:
                for item in items:
                    await sink.send(item)
                await sink.aclose()
            assert getattr(sink, "stats", None) is None or sink.stats.committed == len(items)

    trio.run(fill)
    return path, url, items


QUERIES = [
    [],
    ["--json"],
    ["--csv"],
    ["--kind", "alert"],
    ["--kind", "Exec", "--kind", "ModuleLoad", "--json"],
    ["--pid", "42", "--csv"],
    ["--vm", "web-1", "--json"],
    ["--host", "hv-b"],
    ["--vm", "web-1", "--host", "hv-a", "--csv"],
    ["--since", "2026-11-25T23:55:00Z", "--until", "2026-11-26T00:05:00Z", "--json"],
    ["--limit", "7", "--json"],
    ["--by", "vm"],
    ["--by", "host"],
    ["--by", "vm", "--json"],
    ["--by", "host", "--csv", "--kind", "alert"],
    ["--by", "vm", "--since", "2026-11-26T00:00:00Z", "--host", "hv-a"],
]


class TestSameOutput:
    @pytest.mark.parametrize("options", QUERIES, ids=lambda o: " ".join(o) or "all")
    def test_timeline(self, stores, options):
        """Every timeline option prints the same bytes on PostgreSQL as on SQLite."""
        path, url, _ = stores
        on_sqlite, on_pg = run_cli("timeline", path, *options), run_cli("timeline", url, *options)
        assert on_sqlite.status == on_pg.status == 0, (on_sqlite.stderr, on_pg.stderr)
        assert on_sqlite.stdout, "every query here selects something"
        assert on_pg.stdout == on_sqlite.stdout

    def test_rows_are_what_was_written(self, stores):
        """The rows are exact: hostile strings, NUL escapes in details and key order included."""
        _, url, items = stores
        rows = query_timeline(url)
        assert len(rows) == len(items)
        events = sorted((r.vm, r.host, r.seq, r.kind, r.vcpu, r.pid, r.comm, json.dumps(r.details))
                        for r in rows if r.source == "event")
        assert events == sorted((i.vm, i.host, i.seq, i.kind, i.vcpu, i.pid, i.comm, json.dumps(i.details))
                                for i in items if isinstance(i, EventRecord))
        alerts = sorted((r.vm, r.host, r.rule, r.severity, r.message, json.dumps(r.details))
                        for r in rows if r.source == "alert")
        assert alerts == sorted((i.vm, i.host, i.rule, i.severity.name.lower(), i.message, json.dumps(i.details))
                                for i in items if isinstance(i, Alert))

    def test_breakdown_counts(self, stores):
        """--by vm counts agree with counting the written items in Python (per host and guest)."""
        _, url, items = stores
        want: dict = {}
        for item in items:
            events, alerts = want.setdefault((item.host, item.vm), [0, 0])
            want[(item.host, item.vm)] = [events + isinstance(item, EventRecord), alerts + isinstance(item, Alert)]
        got = {(g.host, g.vm): [g.events, sum(g.alerts.values())] for g in breakdown(url, "vm")}
        assert got == want
        assert {g.host for g in breakdown(url, "host")} == {"hv-a", "hv-b"}

    @pytest.mark.parametrize("by", [None, "vm", "host"])
    def test_bucket_counts(self, stores, by):
        """Trend counts (per kind, per guest, per host) are the same on both stores."""
        path, url, _ = stores
        query = TimelineQuery(since_ns=T0 + 3 * MINUTE)
        assert bucket_counts(url, MINUTE, query, by=by) == bucket_counts(path, MINUTE, query, by=by)

    @pytest.mark.parametrize("options", [[], ["--by", "vm"], ["--by", "host", "--kind", "alert"]])
    def test_trend(self, stores, tmp_path, options):
        """trend writes the same chart (same title given) and the same totals line from both."""
        path, url, _ = stores
        out = {}
        for name, db in (("sqlite", path), ("pg", url)):
            png = tmp_path / f"{name}.png"
            result = run_cli("trend", db, "-o", png, "--bucket", "5m", "--title", "fleet", *options)
            assert result.status == 0, result.stderr
            out[name] = (result.stdout.replace(str(png), "PNG"), png.read_bytes())
        assert out["pg"][0] == out["sqlite"][0]
        assert out["pg"][1] == out["sqlite"][1]

    def test_partitioned_by_day(self, stores):
        """The rows went into per-day partitions, created on demand (the half hour spans midnight)."""
        import psycopg

        _, url, _ = stores
        with psycopg.connect(url) as conn:
            parts = conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits"
                                 " WHERE inhparent = 'events'::regclass ORDER BY 1").fetchall()
            assert parts == [("events_20261125",), ("events_20261126",)]
            assert conn.execute("SELECT max(version) FROM vmwatch_schema").fetchone() == (1,)


class TestRefused:
    def test_newer_schema(self, pg_url, tmp_path):
        """A database a newer vmwatch migrated is refused by watch and timeline, one line, exit 2."""
        import psycopg

        async def create():
            async with open_timeline_sink(pg_url) as sink:
                await sink.aclose()

        trio.run(create)
        with psycopg.connect(pg_url) as conn:
            conn.execute("INSERT INTO vmwatch_schema VALUES (7, 0, 'future')")
        image = tmp_path / "mem.raw"
        image.write_bytes(bytes(0x10000))
        for args in (["timeline", pg_url], ["trend", pg_url, "-o", tmp_path / "t.png"],
                     ["watch", image, "--rules", "timeline", "--db", pg_url]):
            result = run_cli(*args)
            assert result.status == 2, (args, result)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "schema version 7" in result.stderr and "upgrade vmwatch" in result.stderr

    def test_not_a_timeline(self, pg_url):
        """An empty database (no vmwatch schema) is not a timeline: one line, exit 2."""
        result = run_cli("timeline", pg_url)
        assert result.status == 2 and "not a vmwatch timeline" in result.stderr

    def test_env_default(self, stores, monkeypatch):
        """$VMWATCH_DB names the timeline when no DB is given."""
        path, url, _ = stores
        monkeypatch.setenv("VMWATCH_DB", url)
        assert run_cli("timeline", "--by", "host").stdout == run_cli("timeline", path, "--by", "host").stdout
