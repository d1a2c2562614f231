"""The PostgreSQL fleet timeline: URLs, connecting, the schema and its version, day partitions.

Any number of watching hosts write one database. Schema (version 1)::

    vmwatch_schema(version int, applied_ns bigint, host text)   -- one row per migration applied
    vmwatch_writers(writer text PRIMARY KEY, host text, last_batch bigint, updated_ns bigint)
    events(vm, host, time_ns, seq, kind, vcpu, pid, comm, details json)   PARTITION BY RANGE (time_ns)
    alerts(vm, host, time_ns, seq, rule, severity, pid, comm, message, details json)  (the same)

The columns and their meaning are the SQLite timeline's (vmwatch/engine/sinks.py) without its
``id``: rows are ordered by ``(time_ns, seq)``. ``details`` is ``json``, not ``jsonb``, so the text
comes back exactly as written (key order, ``\\u0000`` escapes). Each table is partitioned by UTC
day of ``time_ns`` (``events_20261207``), a partition created by the first writer that needs it
(under an advisory lock, so two hosts never race); old days are dropped with a ``DROP TABLE``.
``vmwatch_writers`` holds each sink's last committed batch, written in the batch's transaction:
after a reconnect a sink asks it whether the batch in flight was committed before re-sending it.

Nothing here needs more than plain PostgreSQL (no extension, no unique key but the writers' own,
no foreign key, no trigger), which is why the same statements run unchanged on Citus: see
docs/postgresql.md.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
import urllib.parse
from typing import Any

from vmwatch.errors import TimelineError

SCHEMA_VERSION = 1
"""The schema this vmwatch writes and reads; a database at a higher version is refused."""
SCHEMES = ("postgresql://", "postgres://")
DAY_NS = 86_400_000_000_000
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_LOCK_KEY = 0x766D7761746368  # "vmwatch": the advisory lock for migrations and new partitions

EVENT_COLUMNS = ("vm", "host", "time_ns", "seq", "kind", "vcpu", "pid", "comm", "details")
ALERT_COLUMNS = ("vm", "host", "time_ns", "seq", "rule", "severity", "pid", "comm", "message", "details")

_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS vmwatch_writers(
    writer text PRIMARY KEY, host text NOT NULL, last_batch bigint NOT NULL, updated_ns bigint NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    vm text NOT NULL, host text NOT NULL DEFAULT '', time_ns bigint NOT NULL, seq bigint NOT NULL,
    kind text NOT NULL, vcpu integer, pid bigint, comm text, details json NOT NULL DEFAULT '{}'
) PARTITION BY RANGE (time_ns);
CREATE TABLE IF NOT EXISTS alerts(
    vm text NOT NULL, host text NOT NULL DEFAULT '', time_ns bigint NOT NULL, seq bigint NOT NULL,
    rule text NOT NULL, severity text NOT NULL, pid bigint, comm text, message text NOT NULL,
    details json NOT NULL DEFAULT '{}'
) PARTITION BY RANGE (time_ns);
CREATE INDEX IF NOT EXISTS events_vm_time ON events(vm, time_ns);
CREATE INDEX IF NOT EXISTS events_host_time ON events(host, time_ns);
CREATE INDEX IF NOT EXISTS events_kind_time ON events(kind, time_ns);
CREATE INDEX IF NOT EXISTS events_time ON events(time_ns, seq);
CREATE INDEX IF NOT EXISTS alerts_vm_time ON alerts(vm, time_ns);
CREATE INDEX IF NOT EXISTS alerts_time ON alerts(time_ns, seq);
""",
}


def is_postgres_url(spec: str | Any) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEMES)


def redacted(url: str) -> str:
    """The URL with any password replaced by ``***`` (what messages and summaries print)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url.split("@", 1)[-1] if "@" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        user, _, hostport = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{hostport}"
    query = urllib.parse.urlencode([(k, "***" if k == "password" else v)
                                    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
                                   safe="/")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise TimelineError("a postgresql:// timeline needs psycopg: pip install 'vmwatch[postgres]'") from None
    return psycopg


def connect(url: str, *, connect_timeout: int = 5) -> Any:
    """A psycopg connection (autocommit off) to ``url``.

    Raises:
        TimelineError: a malformed URL, or the server cannot be reached or refuses us.
    """
    psycopg = _psycopg()
    shown = redacted(url)
    try:
        conninfo = psycopg.conninfo.make_conninfo(url)
    except psycopg.Error as exc:
        raise TimelineError(f"bad database URL {shown}: {first_line(exc)}") from None
    try:
        return psycopg.connect(conninfo, connect_timeout=connect_timeout, keepalives=1, keepalives_idle=10,
                               keepalives_interval=5, keepalives_count=3, application_name="vmwatch")
    except psycopg.ProgrammingError as exc:
        raise TimelineError(f"bad database URL {shown}: {first_line(exc)}") from None
    except psycopg.Error as exc:
        raise TimelineError(f"cannot connect to {shown}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def schema_version(conn: Any) -> int | None:
    """The highest migration applied, or None when the database holds no vmwatch schema."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('vmwatch_schema') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute("SELECT max(version) FROM vmwatch_schema")
        return cur.fetchone()[0]


def _refuse_newer(version: int | None, url: str) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise TimelineError(f"{redacted(url)} holds vmwatch schema version {version}; this vmwatch knows "
                            f"version {SCHEMA_VERSION} at most (upgrade vmwatch to use this database)")


def migrate(conn: Any, url: str) -> int:
    """Create or bring the schema up to :data:`SCHEMA_VERSION` (one transaction, advisory-locked).

    Raises:
        TimelineError: the database is at a newer version, or the DDL fails.
    """
    psycopg = _psycopg()
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute("CREATE TABLE IF NOT EXISTS vmwatch_schema("
                        "version integer NOT NULL, applied_ns bigint NOT NULL, host text NOT NULL)")
            version = schema_version(conn) or 0
            _refuse_newer(version, url)
            for number in range(version + 1, SCHEMA_VERSION + 1):
                cur.execute(_MIGRATIONS[number])
                cur.execute("INSERT INTO vmwatch_schema VALUES (%s, %s, %s)",
                            (number, time.time_ns(), socket.gethostname()))
    except psycopg.Error as exc:
        raise TimelineError(f"cannot set up the vmwatch schema in {redacted(url)}: {first_line(exc)}") from None
    return SCHEMA_VERSION


def check_readable(conn: Any, url: str) -> None:
    """Refuse a database with no vmwatch schema or a newer one (readers never migrate)."""
    version = schema_version(conn)
    if version is None:
        raise TimelineError(f"{redacted(url)} is not a vmwatch timeline (no vmwatch_schema table)")
    _refuse_newer(version, url)


def day_of(time_ns: int) -> int:
    return time_ns // DAY_NS


def partition_name(table: str, day: int) -> str:
    return f"{table}_{dt.date(1970, 1, 1) + dt.timedelta(days=day):%Y%m%d}"


def ensure_partitions(cur: Any, table: str, days: set[int]) -> None:
    """Create ``table``'s partitions for these UTC days if missing (in the caller's transaction)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
    for day in sorted(days):
        low, high = day * DAY_NS, (day + 1) * DAY_NS
        low_sql = "MINVALUE" if low < _INT64_MIN else str(low)  # the first and last days of bigint
        high_sql = "MAXVALUE" if high > _INT64_MAX else str(high)
        cur.execute(f"CREATE TABLE IF NOT EXISTS {partition_name(table, day)} PARTITION OF {table}"
                    f" FOR VALUES FROM ({low_sql}) TO ({high_sql})")
