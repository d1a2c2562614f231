"""Sinks: where alerts and notable events go.

A sink is an object with ``name``, ``async send(item)`` (an :class:`Alert` or an
:class:`EventRecord`), ``async aclose()`` and optionally ``async flush()`` (called whenever its
queue runs empty). The pump feeds each sink from its own bounded trio
memory channel in its own task, so a slow sink never stalls another; alerts are never dropped
(the pump waits), events are dropped and counted when a sink's channel is full.

SQLite timeline schema (stable: ``vmwatch timeline``/``replay`` read it). WAL mode::

    events(id INTEGER PRIMARY KEY, vm TEXT, time_ns INTEGER, seq INTEGER, kind TEXT,
           vcpu INTEGER, pid INTEGER, comm TEXT, details TEXT, host TEXT)  -- details: JSON object
    alerts(id INTEGER PRIMARY KEY, vm TEXT, time_ns INTEGER, seq INTEGER, rule TEXT,
           severity TEXT, pid INTEGER, comm TEXT, message TEXT, details TEXT, host TEXT)

``kind`` is the event class name (``ProcessStart``, ``Exec``, ``ProcessExit``, ``ModuleLoad``,
``RegisterWrite``, ``Demotion``, ``Dropped``, ``RuleFailure``, ``SourceEnded``...); ``severity``
is ``info``/``warning``/``error``/``critical``. ``time_ns`` is the source's clock (wall-clock
nanoseconds for live guests). Several runs and VMs may share one file: ``vm`` is the guest's QMP
name (else the target spec), ``host`` the watching machine. ``host`` came later: opening an older
file for writing adds it (``''`` in old rows); readers of an old file read ``''``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import IO, Any, Protocol

import attrs
import structlog

from vmwatch.engine.alerts import Alert
from vmwatch.events import Event


@attrs.frozen(kw_only=True)
class EventRecord:
    """An event as stored: flat, JSON-able."""

    vm: str
    time_ns: int
    seq: int
    kind: str
    host: str = ""
    vcpu: int = 0
    pid: int | None = None
    comm: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_event(cls, event: Event, vm: str, host: str = "") -> EventRecord:
        details = {}
        for field in attrs.fields(type(event)):
            name = field.name
            if name in ("seq", "time_ns", "vcpu", "pid", "comm"):
                continue
            details[name] = jsonable(getattr(event, name))
        return cls(vm=vm, host=host, time_ns=event.time_ns, seq=event.seq, kind=type(event).__name__, vcpu=event.vcpu,
                   pid=getattr(event, "pid", None), comm=getattr(event, "comm", None) or None, details=details)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def jsonable(value: Any) -> Any:
    """Values for JSON details: bytes as hex, enums by name, classes by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, type):
        return value.__name__
    if hasattr(value, "name") and hasattr(value, "value"):  # enum / flag
        return value.name
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return repr(value)


class Sink(Protocol):
    name: str

    async def send(self, item: Alert | EventRecord) -> None: ...

    async def aclose(self) -> None: ...


class ListSink:
    """Keeps everything in memory (tests, the demo's summary)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.alerts: list[Alert] = []
        self.events: list[EventRecord] = []
        self.closed = False

    async def send(self, item: Alert | EventRecord) -> None:
        (self.alerts if isinstance(item, Alert) else self.events).append(item)

    async def aclose(self) -> None:
        self.closed = True


class JsonLinesSink:
    """One JSON object per line through structlog (``event`` is ``"alert"`` or the event kind)."""

    def __init__(self, stream: IO[str], *, events: bool = True, name: str = "json") -> None:
        self.name = name
        self._stream = stream
        self._events = events
        self._log = structlog.wrap_logger(
            structlog.PrintLogger(stream),
            processors=[structlog.processors.JSONRenderer(sort_keys=False)],
            wrapper_class=structlog.BoundLogger,
        )

    async def send(self, item: Alert | EventRecord) -> None:
        if isinstance(item, Alert):
            self._log.msg("alert", **item.as_dict())
        elif self._events:
            data = item.as_dict()
            self._log.msg(data.pop("kind"), **data)

    async def aclose(self) -> None:
        self._stream.flush()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time_ns INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, vcpu INTEGER, pid INTEGER, comm TEXT, details TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS alerts(
    id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time_ns INTEGER NOT NULL, seq INTEGER NOT NULL,
    rule TEXT NOT NULL, severity TEXT NOT NULL, pid INTEGER, comm TEXT, message TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}', host TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS events_time ON events(vm, time_ns);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, time_ns);
CREATE INDEX IF NOT EXISTS alerts_time ON alerts(vm, time_ns);
"""


def _add_host_column(db: sqlite3.Connection) -> None:
    """Migrate a timeline written before ``host`` existed (its rows get ``''``)."""
    for table in ("events", "alerts"):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "host" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN host TEXT NOT NULL DEFAULT ''")


class SqliteSink:
    """The SQLite timeline (WAL). Rows are committed in batches: every ``batch`` rows and at close."""

    def __init__(self, path: str | Path, *, batch: int = 256, name: str = "sqlite") -> None:
        self.name = name
        self.path = Path(path)
        self._batch = batch
        self._pending = 0
        self.closed = False
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _add_host_column(self._db)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            from vmwatch.errors import VmwatchError

            raise VmwatchError(f"cannot use {self.path} as a timeline database: {exc}") from exc
        self._db.execute("BEGIN")

    async def send(self, item: Alert | EventRecord) -> None:
        if isinstance(item, Alert):
            self._db.execute(
                "INSERT INTO alerts(vm, host, time_ns, seq, rule, severity, pid, comm, message, details)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (item.vm, item.host, item.time_ns, item.seq, item.rule, item.severity.name.lower(), item.pid, item.comm,
                 item.message, json.dumps(jsonable(item.details))),
            )
        else:
            self._db.execute(
                "INSERT INTO events(vm, host, time_ns, seq, kind, vcpu, pid, comm, details)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (item.vm, item.host, item.time_ns, item.seq, item.kind, item.vcpu, item.pid, item.comm,
                 json.dumps(item.details)),
            )
        self._pending += 1
        if self._pending >= self._batch:
            await self.flush()

    async def flush(self) -> None:
        """Commit (the pump calls this whenever the sink's queue runs empty)."""
        if self._pending:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0

    async def aclose(self) -> None:
        self.closed = True
        self._db.execute("COMMIT")
        self._db.close()
