"""A small rule pack of one's own: run it with

    vmwatch watch qemu:/path/to/qmp.sock --rules examples/my_rules.py --rules timeline --json

Each function is a rule; the decorators say what it listens to. ``guest`` gives cached guest
memory reads (``guest.memory``), the Linux objects (``guest.linux``), the current task
(``guest.current``) and ``guest.alert(...)``.
"""

from __future__ import annotations

from vmwatch.events import Exec
from vmwatch.rules import rule


@rule.on(Exec)
@rule.configure(suspicious_dirs=("/tmp/", "/dev/shm/"))
def exec_from_writable_dir(event: Exec, guest):
    """A program executed from a world-writable directory (a classic dropper pattern)."""
    if event.filename.startswith(tuple(guest.config["suspicious_dirs"])):
        guest.alert("warning", f"{event.comm} ({event.pid}) executed {event.filename}", filename=event.filename)


@rule.every(5.0)
def kernel_tick_rate(event, guest):
    """Every 5 s: how far jiffies moved, a sanity check that the guest is alive and not throttled."""
    jiffies = guest.memory.u64(guest.linux.symbols["jiffies_64"])
    last = guest.state.get("jiffies")
    guest.state["jiffies"] = jiffies
    if last is not None and jiffies == last:
        guest.alert("warning", "jiffies did not move in 5 s: guest stalled?", jiffies=jiffies)
