"""Queries over the SQLite timeline the engine's SqliteSink writes (schema in vmwatch/engine/sinks.py).

Events and alerts come back merged in one time order (time_ns, then seq, events before the
alerts they caused). The database is opened read-only, so querying while a watch is writing is
safe (WAL lets readers and the writer proceed together).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs

from vmwatch.errors import TimelineError

ALERT_KIND = "alert"
"""The ``kind`` of alert rows, and the ``--kind`` value that selects alerts."""


@attrs.frozen(kw_only=True)
class TimelineEntry:
    """One row of the merged timeline: an event or an alert."""

    source: str
    """``"event"`` or ``"alert"``."""
    vm: str
    host: str = ""
    """The host that watched ``vm`` (``''`` in timelines written before hosts were stored)."""
    time_ns: int
    seq: int
    kind: str
    """Event class name (``Exec``, ``ProcessStart``...) or ``"alert"``."""
    vcpu: int | None = None
    pid: int | None = None
    comm: str | None = None
    rule: str | None = None
    severity: str | None = None
    message: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)

    def summary(self) -> str:
        """One readable line: the alert's message, or the event's details as key=value."""
        if self.source == "alert":
            return f"[{self.severity}] {self.rule}: {self.message}"
        hexed = _HEX_FIELDS.get(self.kind, ())
        return " ".join(f"{k}={_short(hex(v) if k in hexed and type(v) is int else v)}" for k, v in self.details.items())

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_HEX_FIELDS = {"Fault": ("rip", "cr2", "error_code"), "MmioAccess": ("paddr", "value", "rip"),
               "RegisterWrite": ("old", "new", "rip")}
"""Addresses and register values, shown in hex."""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@attrs.frozen(kw_only=True)
class TimelineQuery:
    """What to select; every filter is optional and they combine with AND."""

    since_ns: int | None = None
    until_ns: int | None = None
    """Exclusive upper bound."""
    kinds: tuple[str, ...] = ()
    """Event kinds (case-insensitive) and/or ``"alert"``; empty means everything."""
    pids: tuple[int, ...] = ()
    vm: str | None = None
    host: str | None = None
    limit: int | None = None


@contextlib.contextmanager
def open_timeline(path: str | Path) -> Iterator[sqlite3.Connection]:
    """Open a timeline database read-only and check it has the vmwatch tables.

    Raises:
        FileNotFoundError: no such file.
        TimelineError: not SQLite, or not a vmwatch timeline.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise TimelineError(f"cannot open {path} as a timeline database: {exc}") from None
    try:
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise TimelineError(f"{path} is not a timeline database: {exc}") from None
        if not {"events", "alerts"} <= tables:
            raise TimelineError(f"{path} is not a vmwatch timeline (no events and alerts tables)")
        yield db
    finally:
        db.close()


def host_column(db: sqlite3.Connection, table: str) -> str:
    """``host``, or ``''`` for a table written before hosts were stored (read-only: no migration)."""
    return "host" if any(row[1] == "host" for row in db.execute(f"PRAGMA table_info({table})")) else "''"


def _where(query: TimelineQuery, kinds: Sequence[str], host: str = "host") -> tuple[str, list[Any]]:
    clauses, params = [], []
    if query.since_ns is not None:
        clauses.append("time_ns >= ?")
        params.append(query.since_ns)
    if query.until_ns is not None:
        clauses.append("time_ns < ?")
        params.append(query.until_ns)
    if kinds:
        clauses.append(f"lower(kind) IN ({','.join('?' * len(kinds))})")
        params.extend(kinds)
    if query.pids:
        clauses.append(f"pid IN ({','.join('?' * len(query.pids))})")
        params.extend(query.pids)
    if query.vm is not None:
        clauses.append("vm = ?")
        params.append(query.vm)
    if query.host is not None:
        clauses.append(f"{host} = ?")
        params.append(query.host)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query_timeline(path: str | Path, query: TimelineQuery = TimelineQuery()) -> list[TimelineEntry]:
    """Events and alerts matching ``query``, in time order.

    Raises:
        TimelineError: the database cannot be read.
    """
    kinds = [k.lower() for k in query.kinds]
    want_alerts = not kinds or ALERT_KIND in kinds or "alerts" in kinds
    event_kinds = [k for k in kinds if k not in (ALERT_KIND, "alerts")]
    want_events = not kinds or bool(event_kinds)
    if not want_events and not want_alerts:
        return []
    with open_timeline(path) as db:
        try:
            parts, params = [], []
            if want_events:
                host = host_column(db, "events")
                where, p = _where(query, event_kinds, host)
                parts.append(f"SELECT 0, vm, time_ns, seq, kind, vcpu, pid, comm, NULL, NULL, NULL, details, {host}"
                             " FROM events" + where)
                params += p
            if want_alerts:
                host = host_column(db, "alerts")
                where, p = _where(query, [], host)
                parts.append("SELECT 1, vm, time_ns, seq, 'alert', NULL, pid, comm, rule, severity, message, details,"
                             f" {host} FROM alerts" + where)
                params += p
            sql = " UNION ALL ".join(parts) + " ORDER BY 3, 4, 1"
            if query.limit is not None:
                sql += " LIMIT ?"
                params.append(query.limit)
            rows = db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise TimelineError(f"cannot query {path}: {exc}") from None
    return [_entry(row) for row in rows]


def _entry(row: tuple[Any, ...]) -> TimelineEntry:
    is_alert, vm, time_ns, seq, kind, vcpu, pid, comm, rule, severity, message, details, host = row
    try:
        parsed = json.loads(details) if details else {}
    except (TypeError, ValueError):
        parsed = {"raw": details}
    if not isinstance(parsed, dict):
        parsed = {"value": parsed}
    return TimelineEntry(source="alert" if is_alert else "event", vm=vm, host=host, time_ns=time_ns, seq=seq,
                         kind=kind, vcpu=vcpu, pid=pid, comm=comm, rule=rule, severity=severity, message=message,
                         details=parsed)


@attrs.frozen
class BucketCount:
    bucket_ns: int
    """Start of the bucket (Unix ns, a multiple of the bucket size)."""
    source: str
    """``"event"`` or ``"alert"``."""
    kind: str
    """Event kind, or the alert's severity."""
    count: int


def bucket_counts(path: str | Path, bucket_ns: int, query: TimelineQuery = TimelineQuery()) -> list[BucketCount]:
    """Counts per time bucket and kind: events by kind, alerts by severity (counted in SQLite).

    Raises:
        TimelineError: the database cannot be read, or the bucket is not positive.
    """
    if bucket_ns <= 0:
        raise TimelineError(f"bucket must be positive, not {bucket_ns!r} ns")
    kinds = [k.lower() for k in query.kinds]
    event_kinds = [k for k in kinds if k not in (ALERT_KIND, "alerts")]
    out: list[BucketCount] = []
    with open_timeline(path) as db:
        try:
            if not kinds or event_kinds:
                where, params = _where(query, event_kinds, host_column(db, "events"))
                for b, kind, n in db.execute(
                    f"SELECT (time_ns / ?) * ?, kind, count(*) FROM events{where} GROUP BY 1, 2 ORDER BY 1, 2",
                    [bucket_ns, bucket_ns, *params],
                ):
                    out.append(BucketCount(b, "event", kind, n))
            if not kinds or len(event_kinds) < len(kinds):
                where, params = _where(query, [], host_column(db, "alerts"))
                for b, kind, n in db.execute(
                    f"SELECT (time_ns / ?) * ?, severity, count(*) FROM alerts{where} GROUP BY 1, 2 ORDER BY 1, 2",
                    [bucket_ns, bucket_ns, *params],
                ):
                    out.append(BucketCount(b, "alert", kind, n))
        except sqlite3.DatabaseError as exc:
            raise TimelineError(f"cannot query {path}: {exc}") from None
    return out
