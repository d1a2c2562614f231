"""Alerts on screen as they arrive, and the end-of-watch summary (``watch`` and ``demo``).

An alert quotes the guest (comm, paths, module names): every such string is escaped with
:func:`vmwatch.text.shown` and drawn as a rich ``Text``, never parsed as markup, so a process
named ``[bold red]x`` or ``\x1b[2J`` shows as just that.
"""

from __future__ import annotations

import datetime
from typing import Any

from vmwatch.engine.alerts import Alert
from vmwatch.engine.sinks import EventRecord
from vmwatch.rules import Severity
from vmwatch.text import shown

STYLES = {Severity.INFO: "dim", Severity.WARNING: "yellow", Severity.ERROR: "red", Severity.CRITICAL: "bold red"}
LABELS = {Severity.INFO: "info", Severity.WARNING: "WARNING", Severity.ERROR: "ERROR", Severity.CRITICAL: "CRITICAL"}
# engine events worth a line on screen: they say the watch is degraded
ENGINE_EVENTS = {"Demotion", "Dropped", "SourceEnded"}


def make_console(stream: Any) -> Any:
    from rich.console import Console

    isatty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(file=stream, force_terminal=isatty, no_color=not isatty, width=None if isatty else 200,
                   highlight=False, soft_wrap=True)


def _clock() -> str:
    """Arrival time on screen (event times are the source's clock, stored in the timeline)."""
    return datetime.datetime.now().strftime("%H:%M:%S")


class ScreenSink:
    """A sink that prints alerts (at or above ``min_severity``) and engine notices, one line each."""

    name = "screen"

    def __init__(self, console: Any, *, min_severity: Severity = Severity.INFO, show_vm: bool = False) -> None:
        self.console = console
        self.min_severity = min_severity
        self.show_vm = show_vm
        """Name the guest on each line (a fleet watch)."""
        self.alerts: list[Alert] = []

    async def send(self, item: Alert | EventRecord) -> None:
        from rich.text import Text

        if isinstance(item, Alert):
            self.alerts.append(item)
            if item.severity < self.min_severity:
                return
            who = ""
            if item.pid is not None:
                who = f"pid {item.pid}" + (f" {shown(item.comm)}" if item.comm else "")
            line = Text()
            line.append(f"{_clock()} ")
            if self.show_vm:
                line.append(f"{shown(item.vm)} ", style="bold")
            line.append(f"{LABELS[item.severity]:<8}", style=STYLES[item.severity])
            line.append(f" {shown(item.rule):<34} ", style="cyan" if item.severity >= Severity.WARNING else "dim")
            line.append(f"{who:<18} ", style="dim")
            line.append(shown(item.message), style=STYLES[item.severity] if item.severity >= Severity.WARNING else "")
            self.console.print(line)
        elif item.kind in ENGINE_EVENTS:
            detail = shown(", ".join(f"{k}={v}" for k, v in item.details.items()))
            vm = f"{shown(item.vm)} " if self.show_vm else ""
            self.console.print(Text(f"{_clock()} {vm}engine   {item.kind}: {detail}", style="magenta"))

    async def aclose(self) -> None:
        pass


def print_summary(console: Any, summary: Any, alerts: list[Alert], *, db: str | None = None,
                  title: str = "watch summary") -> None:
    """What happened, readable without anything else on screen."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console.print()
    rate = summary.events / summary.seconds if summary.seconds else 0.0
    console.print(f"[bold]{title}[/bold]: {escape(shown(summary.vm))} - {summary.seconds:.1f} s, "
                  f"{summary.events:,} events "
                  f"({rate:,.0f}/s), {summary.traps} traps armed; ended: {summary.end_reason}")
    by_sev = {s: 0 for s in Severity}
    for a in alerts:
        by_sev[a.severity] += 1
    console.print("alerts: " + ", ".join(f"{n} {s.name.lower()}" for s, n in sorted(by_sev.items(), reverse=True)))
    serious = [a for a in alerts if a.severity >= Severity.WARNING]
    if serious:
        table = Table(title="findings (warning and above)", show_lines=False, expand=False)
        table.add_column("severity")
        table.add_column("rule")
        table.add_column("what happened")
        table.add_column("times", justify="right")
        grouped: dict[tuple, list[Alert]] = {}
        for a in serious:
            grouped.setdefault((a.severity, a.rule, a.message), []).append(a)
        for (sev, rule_name, message), group in sorted(grouped.items(), key=lambda kv: (-kv[0][0], kv[1][0].seq)):
            table.add_row(Text(LABELS[sev], style=STYLES[sev]), Text(shown(rule_name)), Text(shown(message)),
                          str(len(group)))
        console.print(table)
    else:
        console.print("[green]no findings at warning or above[/green]")
    notes = []
    if summary.demotions:
        notes.append(f"{len(summary.demotions)} trap demotions (overhead governance): "
                     + "; ".join(f"{d.trap} {d.action}" for d in summary.demotions[:3]))
    if summary.dropped_events:
        notes.append(f"{summary.dropped_events} events dropped (the pump lagged)")
    for sink, n in summary.dropped_records.items():
        notes.append(f"{n} event records dropped by the slow sink {sink}")
    for sink, n in summary.lost_alerts.items():
        notes.append(f"{n} alerts not stored by the failing sink {sink}")
    for rule_name, n in summary.rule_errors.items():
        notes.append(f"rule {rule_name} raised {n} times" + (" and was isolated" if rule_name in summary.isolated else ""))
    if summary.inactive:
        notes.append(f"{len(summary.inactive)} listeners inactive on this source (--log-level info lists them)")
    for note in notes:
        console.print(f"[magenta]note:[/magenta] {escape(shown(note, backslash=False))}")
    if db:
        console.print(f"timeline written to {escape(db)} (vmwatch timeline {escape(db)})")
