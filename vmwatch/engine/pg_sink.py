"""The PostgreSQL timeline sink: the SQLite timeline's rows, written by any number of hosts to one database.

psycopg's blocking API runs in ``trio.to_thread`` (one call per batch), behind the sink's own
queue, so the pump never waits on the network:

* :meth:`PostgresSink.send` only appends to the queue (the longest append is measured:
  ``stats.longest_put_s``). Events beyond ``max_queue`` waiting are dropped and counted; alerts
  are always queued.
* The writer task takes up to ``batch`` rows at a time and COPYs them in one transaction, which
  also records the batch's number in ``vmwatch_writers``. Rows leave the queue only once their
  COMMIT returned: nothing is counted as written that was not committed.
* A lost connection is retried with backoff (``backoff`` s doubling to ``max_backoff``), then
  the batch in flight is re-sent, unless ``vmwatch_writers`` shows its COMMIT got through
  before the link broke (so it is neither lost nor written twice).
* A row the server refuses as data (not a connection problem) is rejected alone: the batch is
  split in halves until it is, the others commit, and it is counted (``stats.rejected``) and logged.
* :meth:`aclose` waits up to ``close_timeout`` s for the queue to empty; what is left is counted
  in ``stats.unwritten`` (``stats.unwritten_alerts`` for alerts) and reported by the CLI.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import socket
import time
import uuid
from typing import Any

import attrs
import structlog
import trio

from vmwatch.engine.alerts import Alert
from vmwatch.engine.sinks import EventRecord, jsonable
from vmwatch.errors import TimelineError
from vmwatch.timeline import pg_schema

log = structlog.get_logger()


@attrs.define
class PostgresStats:
    """What the sink did; the CLI prints it after a watch."""

    committed: int = 0
    """Rows committed (events and alerts)."""
    committed_alerts: int = 0
    dropped: int = 0
    """Events not queued because ``max_queue`` events were already waiting (the server lagged or was away)."""
    rejected: int = 0
    """Rows the server refused as data (logged); alerts among them are also in ``rejected_alerts``."""
    rejected_alerts: int = 0
    reconnects: int = 0
    resent: int = 0
    """Batches sent again after a reconnect."""
    batches: int = 0
    longest_put_s: float = 0.0
    """The longest :meth:`PostgresSink.send`: what the pump waited for the sink at worst."""
    puts: int = 0
    put_s: float = 0.0
    """Seconds spent in all the puts (``put_s / puts``: the mean)."""
    longest_queue: int = 0
    unwritten: int = 0
    """Rows still queued when :meth:`PostgresSink.aclose` gave up waiting for the server."""
    unwritten_alerts: int = 0


def _row(item: Alert | EventRecord) -> tuple[str, tuple[Any, ...]]:
    if isinstance(item, Alert):
        return "alerts", (item.vm, item.host, item.time_ns, item.seq, item.rule, item.severity.name.lower(),
                          item.pid, item.comm, item.message, json.dumps(jsonable(item.details)))
    return "events", (item.vm, item.host, item.time_ns, item.seq, item.kind, item.vcpu, item.pid, item.comm,
                      json.dumps(item.details))


_GAVE_UP = object()

_COPY = {table: f"COPY {table} ({', '.join(columns)}) FROM STDIN"
         for table, columns in (("events", pg_schema.EVENT_COLUMNS), ("alerts", pg_schema.ALERT_COLUMNS))}


class PostgresSink:
    """See the module docstring. :meth:`connect`, then run :meth:`write` in a task (open_sink.py does both)."""

    def __init__(self, url: str, *, batch: int = 2000, max_queue: int = 100_000, backoff: float = 0.1,
                 max_backoff: float = 5.0, close_timeout: float = 30.0, name: str = "postgresql") -> None:
        self.name = name
        self.url = url
        self.shown = pg_schema.redacted(url)
        self.stats = PostgresStats()
        self._batch = batch
        self._max_queue = max_queue
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._close_timeout = close_timeout
        self._queue: collections.deque[Alert | EventRecord] = collections.deque()
        self._queued_events = 0
        self._wake = trio.Event()
        self._closing = False
        self.closed = False
        """:meth:`aclose` was called."""
        self._done = trio.Event()
        self._conn: Any = None
        self._writer_id = f"{socket.gethostname()}/{uuid.uuid4()}"
        self._batch_no = 0
        self._sent = 0
        """The batch number last handed to the server (a reconnect then re-sends it)."""
        self._partitions: set[tuple[str, int]] = set()

    async def connect(self) -> None:
        """Connect and create or migrate the schema (raises :class:`~vmwatch.errors.TimelineError`:
        one line for the CLI); then run :meth:`write` in a task."""
        self._conn = await trio.to_thread.run_sync(self._connect)

    def _connect(self) -> Any:
        """The first connection: the schema is created or migrated here."""
        conn = pg_schema.connect(self.url)
        try:
            pg_schema.migrate(conn, self.url)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- the pump's side: never waits -------------------------------------------------------

    async def send(self, item: Alert | EventRecord) -> None:
        started = time.perf_counter()
        if isinstance(item, Alert):
            self._queue.append(item)
        elif self._queued_events >= self._max_queue:
            self.stats.dropped += 1
        else:
            self._queue.append(item)
            self._queued_events += 1
        self._wake.set()
        stats = self.stats
        stats.longest_queue = max(stats.longest_queue, len(self._queue))
        spent = time.perf_counter() - started
        stats.puts += 1
        stats.put_s += spent
        stats.longest_put_s = max(stats.longest_put_s, spent)

    async def flush(self) -> None:
        """Nothing to wait for: the writer commits as rows arrive."""

    async def aclose(self) -> None:
        """Let the writer empty the queue (at most ``close_timeout`` s), then close the connection."""
        self.closed = self._closing = True
        self._wake.set()
        with trio.move_on_after(self._close_timeout):
            await self._done.wait()
        if not self._done.is_set():
            self._give_up()

    def _give_up(self) -> None:
        self.stats.unwritten = len(self._queue)
        self.stats.unwritten_alerts = sum(isinstance(i, Alert) for i in self._queue)
        if self.stats.unwritten:
            log.error("postgresql sink gave up", db=self.shown, unwritten=self.stats.unwritten,
                      alerts=self.stats.unwritten_alerts)
        self._queue.clear()
        self._closing = True
        self._done.set()

    # -- the writer ---------------------------------------------------------------------------

    async def write(self) -> None:
        """The writer task: batches out of the queue into the database until :meth:`aclose`.
        Never raises (an unexpected error is logged, and what is queued counted as unwritten)."""
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                batch = list(itertools.islice(self._queue, self._batch))
                await self._deliver(batch)
                if self._done.is_set():  # aclose gave up while we retried
                    return
                for _ in batch:
                    if isinstance(self._queue.popleft(), EventRecord):
                        self._queued_events -= 1
        except Exception as exc:
            log.error("postgresql sink failed", db=self.shown, error=f"{type(exc).__name__}: {exc}")
            self._give_up()
        finally:
            self._done.set()
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close)

    async def _deliver(self, batch: list[Alert | EventRecord]) -> None:
        """Commit ``batch``: whole, or, when the server refuses a row as data, in halves until the
        refused rows are alone (counted and logged). Connection problems are retried in :meth:`_commit`."""
        chunks = [batch]
        while chunks:
            chunk = chunks[0]
            refusal = await self._commit(chunk)
            if refusal is _GAVE_UP:
                return
            if refusal is None:
                self.stats.batches += 1
                self.stats.committed += len(chunk)
                self.stats.committed_alerts += sum(isinstance(item, Alert) for item in chunk)
                chunks.pop(0)
            elif len(chunk) > 1:
                half = len(chunk) // 2
                chunks[0:1] = [chunk[:half], chunk[half:]]
            else:
                item = chunk[0]
                self.stats.rejected += 1
                self.stats.rejected_alerts += isinstance(item, Alert)
                log.error("postgresql refused a row", db=self.shown, table=_row(item)[0], vm=item.vm,
                          error=pg_schema.first_line(refusal))
                chunks.pop(0)

    async def _commit(self, items: list[Alert | EventRecord]) -> Exception | object | None:
        """One transaction for ``items``, through as many reconnects as it takes; returns None once
        committed, the server's refusal of the data, or ``_GAVE_UP`` when :meth:`aclose` stopped waiting."""
        import psycopg

        self._batch_no += 1
        number = self._batch_no
        delay = self._backoff
        while not self._done.is_set():
            try:
                if self._conn is None:
                    self._conn = await trio.to_thread.run_sync(pg_schema.connect, self.url)
                    if await trio.to_thread.run_sync(self._committed, number):
                        return None  # its COMMIT got through before the link broke
                    self.stats.resent += self._sent == number
                await trio.to_thread.run_sync(self._copy, items, number)
                return None
            except (psycopg.OperationalError, psycopg.InterfaceError, TimelineError) as exc:
                await self._lost(exc)
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._max_backoff)
            except psycopg.Error as exc:
                self._partitions.clear()
                return exc
        return _GAVE_UP

    async def _lost(self, exc: Exception) -> None:
        self._partitions.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self.stats.reconnects += 1
            log.warning("postgresql connection lost; reconnecting", db=self.shown, error=pg_schema.first_line(exc))
            await trio.to_thread.run_sync(_close_quietly, conn)

    def _committed(self, number: int) -> bool:
        """Did batch ``number`` commit before the link broke?"""
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute("SELECT last_batch FROM vmwatch_writers WHERE writer = %s", (self._writer_id,))
            row = cur.fetchone()
        return row is not None and row[0] >= number

    def _copy(self, items: list[Alert | EventRecord], number: int) -> None:
        """One transaction (in a worker thread): missing day partitions, COPY per table, this
        writer's batch number."""
        self._sent = number
        conn = self._conn
        rows = [_row(item) for item in items]  # JSON encoding here, not in trio's thread
        by_table: dict[str, list[tuple[Any, ...]]] = {"events": [], "alerts": []}
        for table, values in rows:
            by_table[table].append(values)
        with conn.transaction(), conn.cursor() as cur:
            new = {(table, pg_schema.day_of(values[2])) for table, values in rows} - self._partitions
            for table in ("events", "alerts"):
                days = {day for t, day in new if t == table}
                if days:
                    pg_schema.ensure_partitions(cur, table, days)
            for table, values in by_table.items():
                if values:
                    with cur.copy(_COPY[table]) as copy:
                        for value in values:
                            copy.write_row(value)
            cur.execute("INSERT INTO vmwatch_writers VALUES (%s, %s, %s, %s) ON CONFLICT (writer) DO UPDATE"
                        " SET last_batch = excluded.last_batch, updated_ns = excluded.updated_ns",
                        (self._writer_id, socket.gethostname(), number, time.time_ns()))
        self._partitions |= new


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass
