"""``vmwatch trend DB -o trend.png``: event and alert counts per time bucket as a PNG chart."""

from __future__ import annotations

import argparse
import re

HELP = "draw event and alert counts per time bucket from a timeline (SQLite or postgresql://...) as a PNG"


def configure(parser: argparse.ArgumentParser) -> None:
    from vmwatch.cli.commands.timeline import add_db_argument

    add_db_argument(parser)
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="where to write the chart")
    parser.add_argument("--bucket", default="1m", help="bucket size: 10s, 1m, 1h... (default 1m)")
    parser.add_argument("--since", metavar="TIME", help="from this time: ISO 8601, 15m ago, or ns")
    parser.add_argument("--until", metavar="TIME", help="before this time")
    parser.add_argument("--kind", action="append", default=[], metavar="KIND",
                        help="only this event kind or 'alert'; repeatable")
    parser.add_argument("--pid", action="append", type=int, default=[], help="only this pid; repeatable")
    parser.add_argument("--vm", help="only this VM")
    parser.add_argument("--host", help="only VMs watched from this host")
    parser.add_argument("--by", choices=("vm", "host"),
                        help="stack events and alerts by guest or by host instead of by kind and severity")
    parser.add_argument("--size", default="1200x700", metavar="WxH", help="image size in pixels (default 1200x700)")
    parser.add_argument("--title", help="chart title")


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.cli.commands.timeline import build_query
    from vmwatch.errors import TimelineError
    from vmwatch.timeline.timespec import parse_duration
    from vmwatch.timeline.trend import draw_trend

    match = re.fullmatch(r"(\d{2,5})x(\d{2,5})", args.size)
    if not match:
        raise TimelineError(f"bad --size {args.size!r} (example: 1200x700)")
    args.limit = None
    totals = draw_trend(args.db, args.output, bucket_ns=parse_duration(args.bucket), query=build_query(args),
                        size=(int(match.group(1)), int(match.group(2))), title=args.title, by=args.by)
    from vmwatch.text import shown

    summary = ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
    env.stdout.write(f"wrote {args.output}: {shown(summary)}\n")  # kinds come from the database file
    return 0
