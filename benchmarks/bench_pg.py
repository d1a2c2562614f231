"""The PostgreSQL fleet timeline: write rate against SQLite, and query times over 10 million rows.

1. Events per second from the synthetic pump into each timeline, until every row is committed
   (the sink closed): the baseline is the pump into a list (no storage), then SQLite, then
   PostgreSQL (COPY batches in ``trio.to_thread``). The longest ``send`` of the PostgreSQL sink
   is what the pump waited for it at worst.
2. ``timeline`` and ``trend`` queries (the library calls the commands make) over N rows
   (default 10,000,000 events and 1% as many alerts, 50 guests on 5 hosts over 30 days)
   generated server-side with ``generate_series`` into the partitioned tables; the baseline is
   the same queries on a SQLite timeline holding the same rows (a recursive CTE; ``--sqlite-rows``
   for fewer).

The cluster is Debian's server in a temp dir (vmwatch/testing/postgres.py) with fsync on and the
default settings (shared_buffers 128 MB). Run: ``.venv/bin/python benchmarks/bench_pg.py
[--events N] [--rows N] [--sqlite-rows N]`` (``--rows 0`` skips part 2).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from _cli import parse_args

import trio

from vmwatch.engine import Engine, ListSink, SyntheticSource, WatchOptions
from vmwatch.engine.open_sink import open_timeline_sink
from vmwatch.events import Exec, ModuleLoad, ProcessExit, ProcessStart
from vmwatch.rules import RuleSet
from vmwatch.testing.postgres import start_cluster
from vmwatch.timeline import pg_schema
from vmwatch.timeline.query import TimelineQuery, breakdown, bucket_counts, query_timeline

T0 = 1_764_547_200_000_000_000  # 2025-12-01T00:00Z
DAY = pg_schema.DAY_NS
HOUR = DAY // 24
DAYS = 30
KINDS = ("Exec", "ProcessStart", "ProcessExit", "ModuleLoad", "RegisterWrite", "Fault")
SEVERITIES = ("info", "warning", "error", "critical")


def _events(n: int) -> list:
    kinds = (ProcessStart, Exec, ProcessExit, ModuleLoad)
    out = []
    for i in range(n):
        cls = kinds[i % 4]
        fields = {"ProcessStart": dict(pid=i % 500, ppid=1, comm="sh"), "Exec": dict(pid=i % 500, filename="/bin/ls"),
                  "ProcessExit": dict(pid=i % 500, exit_code=0), "ModuleLoad": dict(name="m", base=i)}[cls.__name__]
        out.append(cls(seq=i, time_ns=T0 + i * 1000, **fields))
    return out


async def _pump(n: int, db: str | None) -> tuple[float, object]:
    events = _events(n)
    options = WatchOptions(sink_queue=n + 16)  # nothing dropped: every row must be stored
    async with open_timeline_sink(db, max_queue=n + 16) if db and db.startswith("postgresql") else \
            open_timeline_sink(db) as sink:
        sinks = [sink] if sink is not None else [ListSink()]
        t0 = time.perf_counter()
        summary = await Engine(SyntheticSource(events, batch=512), RuleSet([]), sinks, options=options).run()
    seconds = time.perf_counter() - t0
    assert not summary.dropped_records, summary.dropped_records
    return n / seconds, sink


def bench_writes(n: int, url: str, tmp: Path) -> None:
    print(f"write rate, {n:,} synthetic events through the pump until committed")
    base, _ = trio.run(_pump, n, None)
    sqlite, _ = trio.run(_pump, n, str(tmp / "w.db"))
    pg, sink = trio.run(_pump, n, url)
    stats = sink.stats
    assert stats.committed == n + 1, stats
    print(f"  {'pump alone (list)':20} {base:>10,.0f} events/s")
    print(f"  {'SQLite (WAL)':20} {sqlite:>10,.0f} events/s   {base / sqlite:5.1f}x slower than the pump alone")
    print(f"  {'PostgreSQL (COPY)':20} {pg:>10,.0f} events/s   {base / pg:5.1f}x slower; {sqlite / pg:4.2f}x SQLite's time; "
          f"{stats.batches} batches; put: mean {stats.put_s / stats.puts * 1e6:.1f} µs, "
          f"longest {stats.longest_put_s * 1e6:,.0f} µs")


def _generate_pg(url: str, rows: int) -> float:
    import psycopg

    t0 = time.perf_counter()
    with psycopg.connect(url) as conn:
        pg_schema.migrate(conn, url)
        with conn.transaction(), conn.cursor() as cur:
            for table in ("events", "alerts"):
                pg_schema.ensure_partitions(cur, table, {pg_schema.day_of(T0) + d for d in range(DAYS)})
        step = DAYS * DAY // rows
        kinds = "ARRAY[" + ",".join(f"'{k}'" for k in KINDS) + "]"
        sevs = "ARRAY[" + ",".join(f"'{s}'" for s in SEVERITIES) + "]"
        conn.execute(f"""INSERT INTO events SELECT 'vm-' || (g % 50), 'hv-' || (g % 50 / 10), {T0} + g * {step}, g,
            ({kinds})[1 + g % 6], g % 4, g % 5000, 'comm' || (g % 100), json_build_object('n', g, 'f', '/bin/ls')
            FROM generate_series(0::bigint, {rows - 1}) AS g""")
        conn.execute(f"""INSERT INTO alerts SELECT 'vm-' || (g % 50), 'hv-' || (g % 50 / 10), {T0} + g * {step * 100}, g,
            'security.rule' || (g % 7), ({sevs})[1 + g % 4], g % 5000, 'sh', 'finding ' || g, '{{}}'
            FROM generate_series(0::bigint, {rows // 100 - 1}) AS g""")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE events")
        conn.execute("VACUUM ANALYZE alerts")
    return time.perf_counter() - t0


def _generate_sqlite(path: Path, rows: int) -> float:
    from vmwatch.engine.sinks import SqliteSink

    trio.run(SqliteSink(path).aclose)  # the schema, as a watch creates it
    t0 = time.perf_counter()
    db = sqlite3.connect(path)
    step = DAYS * DAY // rows
    kinds = " ".join(f"WHEN {i} THEN '{k}'" for i, k in enumerate(KINDS))
    sevs = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(SEVERITIES))
    series = "WITH RECURSIVE g(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM g WHERE x < {n})"
    db.execute(series.format(n=rows - 1) + f""" INSERT INTO events(vm, host, time_ns, seq, kind, vcpu, pid, comm, details)
        SELECT 'vm-' || (x % 50), 'hv-' || (x % 50 / 10), {T0} + x * {step}, x, CASE x % 6 {kinds} END, x % 4,
        x % 5000, 'comm' || (x % 100), json_object('n', x, 'f', '/bin/ls') FROM g""")
    db.execute(series.format(n=rows // 100 - 1) + f""" INSERT INTO alerts(vm, host, time_ns, seq, rule, severity, pid,
        comm, message, details) SELECT 'vm-' || (x % 50), 'hv-' || (x % 50 / 10), {T0} + x * {step * 100}, x,
        'security.rule' || (x % 7), CASE x % 4 {sevs} END, x % 5000, 'sh', 'finding ' || x, '{{}}' FROM g""")
    db.commit()
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - t0


QUERIES = [
    ("timeline --limit 100", lambda db: query_timeline(db, TimelineQuery(limit=100))),
    ("timeline --vm vm-7 (one hour)", lambda db: query_timeline(db, TimelineQuery(
        vm="vm-7", since_ns=T0 + 10 * DAY, until_ns=T0 + 10 * DAY + HOUR))),
    ("timeline --kind alert --host hv-2 --limit 1000", lambda db: query_timeline(db, TimelineQuery(
        kinds=("alert",), host="hv-2", limit=1000))),
    ("timeline --pid 42 --since day 29", lambda db: query_timeline(db, TimelineQuery(
        pids=(42,), since_ns=T0 + 29 * DAY))),
    ("timeline --by vm (all rows)", lambda db: breakdown(db, "vm")),
    ("trend --bucket 1h (all rows)", lambda db: bucket_counts(db, HOUR)),
    ("trend --bucket 1h --vm vm-7", lambda db: bucket_counts(db, HOUR, TimelineQuery(vm="vm-7"))),
    ("trend --bucket 1d --by host", lambda db: bucket_counts(db, DAY, by="host")),
    ("trend --bucket 1m, one day", lambda db: bucket_counts(db, 60_000_000_000, TimelineQuery(
        since_ns=T0 + 3 * DAY, until_ns=T0 + 4 * DAY))),
]


def _time(func, db) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(2):
        t0 = time.perf_counter()
        size = len(func(db))
        best = min(best, time.perf_counter() - t0)
    return best, size


def bench_queries(url: str, rows: int, sqlite_rows: int, tmp: Path) -> None:
    print(f"queries: PostgreSQL with {rows:,} events + {rows // 100:,} alerts "
          f"(generated in {_generate_pg(url, rows):.0f} s); baseline SQLite with {sqlite_rows:,} + {sqlite_rows // 100:,}"
          f" (generated in {_generate_sqlite(tmp / 'q.db', sqlite_rows):.0f} s); best of 2")
    print(f"  {'query':48} {'PostgreSQL':>11} {'rows':>7}  {'SQLite':>9} {'rows':>7}")
    for name, func in QUERIES:
        pg, n_pg = _time(func, url)
        lite, n_lite = _time(func, str(tmp / "q.db"))
        print(f"  {name:48} {pg * 1000:>9,.0f}ms {n_pg:>7,}  {lite * 1000:>7,.0f}ms {n_lite:>7,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events through the pump (0: skip)")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in PostgreSQL for the queries (0: skip)")
    parser.add_argument("--sqlite-rows", type=int, help="rows in the SQLite baseline (default: --rows)")
    args = parse_args(parser)
    cluster = start_cluster(fsync=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.events:
                bench_writes(args.events, cluster.create_database("writes"), Path(tmp))
            if args.rows:
                bench_queries(cluster.create_database("queries"), args.rows, args.sqlite_rows or args.rows, Path(tmp))
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
