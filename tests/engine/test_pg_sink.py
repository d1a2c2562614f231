"""``watch --db postgresql://...``: the PostgreSQL sink against a real throwaway cluster (tests/conftest.py).

The same watch goes to SQLite and PostgreSQL; the server is restarted in the middle of a watch;
it is down, lagging, refusing rows, at a newer schema, or named by a bad URL.
"""

from __future__ import annotations

import json
import sqlite3
import time

import psycopg
import pytest
import trio

from tests.engine.test_sinks_and_cli import _evil_image_and_pack
from vmwatch.engine import Engine, ListSink, SyntheticSource, WatchOptions
from vmwatch.engine.alerts import Alert
from vmwatch.engine.open_sink import open_timeline_sink
from vmwatch.engine.sinks import EventRecord
from vmwatch.errors import TimelineError
from vmwatch.events import Exec, ModuleLoad, ProcessExit, ProcessStart
from vmwatch.rules import RuleSet, Severity, rule, rules_of

EVENT_SQL = "SELECT vm, host, time_ns, seq, kind, vcpu, pid, comm, details{cast} FROM events ORDER BY time_ns, seq, kind"
ALERT_SQL = ("SELECT vm, host, time_ns, seq, rule, severity, pid, comm, message, details{cast} FROM alerts"
             " ORDER BY time_ns, seq, message")


@rule.on(Exec)
def exec_tmp(event, guest):
    if event.filename.startswith("/tmp/"):
        guest.alert("warning", f"exec from /tmp: {event.filename}", filename=event.filename)


def _ruleset() -> RuleSet:
    return RuleSet(rules_of({"exec_tmp": exec_tmp, "__name__": __name__}, "t"))


def _events(n: int, t0: int = 1_764_000_000_000_000_000) -> list:
    out = []
    for i in range(n):
        t = t0 + i * 1_000_000
        out.append([
            ProcessStart(seq=i, time_ns=t, pid=100 + i % 7, ppid=1, comm="sh"),
            Exec(seq=i, time_ns=t, pid=100 + i % 7, filename="/tmp/x\x1b" if i % 40 == 1 else "/bin/ls", comm="ls"),
            ProcessExit(seq=i, time_ns=t, pid=100 + i % 7, comm="ls", exit_code=i % 3),
            ModuleLoad(seq=i, time_ns=t, name="m\u202eod", base=0xFFFF0000 + i),
        ][i % 4])
    return out


def _pg_rows(url: str) -> tuple[list, list]:
    with psycopg.connect(url) as conn:
        return (conn.execute(EVENT_SQL.format(cast="::text") ).fetchall(),
                conn.execute(ALERT_SQL.format(cast="::text") ).fetchall())


def _sqlite_rows(path) -> tuple[list, list]:
    db = sqlite3.connect(path)
    return db.execute(EVENT_SQL.format(cast="") ).fetchall(), db.execute(ALERT_SQL.format(cast="") ).fetchall()


class TestSameRows:
    async def test_one_watch_into_both_stores(self, pg_url, tmp_path):
        """One synthetic watch with a SQLite and a PostgreSQL sink: the same rows in both, every column."""
        path = tmp_path / "t.db"
        async with open_timeline_sink(str(path)) as sqlite_sink, open_timeline_sink(pg_url) as pg_sink:
            summary = await Engine(SyntheticSource(_events(4000), name="guest-a"), _ruleset(),
                                   [sqlite_sink, pg_sink]).run()
        assert summary.alerts == {"warning": 100} and not summary.dropped_records and not summary.lost_alerts
        events, alerts = _pg_rows(pg_url)
        assert (events, alerts) == _sqlite_rows(path)
        assert len(events) == 4001 and len(alerts) == 100  # + SourceEnded
        assert pg_sink.stats.committed == 4101 and pg_sink.stats.dropped == 0

    def test_cli_watch_into_both_stores(self, pg_url, tmp_path):
        """``vmwatch watch IMAGE --db`` into each store: the same timeline, times aside."""
        from vmwatch.testing.cli import run_cli

        image, pack = _evil_image_and_pack(tmp_path, 0x3000)
        lines = {}
        for db in (str(tmp_path / "t.db"), pg_url):
            result = run_cli("watch", image, "--rules", pack, "--db", db, "--set", "mine.magic.paddr=12288")
            assert result.status == 0, result.stderr
            timeline = run_cli("timeline", db, "--json")
            rows = [json.loads(line) for line in timeline.stdout.splitlines()]
            lines[db] = [{k: v for k, v in row.items() if k not in ("time", "time_ns")} for row in rows]
        sqlite_rows, pg_rows = lines.values()
        assert pg_rows == sqlite_rows
        assert [r["message"] for r in pg_rows if r["source"] == "alert"] == ["EVIL at 0x3000"] * 2
        assert "rows committed (2 alerts)" in result.stdout and "postgresql://" in result.stdout

    def test_fleet_watch(self, pg_url, tmp_path):
        """A fleet watch (two targets) writes both guests into one database; --by vm counts them."""
        from vmwatch.testing.cli import run_cli

        image, pack = _evil_image_and_pack(tmp_path, 0x3000)
        other = tmp_path / "other.raw"
        other.write_bytes(image.read_bytes())
        result = run_cli("watch", image, other, "--rules", pack, "--db", pg_url, "--set", "mine.magic.paddr=12288")
        assert result.status == 0, result.stderr
        by_vm = [json.loads(line) for line in run_cli("timeline", pg_url, "--by", "vm", "--json").stdout.splitlines()]
        assert sorted((row["vm"], row["alerts"]) for row in by_vm) == sorted([(str(image), 2), (str(other), 2)])

    async def test_two_hosts_at_once(self, pg_url):
        """Two writers (two hosts) fill the same new day partitions at the same time: nothing lost."""

        async def host(name: str) -> int:
            async with open_timeline_sink(pg_url, batch=50) as sink:
                for i in range(3000):
                    await sink.send(EventRecord(vm="g", host=name, time_ns=i * 3_600_000_000_000, seq=i, kind="Exec"))
                    if i % 100 == 0:
                        await trio.sleep(0)
                await sink.aclose()
            return sink.stats.committed

        async with trio.open_nursery() as nursery:
            for name in ("hv-a", "hv-b"):
                nursery.start_soon(host, name)
        with psycopg.connect(pg_url) as conn:
            counts = dict(conn.execute("SELECT host, count(*) FROM events GROUP BY 1").fetchall())
            parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").fetchone()
        assert counts == {"hv-a": 3000, "hv-b": 3000}
        assert parts == (125,)  # 3000 hours


class TestServerAway:
    async def test_restart_mid_watch(self, pg_cluster, pg_url):
        """pg_ctl stop/start in the middle of a watch: every alert and event is written after the
        reconnect, and the pump never waited for the sink (its channel never filled)."""
        listed = ListSink()
        source = SyntheticSource(_events(12_000), name="guest-a", realtime=True, rate=3000, batch=30)
        async with open_timeline_sink(pg_url, batch=200, backoff=0.05, max_backoff=0.5) as sink:
            engine = Engine(source, _ruleset(), [listed, sink], options=WatchOptions(sink_queue=256))

            async def restart():
                while sink.stats.committed < 1000:
                    await trio.sleep(0.05)
                await trio.to_thread.run_sync(pg_cluster.stop)
                await trio.sleep(1.5)  # 4,500 events at 3,000/s: far more than the pump's 256-item channel
                await trio.to_thread.run_sync(pg_cluster.start)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart)
                summary = await engine.run()
        stats = sink.stats
        assert stats.reconnects >= 1 and stats.resent + stats.reconnects >= 1
        assert not summary.dropped_records and not summary.lost_alerts
        assert stats.dropped == stats.rejected == stats.unwritten == 0
        assert stats.longest_put_s < 0.5, stats  # a put that waited for the server would take 1.5 s
        events, alerts = _pg_rows(pg_url)
        assert len(alerts) == len(listed.alerts) == summary.alerts["warning"]
        assert [r[2:5] for r in events] == sorted((e.time_ns, e.seq, e.kind) for e in listed.events)
        print(f"restart: {stats.reconnects} reconnects, {stats.resent} re-sent, longest put "
              f"{stats.longest_put_s * 1e6:.0f} us, queue peak {stats.longest_queue}")

    async def test_lagging_server_drops_events_keeps_alerts(self, pg_cluster, pg_url):
        """With the server away, events past max_queue are dropped and counted; alerts all wait and
        are written once it is back."""
        async with open_timeline_sink(pg_url, max_queue=50, backoff=0.05, max_backoff=0.2) as sink:
            pg_cluster.stop()
            try:
                for i in range(500):
                    await sink.send(EventRecord(vm="g", time_ns=i, seq=i, kind="Exec"))
                    if i % 50 == 0:
                        await sink.send(Alert(rule="r", severity=Severity.ERROR, message=f"m{i}", vm="g", time_ns=i,
                                              seq=i))
            finally:
                pg_cluster.start()
            await sink.aclose()
        assert sink.stats.dropped == 450 and sink.stats.committed == 60 and sink.stats.committed_alerts == 10
        events, alerts = _pg_rows(pg_url)
        assert len(events) == 50 and [a[8] for a in alerts] == [f"m{i}" for i in range(0, 500, 50)]

    async def test_gives_up_at_close_and_says_so(self, pg_cluster, pg_url):
        """A server that does not come back: close waits close_timeout, then counts what is unwritten."""
        from vmwatch.cli.timeline_db import sink_report

        async with open_timeline_sink(pg_url, close_timeout=0.5, backoff=0.05) as sink:
            pg_cluster.stop()
            try:
                await sink.send(Alert(rule="r", severity=Severity.ERROR, message="lost", vm="g"))
                await sink.send(EventRecord(vm="g", time_ns=1, seq=1, kind="Exec"))
                with trio.fail_after(20):
                    await sink.aclose()
            finally:
                pg_cluster.start()
        assert sink.stats.unwritten == 2 and sink.stats.unwritten_alerts == 1 and sink.stats.committed == 0
        _, warning = sink_report(sink)
        assert "2 rows never written (1 alerts)" in warning

    async def test_refused_row_is_counted_not_retried(self, pg_url):
        """A row the server refuses (a NUL in a text column) is rejected alone; the batch's others commit."""
        async with open_timeline_sink(pg_url) as sink:
            for i in range(10):
                await sink.send(EventRecord(vm="g", time_ns=i, seq=i, kind="Exec", comm="a\x00b" if i == 4 else "sh"))
            await sink.aclose()
        assert sink.stats.rejected == 1 and sink.stats.committed == 9
        assert [r[3] for r in _pg_rows(pg_url)[0]] == [0, 1, 2, 3, 5, 6, 7, 8, 9]


    async def test_commit_seen_after_reconnect(self, pg_url):
        """The check a reconnect makes before re-sending: a batch whose COMMIT got through is known
        as committed (not sent twice), the next one is not (sent again)."""
        async with open_timeline_sink(pg_url) as sink:
            await sink.send(EventRecord(vm="g", time_ns=1, seq=1, kind="Exec"))
            while sink.stats.committed < 1:
                await trio.sleep(0.01)
            number = sink._batch_no
            assert await trio.to_thread.run_sync(sink._committed, number)
            assert not await trio.to_thread.run_sync(sink._committed, number + 1)
            await sink.aclose()


class TestBadInput:
    @pytest.mark.parametrize(("url", "says"), [
        ("postgresql://vmwatch@/x?bogus_option=1", "bad database URL"),
        ("postgresql://vmwatch@/x?host=/nonexistent/dir", "cannot connect to"),
        ("postgresql://vmwatch:s3cret@127.0.0.1:1/x", "cannot connect to"),
        ("postgresql://vmwatch@[::1/x", "bad database URL"),
        ("mysql://root@localhost/x", "unknown database URL"),
    ])
    def test_one_line_exit_2(self, url, says, tmp_path):
        """Bad URLs and a server down at start: one line, exit 2, no password shown, for single and
        fleet watch and for timeline/trend."""
        from vmwatch.testing.cli import run_cli

        image, pack = _evil_image_and_pack(tmp_path, 0x3000)
        for args in (["watch", image, "--rules", pack, "--db", url],
                     ["watch", image, image, "--rules", pack, "--db", url],
                     ["timeline", url], ["trend", url, "-o", tmp_path / "t.png"]):
            result = run_cli(*args)
            assert result.status == 2, (args, result)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and says in lines[0], (args, result.stderr)
            assert "s3cret" not in result.stderr + result.stdout

    async def test_down_at_start_raises_before_any_guest(self):
        """The API raises TimelineError (no ExceptionGroup) when the server is not there."""
        with pytest.raises(TimelineError, match="cannot connect"):
            async with open_timeline_sink("postgresql://vmwatch@/x?host=/nonexistent/dir"):
                pass


@pytest.mark.guest
def test_live_watch_into_postgres(lab_guest, pg_url):
    """A live watch of the lab guest with --json and --db postgresql://: the database holds exactly
    the events and alerts the JSON lines showed, including the exec whose pid the guest's own
    shell reported."""
    import threading

    from vmwatch.testing.cli import run_cli

    truth: list[str] = []

    def act() -> None:  # exec once a second while the watch runs: it arms later on a loaded host
        end = time.monotonic() + 10
        time.sleep(2)
        while time.monotonic() < end:
            truth.append(lab_guest.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])
            time.sleep(1)

    worker = threading.Thread(target=act)
    worker.start()
    result = run_cli("watch", lab_guest.target, "--rules", "security", "timeline", "--duration", "12", "--json",
                     "--db", pg_url)
    worker.join()
    assert result.status == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    shown = sorted((x["vm"], x["host"], x["seq"], x["event"], x["pid"], x["comm"], json.dumps(x["details"]))
                   for x in lines if x["event"] != "alert")
    events, alerts = _pg_rows(pg_url)
    stored = sorted((vm, host, seq, kind, pid, comm, json.dumps(json.loads(details)))
                    for vm, host, _, seq, kind, _, pid, comm, details in events)
    assert stored == shown
    assert len(alerts) == sum(x["event"] == "alert" for x in lines)
    execs = {row_pid for _, _, _, kind, row_pid, _, _ in stored if kind == "Exec"}
    assert {int(p) for p in truth} & execs, (truth, sorted(execs))
