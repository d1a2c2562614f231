"""The end-of-watch summary of a fleet watch: one line per guest, then the findings of all."""

from __future__ import annotations

from typing import Any

from vmwatch.engine.alerts import Alert
from vmwatch.rules import Severity
from vmwatch.text import shown


def guest_line(run: Any) -> str:
    """One guest: name, time, events, alerts by severity, how its watch ended (plain text, escaped)."""
    s = run.summary
    if s is None:
        return f"{shown(run.vm)}: not watched; ended: {shown(run.end_reason)}"
    rate = s.events / s.seconds if s.seconds else 0.0
    order = [sev.name.lower() for sev in sorted(Severity, reverse=True)]
    counts = ", ".join(f"{s.alerts[sev]} {sev}" for sev in order if s.alerts.get(sev))
    alerts = f"alerts: {counts}" if counts else "no alerts"
    notes = []
    if s.demotions:
        notes.append(f"{len(s.demotions)} trap demotions")
    if s.dropped_events:
        notes.append(f"{s.dropped_events} events dropped")
    if s.isolated:
        notes.append(f"{len(s.isolated)} rules isolated")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return (f"{shown(run.vm)}: {s.seconds:.1f} s, {s.events:,} events ({rate:,.0f}/s), {s.traps} traps, "
            f"{alerts}{extra}; ended: {shown(run.end_reason)}")


def print_fleet_summary(console: Any, runs: list[Any], alerts: list[Alert], *, db: str | None = None) -> None:
    """One line per guest, a table of the findings at warning and above (with their guest), the timeline."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from vmwatch.cli.alertview import LABELS, STYLES

    console.print()
    gone = sum(1 for run in runs if run.gone)
    console.print(f"[bold]fleet summary[/bold]: {len(runs)} guests, {gone} went away")
    for run in runs:
        console.print(Text(guest_line(run), style="red" if run.gone else ""))
    serious = [a for a in alerts if a.severity >= Severity.WARNING]
    if not serious:
        console.print("[green]no findings at warning or above[/green]")
    else:
        table = Table(title="findings (warning and above)", show_lines=False, expand=False)
        for column in ("guest", "severity", "rule", "what happened"):
            table.add_column(column)
        table.add_column("times", justify="right")
        grouped: dict[tuple, list[Alert]] = {}
        for a in serious:
            grouped.setdefault((a.vm, a.severity, a.rule, a.message), []).append(a)
        for (vm, sev, rule_name, message), group in sorted(grouped.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            table.add_row(Text(shown(vm)), Text(LABELS[sev], style=STYLES[sev]), Text(shown(rule_name)),
                          Text(shown(message)), str(len(group)))
        console.print(table)
    if db:
        console.print(f"timeline written to {escape(db)} (vmwatch timeline {escape(db)} --vm NAME)")
