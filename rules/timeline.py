"""Timeline pack: process start, exec and exit, module loads and address-space switches, as info
alerts for trend logging.

Every event is stored in the timeline's ``events`` table anyway; these rules add one readable
line each (who started whom, what ran, how it ended) and keep the parent's name for context.
Address-space switches (every CR3 load, one inline hook on x86-64 Linux: engine/address_spaces.py)
are too many for a line each: they are events in the timeline, summed up once a minute.
"""

from __future__ import annotations

from vmwatch.events import Exec, ModuleLoad, ProcessExit, ProcessStart, RegisterWrite
from vmwatch.rules import rule

_CR3_TABLE = ((1 << 52) - 1) & ~0xFFF
"""The page-table address in CR3 (without the PCID and the no-flush bit)."""


@rule.on(ProcessStart)
def process_start(event: ProcessStart, guest):
    """A process was created (fork/clone of a new thread group)."""
    names = guest.state.setdefault("names", {})
    names[event.pid] = event.comm
    parent = names.get(event.ppid, "")
    guest.alert("info", f"process {event.pid} started by {event.ppid}" + (f" ({parent})" if parent else ""),
                ppid=event.ppid)


@rule.on(Exec)
def process_exec(event: Exec, guest):
    """A process executed a program."""
    guest.alert("info", f"process {event.pid} executed {event.filename}", filename=event.filename)


@rule.on(ProcessExit)
def process_exit(event: ProcessExit, guest):
    """A process exited; the status is shown as the shell would (exit code or signal)."""
    code = event.exit_code
    if code is None:
        how = "exited"
    elif code & 0x7F:
        how = f"killed by signal {code & 0x7F}"
    else:
        how = f"exited with status {code >> 8 & 0xFF}"
    guest.alert("info", f"process {event.pid} ({event.comm}) {how}", exit_code=code)


@rule.on(ModuleLoad)
def module_load(event: ModuleLoad, guest):
    """A kernel module was loaded."""
    guest.alert("info", f"module {event.name} loaded at {event.base:#x} ({event.size} bytes)", module=event.name,
                base=hex(event.base), size=event.size)


@rule.arch("x86")
@rule.every(60)
@rule.on_register_write("cr3")
def address_space_switches(event: RegisterWrite, guest):
    """Address-space switches (CR3 loads), one line a minute: how many, into how many address spaces."""
    state = guest.state
    if isinstance(event, RegisterWrite):
        state["switches"] = state.get("switches", 0) + 1
        state.setdefault("spaces", set()).add(event.new & _CR3_TABLE)
        return
    switches, spaces = state.pop("switches", 0), state.pop("spaces", set())
    if switches:
        guest.alert("info", f"{switches} address-space switches in the last minute, into {len(spaces)} address spaces",
                    switches=switches, address_spaces=len(spaces))
