"""Timeline queries and trend charts over a database written by the engine's SQLite sink."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest
import trio

from vmwatch.engine.alerts import Alert
from vmwatch.engine.sinks import EventRecord, SqliteSink
from vmwatch.errors import TimelineError
from vmwatch.events import Exec, ModuleLoad, ProcessExit, ProcessStart
from vmwatch.rules import Severity
from vmwatch.testing.cli import run_cli
from vmwatch.timeline.query import TimelineQuery, bucket_counts, query_timeline
from vmwatch.timeline.timespec import format_time, parse_duration, parse_time

T0 = parse_time("2026-11-25T20:00:00Z")
MINUTE = 60_000_000_000


def _write_db(path, *, seed=7, minutes=30):
    """A synthetic half-hour session through the real SqliteSink: returns what was written."""
    rng = random.Random(seed)
    written = {"events": [], "alerts": []}

    async def fill():
        sink = SqliteSink(path, batch=50)
        seq = 0
        for minute in range(minutes):
            for _ in range(rng.randrange(1, 12) + (25 if minute in (10, 11) else 0)):
                time_ns = T0 + minute * MINUTE + rng.randrange(MINUTE)
                pid = rng.choice([1, 42, 100, 101])
                event = rng.choice([
                    ProcessStart(seq=seq, time_ns=time_ns, pid=pid, ppid=1, comm="sh"),
                    Exec(seq=seq, time_ns=time_ns, pid=pid, filename="/bin/ls", comm="ls"),
                    ProcessExit(seq=seq, time_ns=time_ns, pid=pid, comm="ls", exit_code=0),
                ])
                record = EventRecord.from_event(event, "qemu:/lab")
                written["events"].append(record)
                await sink.send(record)
                if minute in (10, 11) and rng.random() < 0.3:
                    alert = Alert(rule="security.exec_tmp", severity=rng.choice([Severity.WARNING, Severity.ERROR]),
                                  message="exec from /tmp", vm="qemu:/lab", time_ns=time_ns, seq=seq, pid=pid,
                                  comm="ls", details={"filename": "/tmp/x"})
                    written["alerts"].append(alert)
                    await sink.send(alert)
                seq += 1
        record = EventRecord.from_event(ModuleLoad(seq=seq, time_ns=T0 + 5 * MINUTE, name="evil", base=0xFFFF),
                                        "qemu:/other")
        written["events"].append(record)
        await sink.send(record)
        await sink.aclose()

    trio.run(fill)
    return written


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("tl") / "timeline.db"
    return path, _write_db(path)


class TestTimeSpec:
    @pytest.mark.parametrize(("text", "ns"), [("1m", MINUTE), ("90s", 90_000_000_000), ("1h30m", 90 * MINUTE),
                                              ("250ms", 250_000_000)])
    def test_durations(self, text, ns):
        """Durations in the usual units, combined."""
        assert parse_duration(text) == ns

    @pytest.mark.parametrize("text", ["", "0s", "1x", "m", "1m 2", "-1m", "1e9s"])
    def test_bad_durations(self, text):
        """Malformed durations are TimelineErrors with an example."""
        with pytest.raises(TimelineError, match="examples"):
            parse_duration(text)

    def test_times(self):
        """ISO with and without zone (UTC), relative, and raw nanoseconds."""
        assert parse_time("2026-11-25T20:00:00") == T0
        assert parse_time("2026-11-25T21:00:00+01:00") == T0
        assert parse_time("15m", now_ns=T0) == T0 - 15 * MINUTE
        assert parse_time(str(T0)) == T0
        assert format_time(T0 + 1_500_000) == "2026-11-25T20:00:00.001Z"
        with pytest.raises(TimelineError):
            parse_time("yesterday")


class TestQuery:
    def test_everything_in_time_order(self, db):
        """Every row written comes back once, ordered by time then seq."""
        path, written = db
        rows = query_timeline(path)
        assert len(rows) == len(written["events"]) + len(written["alerts"])
        assert [(r.time_ns, r.seq) for r in rows] == sorted((r.time_ns, r.seq) for r in rows)

    def test_filters(self, db):
        """--since/--until, --kind and --pid select exactly the matching rows."""
        path, written = db
        since, until = T0 + 10 * MINUTE, T0 + 12 * MINUTE
        rows = query_timeline(path, TimelineQuery(since_ns=since, until_ns=until, kinds=("exec", "alert"),
                                                  pids=(42,)))
        want_events = [e for e in written["events"] if since <= e.time_ns < until and e.kind == "Exec" and e.pid == 42]
        want_alerts = [a for a in written["alerts"] if since <= a.time_ns < until and a.pid == 42]
        assert sorted(r.seq for r in rows if r.source == "event") == sorted(e.seq for e in want_events)
        assert sorted(r.seq for r in rows if r.source == "alert") == sorted(a.seq for a in want_alerts)
        assert want_alerts, "the synthetic data must contain such alerts"

    def test_bucket_counts_match(self, db):
        """Per-minute counts from SQLite agree with counting the written rows in Python."""
        path, written = db
        counts = bucket_counts(path, MINUTE)
        expected: dict = {}
        for e in written["events"]:
            key = ((e.time_ns // MINUTE) * MINUTE, "event", e.kind)
            expected[key] = expected.get(key, 0) + 1
        for a in written["alerts"]:
            key = ((a.time_ns // MINUTE) * MINUTE, "alert", a.severity.name.lower())
            expected[key] = expected.get(key, 0) + 1
        assert {(c.bucket_ns, c.source, c.kind): c.count for c in counts} == expected


class TestTimelineCli:
    def test_json_lines(self, db):
        """--json gives one parseable object per row with the filters applied."""
        path, written = db
        result = run_cli("timeline", path, "--kind", "alert", "--json")
        assert result.status == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == len(written["alerts"])
        assert {line["rule"] for line in lines} == {"security.exec_tmp"}
        assert lines[0]["time"].startswith("2026-11-25T20:1")

    def test_csv(self, db):
        """--csv has a header and one row per match; details stay JSON."""
        path, written = db
        result = run_cli("timeline", path, "--csv", "--vm", "qemu:/other")
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert len(rows) == 1 and rows[0]["kind"] == "ModuleLoad"
        assert json.loads(rows[0]["details"])["name"] == "evil"

    def test_table(self, db):
        """The default table shows time, kind, pid/comm and a summary per row."""
        path, _ = db
        result = run_cli("timeline", path, "--pid", "42", "--since", "2026-11-25T20:10:00Z", "--until",
                         "2026-11-25T20:11:00Z")
        assert result.status == 0
        lines = result.stdout.splitlines()
        assert lines and all(" 42/" in line for line in lines)
        assert any("[warning] security.exec_tmp: exec from /tmp" in line or "[error]" in line for line in lines)

    @pytest.mark.parametrize(("make", "message"), [
        (lambda p: p.write_bytes(b"not sqlite at all" * 100), "not a timeline database"),
        (lambda p: p.write_bytes(b""), "not a vmwatch timeline"),
        (lambda p: None, "No such file"),
    ])
    def test_bad_databases(self, tmp_path, make, message):
        """Garbage, empty or missing files: exit 2 with one line."""
        path = tmp_path / "bad.db"
        make(path)
        result = run_cli("timeline", path)
        assert result.status == 2
        assert message in result.stderr and result.stderr.count("\n") == 1

    def test_bad_time(self, db):
        """A malformed --since is one error line."""
        result = run_cli("timeline", db[0], "--since", "last tuesday")
        assert result.status == 2 and "bad time" in result.stderr


class TestTrend:
    def test_png(self, db, tmp_path):
        """The chart is a PNG of the requested size with real content in both panels."""
        from PIL import Image

        out = tmp_path / "trend.png"
        result = run_cli("trend", db[0], "--bucket", "1m", "-o", out, "--size", "1000x600")
        assert result.status == 0, result.stderr
        assert "Exec" in result.stdout
        with Image.open(out) as image:
            assert image.format == "PNG" and image.size == (1000, 600)
            pixels = image.convert("RGB")
            colours = pixels.getcolors(maxcolors=1 << 16)
            assert colours is not None and len(colours) > 20  # bars, text, legend: not a blank canvas
            top = pixels.crop((0, 0, 1000, 300)).getcolors(1 << 16)
            bottom = pixels.crop((0, 330, 1000, 600)).getcolors(1 << 16)
            # alert bars use the severity colours: warning orange and error red appear below
            assert any(abs(c[0] - 0xF5) < 8 and abs(c[1] - 0x85) < 8 and abs(c[2] - 0x18) < 8 for _, c in bottom)
            assert len(top) > 10

    def test_empty_range(self, db, tmp_path):
        """Nothing in range: exit 2, no file."""
        out = tmp_path / "none.png"
        result = run_cli("trend", db[0], "-o", out, "--since", "2030-01-01")
        assert result.status == 2 and "nothing to draw" in result.stderr
        assert not out.exists()

    def test_too_many_buckets(self, db, tmp_path):
        """A 1 ms bucket over half an hour is refused rather than drawn for minutes."""
        result = run_cli("trend", db[0], "-o", tmp_path / "x.png", "--bucket", "1ms")
        assert result.status == 2 and "too many" in result.stderr
