"""Queries over a timeline: the SQLite file the engine's SqliteSink writes (schema in
vmwatch/engine/sinks.py) or the PostgreSQL fleet database (vmwatch/timeline/pg_schema.py), the
same SQL on both (vmwatch/timeline/stores.py).

Events and alerts come back merged in one time order (time_ns, then seq, events before the
alerts they caused). The database is opened read-only, so querying while a watch is writing is
safe (SQLite's WAL, PostgreSQL's MVCC).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import attrs

from vmwatch.errors import TimelineError
from vmwatch.timeline.stores import Store, open_store

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


def _where(query: TimelineQuery, kinds: Sequence[str], store: Store, table: str) -> tuple[str, list[Any]]:
    clauses, params = [], []
    mark = store.mark
    if query.since_ns is not None:
        clauses.append(f"time_ns >= {mark}")
        params.append(query.since_ns)
    if query.until_ns is not None:
        clauses.append(f"time_ns < {mark}")
        params.append(query.until_ns)
    if kinds:
        clauses.append(f"lower(kind) IN ({','.join([mark] * len(kinds))})")
        params.extend(kinds)
    if query.pids:
        clauses.append(f"pid IN ({','.join([mark] * len(query.pids))})")
        params.extend(query.pids)
    if query.vm is not None:
        clauses.append(f"vm = {mark}")
        params.append(query.vm)
    if query.host is not None:
        clauses.append(f"{store.hosts[table]} = {mark}")
        params.append(query.host)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _wanted(query: TimelineQuery) -> tuple[list[str], bool]:
    """The event kinds asked for (empty: all) and whether alerts are."""
    kinds = [k.lower() for k in query.kinds]
    event_kinds = [k for k in kinds if k not in (ALERT_KIND, "alerts")]
    return event_kinds, not kinds or len(event_kinds) < len(kinds)


def query_timeline(db: str | Path, query: TimelineQuery = TimelineQuery()) -> list[TimelineEntry]:
    """Events and alerts matching ``query``, in time order (a SQLite file or a postgresql:// URL).

    Ties in time and seq (several guests) are ordered by source, guest, host and kind, by code
    point on both stores, so both give the same order.

    Raises:
        TimelineError: the database cannot be read.
    """
    event_kinds, want_alerts = _wanted(query)
    want_events = not query.kinds or bool(event_kinds)
    if not want_events and not want_alerts:
        return []
    with open_store(db) as store:
        parts, params = [], []
        if want_events:
            where, p = _where(query, event_kinds, store, "events")
            parts.append(f"SELECT 0 AS src, vm, time_ns, seq, kind, vcpu, pid, comm, NULL AS rule, NULL AS severity,"
                         f" NULL AS message, {store.details} AS details, {store.hosts['events']} AS host"
                         " FROM events" + where)
            params += p
        if want_alerts:
            where, p = _where(query, [], store, "alerts")
            parts.append(f"SELECT 1 AS src, vm, time_ns, seq, 'alert' AS kind, NULL AS vcpu, pid, comm, rule, severity,"
                         f" message, {store.details} AS details, {store.hosts['alerts']} AS host FROM alerts" + where)
            params += p
        text = store.collate
        sql = (f"SELECT * FROM ({' UNION ALL '.join(parts)}) AS timeline"
               f" ORDER BY time_ns, seq, src, vm{text}, host{text}, kind{text}")
        if query.limit is not None:
            sql += f" LIMIT {store.mark}"
            params.append(query.limit)
        rows = store.fetch(sql, params)
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
    """Event kind, or the alert's severity; with ``by``, the guest or host."""
    count: int


BREAKDOWNS = ("vm", "host")
"""What counts can be broken down by besides kind: the guest or the watching host."""


def bucket_counts(db: str | Path, bucket_ns: int, query: TimelineQuery = TimelineQuery(), *,
                  by: str | None = None) -> list[BucketCount]:
    """Counts per time bucket and kind: events by kind, alerts by severity (counted by the database);
    with ``by="vm"`` or ``"host"``, events and alerts by guest or by host instead.

    Raises:
        TimelineError: the database cannot be read, or the bucket is not positive.
    """
    if bucket_ns <= 0:
        raise TimelineError(f"bucket must be positive, not {bucket_ns!r} ns")
    if by is not None and by not in BREAKDOWNS:
        raise TimelineError(f"cannot break down by {by!r} (choose from {', '.join(BREAKDOWNS)})")
    event_kinds, want_alerts = _wanted(query)
    out: list[BucketCount] = []
    with open_store(db) as store:
        mark = store.mark
        for table, source, group, wanted in (("events", "event", "kind", not query.kinds or event_kinds),
                                            ("alerts", "alert", "severity", want_alerts)):
            if not wanted:
                continue
            where, params = _where(query, event_kinds if table == "events" else [], store, table)
            column = {None: group, "vm": "vm", "host": store.hosts[table]}[by]
            for b, kind, n in store.fetch(f"SELECT (time_ns / {mark}) * {mark}, {column}, count(*) FROM {table}{where}"
                                          " GROUP BY 1, 2", [bucket_ns, bucket_ns, *params]):
                out.append(BucketCount(b, source, kind, n))
    out.sort(key=lambda c: (c.source != "event", c.bucket_ns, c.kind))
    return out


@attrs.frozen(kw_only=True)
class GroupCounts:
    """One guest's (or host's) share of the timeline."""

    host: str
    vm: str | None
    """None when broken down by host."""
    events: int
    alerts: dict[str, int]
    """Alerts per severity."""
    first_ns: int
    last_ns: int

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def breakdown(db: str | Path, by: str, query: TimelineQuery = TimelineQuery()) -> list[GroupCounts]:
    """Events and alerts per guest (``by="vm"``: per host and guest) or per host, with the time span.

    Raises:
        TimelineError: the database cannot be read, or ``by`` is not vm or host.
    """
    if by not in BREAKDOWNS:
        raise TimelineError(f"cannot break down by {by!r} (choose from {', '.join(BREAKDOWNS)})")
    event_kinds, want_alerts = _wanted(query)
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}

    def add(host: str, vm: str, n: int, first: int, last: int, severity: str | None) -> None:
        g = groups.setdefault((host, vm if by == "vm" else None),
                              {"events": 0, "alerts": {}, "first_ns": first, "last_ns": last})
        if severity is None:
            g["events"] += n
        else:
            g["alerts"][severity] = g["alerts"].get(severity, 0) + n
        g["first_ns"], g["last_ns"] = min(g["first_ns"], first), max(g["last_ns"], last)

    with open_store(db) as store:
        if not query.kinds or event_kinds:
            where, params = _where(query, event_kinds, store, "events")
            for host, vm, n, first, last in store.fetch(
                    f"SELECT {store.hosts['events']}, vm, count(*), min(time_ns), max(time_ns) FROM events{where}"
                    " GROUP BY 1, 2", params):
                add(host, vm, n, first, last, None)
        if want_alerts:
            where, params = _where(query, [], store, "alerts")
            for host, vm, severity, n, first, last in store.fetch(
                    f"SELECT {store.hosts['alerts']}, vm, severity, count(*), min(time_ns), max(time_ns)"
                    f" FROM alerts{where} GROUP BY 1, 2, 3", params):
                add(host, vm, n, first, last, severity)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    return [GroupCounts(host=host, vm=vm, **g) for (host, vm), g in ordered]
