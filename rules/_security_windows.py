"""Security pack, Windows part: SSDT, each processor's IDT, drivers, unlinked processes.

Loaded as part of rules/security.py (its ``PARTS``): the rules are ``security.ssdt`` and so on.
They set themselves aside on a Linux guest (``guest.windows`` raises OtherGuestOS), as the Linux
rules do on a Windows one. Windows exports no service table or IDT symbol to watch: these check
periodically, which sees a tamper by any path.
"""

from __future__ import annotations

from vmwatch.errors import SymbolError, UnsupportedOperation
from vmwatch.rules import rule


def _table_changes(guest, current: dict) -> list[tuple[object, int, int]]:
    """(key, old, new) of entries that changed since the baseline (taken on the first call)."""
    baseline = guest.state.setdefault("baseline", {})
    changes = [(key, baseline[key], new) for key, new in current.items() if key in baseline and baseline[key] != new]
    baseline.update(current)
    return changes


@rule.on_start
@rule.every(2.0)
def ssdt(event, guest):
    """Windows SSDT entries pointing outside ntoskrnl, or changed (system service hooking)."""
    win = guest.windows
    services = win.syscalls()
    first = "baseline" not in guest.state
    for index, old, new in _table_changes(guest, {s.index: s.address for s in services}):
        guest.alert("critical", f"SSDT[{index}] changed: {win.describe(old)} -> {win.describe(new)}",
                    index=index, old=hex(old), new=hex(new), trigger=type(event).__name__)
    if first:
        for s in services:
            if not s.in_text:
                guest.alert("critical", f"SSDT[{s.index}] points outside ntoskrnl: {win.describe(s.address)}",
                            index=s.index, address=hex(s.address))


@rule.on_start
@rule.every(2.0)
def windows_idt(event, guest):
    """Windows IDT gates (each processor has its own table) changed, or pointing outside every driver."""
    win = guest.windows
    try:  # each vCPU's IDTR, else each processor's KPCR (a crash dump saves no IDTR)
        bases = win.idt_bases(guest.cpus or ((guest.registers,) if guest.registers else ()))
    except SymbolError as exc:
        raise UnsupportedOperation(str(exc)) from None
    gates = {(vcpu, e.vector): e.address for vcpu, base in bases.items() for e in win.idt_at(base) if e.present}
    first = "baseline" not in guest.state
    for (vcpu, vector), old, new in _table_changes(guest, gates):
        guest.alert("critical", f"vCPU {vcpu} IDT vector {vector} handler changed: {win.describe(old)} -> "
                                f"{win.describe(new)}", vcpu=vcpu, vector=vector, old=hex(old), new=hex(new))
    if first:
        drivers = win.modules()
        for (vcpu, vector), address in gates.items():
            if win.driver_at(address, drivers) is None:
                guest.alert("critical", f"vCPU {vcpu} IDT vector {vector} points outside every loaded driver: "
                                        f"{address:#x}", vcpu=vcpu, vector=vector, address=hex(address))


@rule.on_start
@rule.every(5.0)
@rule.configure(allow=[], trust_start=True)
def driver_allowlist(event, guest):
    """A Windows driver loaded that is not in the allowlist.

    ``allow``: driver names (BaseDllName, any case) always allowed; ``trust_start`` (default on):
    the drivers loaded when the watch starts are allowed too. With it off, an image is checked
    against ``allow`` alone.
    """
    state = guest.state
    if "allowed" not in state:
        state["allowed"] = {name.lower() for name in guest.config["allow"]}
        state["reported"] = set()
        if guest.config["trust_start"]:
            state["allowed"] |= {d.name.lower() for d in guest.windows.modules()}
            return
    for driver in guest.windows.modules():
        name = driver.name.lower()
        if name not in state["allowed"] and name not in state["reported"]:
            state["reported"].add(name)
            guest.alert("warning", f"driver {driver.name} loaded (not in the allowlist) at {driver.base:#x}: "
                                   f"{driver.path}", driver=driver.name, path=driver.path, base=hex(driver.base))


@rule.on_start
@rule.every(2.0)
def unlinked_process(event, guest):
    """A Windows process missing from ActiveProcessLinks (DKOM) yet running or alive by another view.

    Views: the process of the thread each processor runs (every check: a few reads) and the pool
    scan (psscan: all of RAM at about 3 GiB/s, so at most once a minute; refused over a gdbstub,
    where the running view still works). Each process is reported once.
    """
    state = guest.state
    now = event.time_ns
    pool = not now or now - state.get("scanned", -(1 << 62)) >= 60 * 10**9
    try:
        found = guest.windows.hidden_processes(pool=pool)
    except UnsupportedOperation:  # no pool scan on this source
        found, pool = guest.windows.hidden_processes(pool=False), False
    if pool:
        state["scanned"] = now
    reported = state.setdefault("reported", set())
    for h in found:
        key = h.address or h.paddr or h.view
        if key in reported:
            continue
        reported.add(key)
        where = f"{h.address:#x}" if h.address is not None else f"physical {h.paddr:#x}" if h.paddr else "?"
        if h.process is None:
            guest.alert("warning", f"the running thread's process on {h.view} is unreadable ({where}): {h.error}",
                        eprocess=where, view=h.view)
            continue
        p = h.process
        seen = f"runs on {h.view} but is" if h.view != "pool" else f"is alive in pool memory at {where} but"
        guest.alert("critical", f"hidden process: pid {p.pid} ({p.name}) {seen} not on ActiveProcessLinks",
                    pid=p.pid, comm=p.name, eprocess=where, view=h.view)
