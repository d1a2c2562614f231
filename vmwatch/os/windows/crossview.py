"""Processes missing from ActiveProcessLinks that another view still sees (DKOM hiding).

As Volatility's psxview compares its listings, this compares PsActiveProcessHead's list with
the scheduler's view (the process of the thread each processor runs: a few reads) and, when
asked, the pool scan (all of RAM). The Idle process (pid 0) is never on the list and is not
reported. A view the source cannot give is left out: the scheduler's without a KDBG that states
its offsets, the pool scan over a gdbstub (UnsupportedOperation, raised to the caller).
"""

from __future__ import annotations

import attrs

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.windows.tasks import Process


@attrs.frozen
class Hidden:
    """A process one view sees and ActiveProcessLinks does not."""

    process: Process | None
    """Its fields, or None when the EPROCESS a processor points at is unreadable."""
    view: str
    """``processor N`` or ``pool``."""
    address: int | None
    """Virtual address of the EPROCESS (None: a pool hit no link leads back to)."""
    paddr: int | None = None
    error: str | None = None


def hidden_processes(win, *, pool: bool) -> list[Hidden]:
    """Processes seen running or (with ``pool``) in pool memory but not on ActiveProcessLinks.

    Raises:
        UnsupportedOperation: ``pool`` on a source that cannot be scanned whole (a gdbstub).
    """
    listed = win.tasks()
    addresses = {p.address for p in listed}
    keys = {(p.pid, p.create_time) for p in listed}
    out: list[Hidden] = []
    try:
        running = win.running_processes()
    except SymbolError:
        running = {}
    except VmwatchError as exc:  # a KPCR or thread pointer that leads nowhere: flagged, not followed
        running = {}
        out.append(Hidden(None, "the processors", None, error=str(exc)))
    for cpu, eprocess in running.items():
        if eprocess in addresses or any(h.address == eprocess for h in out):
            continue
        try:
            p = win.process_at(eprocess)
        except VmwatchError as exc:
            out.append(Hidden(None, f"processor {cpu}", eprocess, error=str(exc)))
            continue
        if p.pid != 0:
            out.append(Hidden(p, f"processor {cpu}", eprocess))
    if pool:
        for hit in win.scan_processes():
            p = hit.process
            if p.address in addresses or (p.pid, p.create_time) in keys:
                continue
            out.append(Hidden(p, "pool", p.address, hit.paddr))
    return out
