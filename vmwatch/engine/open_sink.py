"""The timeline sink a ``--db`` string names: a ``postgresql://`` URL or a SQLite file (the default)."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import trio

from vmwatch.engine.pg_sink import PostgresSink
from vmwatch.engine.sinks import SqliteSink
from vmwatch.errors import TimelineError, bare_exception
from vmwatch.timeline import pg_schema


@contextlib.asynccontextmanager
async def open_timeline_sink(db: str | None,
                             **pg_options: Any) -> AsyncIterator[SqliteSink | PostgresSink | None]:
    """Open the sink for ``db`` (None: no timeline, yields None); a watch (single or fleet) closes it, else leaving the block does.

    A PostgreSQL sink's writer runs in a nursery of this block, so the block ends when the rows
    are written (or the sink gave up, see :class:`PostgresSink`).

    Raises:
        TimelineError: a bad URL or scheme, a server down or refusing us, a newer schema, a file
            that is not a timeline. Raised before any guest is touched.
    """
    if db is None:
        yield None
        return
    if pg_schema.is_postgres_url(db):
        sink = PostgresSink(db, **pg_options)
        await sink.connect()
        with bare_exception():  # the writer never raises
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink.write)
                try:
                    yield sink
                finally:
                    if not sink.closed:
                        await sink.aclose()
        return
    if "://" in db:
        raise TimelineError(f"unknown database URL {pg_schema.redacted(db)} (a SQLite file, or postgresql://...)")
    sqlite = SqliteSink(db)
    try:
        yield sqlite
    finally:
        if not sqlite.closed:
            await sqlite.aclose()
