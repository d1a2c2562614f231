"""The two timeline stores a query reads: a SQLite file (read-only) or a ``postgresql://`` database.

Both hold the same tables and columns (vmwatch/engine/sinks.py, vmwatch/timeline/pg_schema.py), so
the queries in query.py are one SQL text each; a :class:`Store` supplies what differs: the
parameter mark, the ``host`` expression (old SQLite files have none) and how to run a statement.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import attrs

from vmwatch.errors import TimelineError
from vmwatch.timeline import pg_schema


@attrs.frozen(kw_only=True)
class Store:
    name: str
    """What messages call it: the file, or the URL without its password."""
    mark: str
    """The parameter placeholder: ``?`` (sqlite3) or ``%s`` (psycopg)."""
    hosts: dict[str, str]
    """The ``host`` expression per table (``''`` for a SQLite table written before hosts)."""
    details: str
    """The ``details`` column as text."""
    collate: str
    """What makes text sort by code point (SQLite's default; ``COLLATE "C"`` on PostgreSQL)."""
    fetch: Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
    """Run one statement, return its rows; raises :class:`TimelineError`."""


@contextlib.contextmanager
def open_timeline(path: str | Path) -> Iterator[sqlite3.Connection]:
    """Open a SQLite timeline read-only and check it has the vmwatch tables.

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


@contextlib.contextmanager
def open_store(db: str | Path) -> Iterator[Store]:
    """The store ``db`` names: a ``postgresql://`` URL, else a SQLite file.

    Raises:
        FileNotFoundError: no such SQLite file.
        TimelineError: unreachable, malformed, not a vmwatch timeline, or a newer schema.
    """
    if pg_schema.is_postgres_url(db):
        with _postgres(str(db)) as store:
            yield store
        return
    if isinstance(db, str) and "://" in db:
        raise TimelineError(f"unknown database URL {pg_schema.redacted(db)} (a SQLite file, or postgresql://...)")
    with open_timeline(db) as conn:
        def fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise TimelineError(f"cannot query {db}: {exc}") from None

        yield Store(name=str(db), mark="?", details="details", collate="", fetch=fetch,
                    hosts={t: host_column(conn, t) for t in ("events", "alerts")})


@contextlib.contextmanager
def _postgres(url: str) -> Iterator[Store]:
    import psycopg

    name = pg_schema.redacted(url)
    conn = pg_schema.connect(url)
    try:
        try:
            conn.read_only = True
            pg_schema.check_readable(conn, url)
        except psycopg.Error as exc:
            raise TimelineError(f"cannot read {name}: {pg_schema.first_line(exc)}") from None

        def fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall()
            except psycopg.Error as exc:
                raise TimelineError(f"cannot query {name}: {pg_schema.first_line(exc)}") from None

        yield Store(name=name, mark="%s", details="details::text", collate=' COLLATE "C"', fetch=fetch,
                    hosts={"events": "host", "alerts": "host"})
    finally:
        conn.close()
