"""The ``--db`` of ``vmwatch watch`` (also ``$VMWATCH_DB``) and what is said about it after a watch."""

from __future__ import annotations

import argparse
import os
from typing import Any

ENV = "VMWATCH_DB"


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="FILE|URL", default=os.environ.get(ENV) or None,
                        help="also write events and alerts to this timeline: a SQLite file, or "
                             f"postgresql://user@host/dbname for a fleet database (default: ${ENV})")


def db_label(db: str | None) -> str | None:
    """What to print for ``db``: a URL without its password."""
    from vmwatch.timeline.pg_schema import redacted

    return redacted(db) if db else db


def sink_report(sink: Any) -> tuple[str | None, str | None]:
    """(a line for the summary, a warning for stderr or None) about a PostgreSQL sink; (None, None) for others."""
    stats = getattr(sink, "stats", None)
    if stats is None:
        return None, None
    line = (f"{sink.shown}: {stats.committed:,} rows committed ({stats.committed_alerts:,} alerts) in "
            f"{stats.batches:,} batches, {stats.dropped:,} events dropped, {stats.reconnects} reconnects, "
            f"longest put {stats.longest_put_s * 1e6:,.0f} µs")
    problems = []
    if stats.dropped:
        problems.append(f"{stats.dropped:,} events dropped (the server lagged)")
    if stats.rejected:
        problems.append(f"{stats.rejected:,} rows refused by the server ({stats.rejected_alerts} alerts)")
    if stats.unwritten:
        problems.append(f"{stats.unwritten:,} rows never written ({stats.unwritten_alerts} alerts): "
                        "the server did not come back in time")
    warning = f"vmwatch: {sink.shown}: {'; '.join(problems)}" if problems else None
    return line, warning


def report_db(sink: Any, console: Any, env: Any) -> None:
    """After a watch: the PostgreSQL sink's line on the console (none in --json mode), its problems on stderr."""
    line, warning = sink_report(sink)
    if line is not None and console is not None:
        from rich.text import Text

        console.print(Text(line))
    if warning is not None:
        print(warning, file=env.stderr)
