"""``vmwatch timeline DB``: events and alerts from a timeline (SQLite file or PostgreSQL URL), filtered, in
time order; ``--by vm|host``: how many per guest or per host instead."""

from __future__ import annotations

import argparse
import csv
import json

HELP = "query the timeline a watch wrote (SQLite file or postgresql://...): events and alerts by time, kind, pid, guest"

CSV_FIELDS = ("time", "time_ns", "source", "vm", "host", "seq", "kind", "vcpu", "pid", "comm", "rule", "severity",
              "message", "details")
SEVERITIES = ("critical", "error", "warning", "info")
BY_FIELDS = ("host", "vm", "events", "alerts", *SEVERITIES, "first", "last")


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    """The timeline to read: positional, else ``$VMWATCH_DB`` (what ``watch --db`` defaults to)."""
    import os

    from vmwatch.cli.timeline_db import ENV

    default = os.environ.get(ENV) or None
    parser.add_argument("db", nargs="?" if default else None, default=default,
                        help=f"timeline: a SQLite file or postgresql://user@host/dbname (watch --db; default ${ENV})")


def configure(parser: argparse.ArgumentParser) -> None:
    add_db_argument(parser)
    parser.add_argument("--since", metavar="TIME", help="from this time: ISO 8601 (UTC if no zone), 15m ago, or ns")
    parser.add_argument("--until", metavar="TIME", help="before this time (same forms as --since)")
    parser.add_argument("--kind", action="append", default=[], metavar="KIND",
                        help="only this event kind (Exec, ProcessStart...) or 'alert'; repeatable")
    parser.add_argument("--pid", action="append", type=int, default=[], help="only this pid; repeatable")
    parser.add_argument("--vm", help="only this VM (a live guest's QMP -name, else the watched target spec)")
    parser.add_argument("--host", help="only VMs watched from this host")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N rows")
    parser.add_argument("--by", choices=("vm", "host"),
                        help="counts per guest (with its host) or per host instead of the rows")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per line")
    output.add_argument("--csv", action="store_true",
                        help="CSV with a header row (a data format: exact text, quoted, like --json)")


def build_query(args: argparse.Namespace):
    from vmwatch.timeline.query import TimelineQuery
    from vmwatch.timeline.timespec import parse_time

    return TimelineQuery(
        since_ns=parse_time(args.since) if args.since else None,
        until_ns=parse_time(args.until) if args.until else None,
        kinds=tuple(args.kind), pids=tuple(args.pid or ()), vm=getattr(args, "vm", None),
        host=getattr(args, "host", None), limit=getattr(args, "limit", None),
    )


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.timeline.query import query_timeline
    from vmwatch.timeline.timespec import format_time

    if args.by:
        return _breakdown(args, env)
    entries = query_timeline(args.db, build_query(args))
    out = env.stdout
    if args.json:
        for entry in entries:
            out.write(json.dumps({"time": format_time(entry.time_ns), **entry.as_dict()}) + "\n")
    elif args.csv:
        writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            row = entry.as_dict()
            row["details"] = json.dumps(row["details"], sort_keys=True)
            writer.writerow({"time": format_time(entry.time_ns), **row})
    else:
        from vmwatch.text import shown

        # the table is for people: guest strings escaped (--json and --csv keep them exact)
        vms = {entry.vm for entry in entries}
        hosts = {entry.host for entry in entries}
        for entry in entries:
            who = f"{entry.pid}" if entry.pid is not None else "-"
            if entry.comm:
                who += f"/{shown(entry.comm)}"
            vm = f"{shown(entry.vm)}  " if len(vms) > 1 else ""
            if vm and len(hosts) > 1:
                vm = f"{shown(entry.host)}/{vm}"
            out.write(f"{format_time(entry.time_ns)}  {vm}{shown(entry.kind):<13} {who:<20} {shown(entry.summary())}\n")
        if not entries:
            env.stderr.write("vmwatch: no events or alerts match\n")
    return 0


def _breakdown(args: argparse.Namespace, env) -> int:
    from vmwatch.timeline.query import breakdown
    from vmwatch.timeline.timespec import format_time

    rows = []
    for group in breakdown(args.db, args.by, build_query(args)):
        row = {"host": group.host, "vm": group.vm, "events": group.events, "alerts": sum(group.alerts.values()),
               **{sev: group.alerts.get(sev, 0) for sev in SEVERITIES},
               "first": format_time(group.first_ns), "last": format_time(group.last_ns)}
        if args.by == "host":
            del row["vm"]
        rows.append(row)
    out = env.stdout
    fields = [f for f in BY_FIELDS if args.by == "vm" or f != "vm"]
    if args.json:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    elif args.csv:
        writer = csv.DictWriter(out, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from vmwatch.text import shown

        names = [shown(row["host"]) + (f"/{shown(row['vm'])}" if args.by == "vm" else "") or "-" for row in rows]
        width = max([len(args.by), *map(len, names)])
        out.write(f"{args.by:<{width}}  {'events':>10}  {'alerts':>8}  " + "  ".join(f"{s:>8}" for s in SEVERITIES)
                  + f"  {'first':<24}  last\n")
        for name, row in zip(names, rows):
            out.write(f"{name:<{width}}  {row['events']:>10}  {row['alerts']:>8}  "
                      + "  ".join(f"{row[s]:>8}" for s in SEVERITIES) + f"  {row['first']:<24}  {row['last']}\n")
        if not rows:
            env.stderr.write("vmwatch: no events or alerts match\n")
    return 0
