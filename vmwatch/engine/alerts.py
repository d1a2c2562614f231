"""Alerts: what rules raise and sinks store."""

from __future__ import annotations

from typing import Any

import attrs

from vmwatch.ruletypes import Severity


@attrs.frozen(kw_only=True)
class Alert:
    """One finding of one rule about one event."""

    rule: str
    """``pack.function`` of the rule that raised it (``engine`` for the engine's own reports)."""
    severity: Severity
    message: str
    vm: str = ""
    """The watched VM: its QMP ``query-name``, else the target spec."""
    host: str = ""
    """The host that watched it (``socket.gethostname()``)."""
    time_ns: int = 0
    """Timestamp of the event that triggered the rule."""
    seq: int = 0
    """Sequence number of that event."""
    pid: int | None = None
    comm: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)
    """JSON-able facts backing the message (addresses as hex strings)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm, "host": self.host, "time_ns": self.time_ns, "seq": self.seq, "rule": self.rule,
            "severity": self.severity.name.lower(), "pid": self.pid, "comm": self.comm,
            "message": self.message, "details": self.details,
        }
