"""Sinks (SQLite timeline, JSON lines) and ``vmwatch watch`` on an image, end to end."""

from __future__ import annotations

import io
import json
import sqlite3
import textwrap

from vmwatch.engine import Alert, EventRecord, JsonLinesSink, SqliteSink
from vmwatch.events import Access, Exec, MemoryAccess
from vmwatch.rules import Severity
from vmwatch.testing.cli import run_cli
from vmwatch.testing.fakeguest import FakeGuest


class TestSqliteSink:
    async def test_schema_and_rows(self, tmp_path):
        """The timeline has the agreed tables and columns, in WAL mode, with JSON details."""
        path = tmp_path / "t.db"
        sink = SqliteSink(path)
        await sink.send(EventRecord.from_event(Exec(seq=3, time_ns=10, pid=7, filename="/bin/ls", comm="ls"), "vm1"))
        await sink.send(EventRecord.from_event(MemoryAccess(seq=4, access=Access.WRITE, address=16, value=b"\x01"), "vm1"))
        await sink.send(Alert(rule="p.r", severity=Severity.CRITICAL, message="m", vm="vm1", time_ns=11, seq=3,
                              pid=7, comm="ls", details={"address": "0x10", "raw": b"\xff"}))
        await sink.aclose()
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        cols = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in ("events", "alerts")}
        assert cols == {
            "events": ["id", "vm", "time_ns", "seq", "kind", "vcpu", "pid", "comm", "details", "host"],
            "alerts": ["id", "vm", "time_ns", "seq", "rule", "severity", "pid", "comm", "message", "details", "host"],
        }
        rows = db.execute("SELECT vm, time_ns, seq, kind, pid, comm, details FROM events ORDER BY id").fetchall()
        assert rows[0] == ("vm1", 10, 3, "Exec", 7, "ls", '{"filename": "/bin/ls"}')
        assert json.loads(rows[1][6]) == {"access": "WRITE", "address": 16, "size": 0, "value": "01"}
        alert = db.execute("SELECT rule, severity, pid, message, details FROM alerts").fetchone()
        assert alert == ("p.r", "critical", 7, "m", '{"address": "0x10", "raw": "ff"}')

    async def test_old_timeline_gains_host(self, tmp_path):
        """A timeline written before hosts were stored reads as host '' and, opened for writing,
        gets the column (old rows '', new rows their host)."""
        from vmwatch.timeline.query import TimelineQuery, query_timeline

        path = tmp_path / "old.db"
        old = sqlite3.connect(path)
        old.executescript(
            "CREATE TABLE events(id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time_ns INTEGER NOT NULL,"
            " seq INTEGER NOT NULL, kind TEXT NOT NULL, vcpu INTEGER, pid INTEGER, comm TEXT,"
            " details TEXT NOT NULL DEFAULT '{}');"
            "CREATE TABLE alerts(id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time_ns INTEGER NOT NULL,"
            " seq INTEGER NOT NULL, rule TEXT NOT NULL, severity TEXT NOT NULL, pid INTEGER, comm TEXT,"
            " message TEXT NOT NULL, details TEXT NOT NULL DEFAULT '{}');"
            "INSERT INTO events(vm, time_ns, seq, kind, pid) VALUES ('a', 1, 1, 'Exec', 5);")
        old.commit()
        old.close()
        assert [(e.vm, e.host) for e in query_timeline(path)] == [("a", "")]
        assert query_timeline(path, TimelineQuery(host="h1")) == []
        sink = SqliteSink(path)
        await sink.send(EventRecord.from_event(Exec(seq=2, time_ns=2, pid=6, filename="/x"), "b", "h1"))
        await sink.send(Alert(rule="p.r", severity=Severity.WARNING, message="m", vm="b", host="h1", time_ns=3))
        await sink.aclose()
        assert [(e.vm, e.host, e.kind) for e in query_timeline(path)] == [("a", "", "Exec"), ("b", "h1", "Exec"),
                                                                          ("b", "h1", "alert")]
        assert [e.vm for e in query_timeline(path, TimelineQuery(host="h1"))] == ["b", "b"]

    async def test_not_a_database(self, tmp_path):
        """A file that is not SQLite is a VmwatchError, not a traceback."""
        import pytest

        from vmwatch.errors import VmwatchError

        bad = tmp_path / "x.db"
        bad.write_bytes(b"not sqlite at all" * 100)
        with pytest.raises(VmwatchError, match="timeline database"):
            SqliteSink(bad)


class TestJsonLines:
    async def test_alert_and_event_lines(self):
        out = io.StringIO()
        sink = JsonLinesSink(out)
        await sink.send(Alert(rule="p.r", severity=Severity.WARNING, message="hello", vm="v"))
        await sink.send(EventRecord.from_event(Exec(seq=1, pid=2, filename="/x"), "v"))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert lines[0]["event"] == "alert" and lines[0]["severity"] == "warning" and lines[0]["message"] == "hello"
        assert lines[1]["event"] == "Exec" and lines[1]["details"] == {"filename": "/x"}


PACK = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_start
    @rule.every(1.0)
    @rule.configure(paddr=0x1000)
    def magic(event, guest):
        data = guest.phys.read(guest.config["paddr"], 4)
        if data == b"EVIL":
            guest.alert("critical", f"EVIL at {guest.config['paddr']:#x}")

    @rule.on_breakpoint(0x1234)
    def never(event, guest):
        pass
''')


def _evil_image_and_pack(tmp_path, paddr):
    """A raw image with b"EVIL" at ``paddr`` and the pack above, written under ``tmp_path``."""
    fake = FakeGuest(seed=1, memory_size=1 << 20)
    fake.buffer[paddr:paddr + 4] = b"EVIL"
    image = tmp_path / "mem.raw"
    image.write_bytes(bytes(fake.buffer))
    pack = tmp_path / "mine.py"
    pack.write_text(PACK)
    return image, pack


class TestWatchCommand:
    def test_image_json_and_db(self, tmp_path):
        """watch on an image runs start and periodic rules once, prints JSON lines, fills the timeline."""
        image, pack = _evil_image_and_pack(tmp_path, 0x3000)
        db = tmp_path / "t.db"
        result = run_cli("watch", image, "--rules", pack, "--json", "--db", db, "--set", "mine.magic.paddr=12288")
        assert result.status == 0, result.stderr
        alerts = [json.loads(line) for line in result.stdout.splitlines() if '"alert"' in line]
        assert [a["message"] for a in alerts] == ["EVIL at 0x3000", "EVIL at 0x3000"]  # start + one tick
        rows = sqlite3.connect(db).execute("SELECT rule, severity FROM alerts").fetchall()
        assert rows == [("mine.magic", "critical")] * 2

    def test_screen_summary(self, tmp_path):
        """Without --json the screen shows each alert and a summary a user can read."""
        image, pack = _evil_image_and_pack(tmp_path, 0x1000)
        result = run_cli("watch", image, "--rules", pack)
        assert result.status == 0, result.stderr
        assert "CRITICAL" in result.stdout and "EVIL at 0x1000" in result.stdout
        assert "findings (warning and above)" in result.stdout and "2 critical" in result.stdout
        assert "1 listeners inactive" in result.stdout  # the breakpoint cannot work on an image

    def test_bad_input_is_one_line(self, tmp_path):
        """Bad packs, settings and targets exit 2 with one line."""
        pack = tmp_path / "mine.py"
        pack.write_text(PACK)
        for args in (["watch", tmp_path / "none.raw", "--rules", pack],
                     ["watch", pack, "--rules", "nope"],
                     ["watch", pack, "--rules", pack, "--set", "mine.magic.nokey=1"],
                     ["watch", pack, "--rules", pack, "--set", "garbage"],
                     ["watch", pack, "--rules", pack, "--duration", "-1"]):
            result = run_cli(*args)
            assert result.status == 2, (args, result)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
