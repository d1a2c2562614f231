"""Draw event and alert counts per time bucket as a PNG (matplotlib, Agg backend: no display needed).

Two panels share the time axis: events stacked by kind on top, alerts stacked by severity below,
so a burst of alerts lines up with the activity that caused it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path

from vmwatch.errors import TimelineError
from vmwatch.text import shown
from vmwatch.timeline.pg_schema import is_postgres_url, redacted
from vmwatch.timeline.query import BucketCount, TimelineQuery, bucket_counts

MAX_BUCKETS = 5000
MAX_KINDS = 10
"""Event kinds beyond the most frequent ten are drawn together as "other"."""
SEVERITY_COLOURS = {"info": "#4c78a8", "warning": "#f58518", "error": "#e45756", "critical": "#7b0d1e"}
SEVERITY_ORDER = ("info", "warning", "error", "critical")


def _label_bucket(bucket_ns: int) -> str:
    for unit, ns in (("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000)):
        if bucket_ns % ns == 0:
            return f"{bucket_ns // ns}{unit}"
    return f"{bucket_ns}ns"


def _db_name(db: str | Path) -> str:
    return redacted(db) if is_postgres_url(db) else Path(db).name


def _series(counts: list[BucketCount], source: str, order: list[str]) -> dict[str, dict[int, int]]:
    series: dict[str, dict[int, int]] = {name: defaultdict(int) for name in order}
    for c in counts:
        if c.source != source:
            continue
        name = c.kind if c.kind in series else "other"
        series.setdefault(name, defaultdict(int))[c.bucket_ns] += c.count
    return series


def draw_trend(
    db: str | Path,
    out: str | Path,
    *,
    bucket_ns: int,
    query: TimelineQuery = TimelineQuery(),
    size: tuple[int, int] = (1200, 700),
    title: str | None = None,
    by: str | None = None,
) -> dict[str, int]:
    """Write the trend chart of ``db`` to ``out`` (PNG); return totals per kind drawn (with
    ``by="vm"``/``"host"``: per guest or host, both panels stacked by it).

    Raises:
        TimelineError: nothing in range, too many buckets, or an unreadable database.
    """
    counts = bucket_counts(db, bucket_ns, query, by=by)
    if not counts:
        name = redacted(db) if is_postgres_url(db) else db
        raise TimelineError(f"nothing to draw: {name} has no events or alerts in the selected range")
    first = min(c.bucket_ns for c in counts)
    last = max(c.bucket_ns for c in counts)
    nbuckets = (last - first) // bucket_ns + 1
    if nbuckets > MAX_BUCKETS:
        raise TimelineError(f"{nbuckets} buckets of {_label_bucket(bucket_ns)} is too many to draw; use a larger --bucket")

    totals: dict[str, int] = defaultdict(int)
    for c in counts:
        totals[c.kind if c.source == "event" else f"alert:{c.kind}"] += c.count
    event_kinds = sorted({c.kind for c in counts if c.source == "event"}, key=lambda k: -totals[k])
    events = _series(counts, "event", event_kinds[:MAX_KINDS])
    severities = [s for s in SEVERITY_ORDER if totals.get(f"alert:{s}")]
    severities += sorted({c.kind for c in counts if c.source == "alert"} - set(severities))
    alerts = _series(counts, "alert", severities)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    buckets = [first + i * bucket_ns for i in range(nbuckets)]
    xs = [dt.datetime.fromtimestamp(b / 1e9, dt.timezone.utc) for b in buckets]
    width = bucket_ns / 86_400e9 * 0.9  # matplotlib dates are in days
    dpi = 100
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi,
                                      height_ratios=(3, 2), layout="constrained")
    try:
        for axis, series, colours, what in (
            (top, events, None, "events"),
            (bottom, alerts, SEVERITY_COLOURS, "alerts"),
        ):
            base = [0] * nbuckets
            for name, per_bucket in series.items():
                heights = [per_bucket.get(b, 0) for b in buckets]
                if not any(heights):
                    continue
                colour = colours.get(name) if colours else None
                axis.bar(xs, heights, width=width, bottom=base, label=f"{shown(name)} ({sum(heights)})",
                         color=colour, align="edge")
                base = [a + h for a, h in zip(base, heights)]
            axis.set_ylabel(f"{what} per {_label_bucket(bucket_ns)}")
            axis.grid(axis="y", alpha=0.3)
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
            if any(base):
                axis.set_ylim(0, max(base) * 1.08)
                axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                            title=by or ("kind" if what == "events" else "severity"))
            else:
                axis.text(0.5, 0.5, f"no {what}", transform=axis.transAxes, ha="center", va="center",
                          color="grey")
        locator = mdates.AutoDateLocator()
        bottom.xaxis.set_major_locator(locator)
        bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=dt.timezone.utc))
        bottom.set_xlabel("time (UTC)")
        fig.suptitle(title or f"vmwatch trend: {_db_name(db)}, {_label_bucket(bucket_ns)} buckets")
        fig.savefig(out, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return dict(totals)
