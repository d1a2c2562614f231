"""Parse the times and durations users type: ``--since 15m``, ``--until 2026-11-25T21:00Z``, ``--bucket 1m``."""

from __future__ import annotations

import datetime as dt
import re
import time

from vmwatch.errors import TimelineError

_UNITS_NS = {
    "ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
    "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h|d)")


def parse_duration(text: str) -> int:
    """``"90s"``, ``"1m"``, ``"1h30m"``, ``"250ms"`` -> nanoseconds (> 0).

    Raises:
        TimelineError: not a duration.
    """
    text = text.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text or total < 1:
        raise TimelineError(f"bad duration {text!r} (examples: 30s, 1m, 1h30m, 250ms)")
    return int(total)


def parse_time(text: str, *, now_ns: int | None = None) -> int:
    """A point in time as Unix nanoseconds.

    Accepts an ISO 8601 date/time (``2026-11-25``, ``2026-11-25T21:05:00Z``; no zone means UTC),
    a duration meaning that long before now (``15m``, ``2h``), or plain integer nanoseconds.

    Raises:
        TimelineError: none of these.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text and text[-1].isalpha() and text[0].isdigit() and "-" not in text and ":" not in text:
        now = time.time_ns() if now_ns is None else now_ns
        return now - parse_duration(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimelineError(
            f"bad time {text!r} (examples: 2026-11-25T21:05:00Z, 15m for 15 minutes ago, Unix nanoseconds)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def format_time(time_ns: int) -> str:
    """ISO 8601 UTC with milliseconds: ``2026-11-25T21:05:00.123Z``."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    try:
        when = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return str(time_ns)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns // 1_000_000:03d}Z"
