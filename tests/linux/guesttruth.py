"""Truth about a lab guest from inside it (its /proc on the serial console), around a dump."""

from __future__ import annotations

import attrs

LISTING = ("for p in /proc/[0-9]*; do read -r pid rest < $p/stat; "
           "set -- ${rest##*)}; echo \"${p#/proc/} $2 $(grep ^Uid: $p/status | cut -f2) $(cat $p/comm)\"; done")


@attrs.frozen
class Proc:
    pid: int
    ppid: int
    uid: int
    comm: str


def parse_listing(text: str) -> dict[int, Proc]:
    procs = {}
    for line in text.strip().splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0].isdigit():
            procs[int(parts[0])] = Proc(int(parts[0]), int(parts[1]), int(parts[2]), parts[3])
    return procs


@attrs.frozen
class Snapshot:
    """A dump plus /proc listings taken just before and just after it (the guest paused while dumping)."""

    dump: str
    before: dict[int, Proc]
    after: dict[int, Proc]
    modules: list[tuple[str, int, int]]
    """(name, size, base) from /proc/modules."""

    @property
    def stable(self) -> dict[int, Proc]:
        """Processes present, identical, in both listings: they existed while the guest was paused."""
        return {pid: p for pid, p in self.before.items() if self.after.get(pid) == p}

    @property
    def possible(self) -> set[int]:
        return set(self.before) | set(self.after)


def snapshot(guest, path) -> Snapshot:
    guest.shell("grep -q '^tcp_yeah ' /proc/modules || scenario module; scenario sleeper 900", timeout=60)
    before = parse_listing(guest.shell(LISTING, timeout=120))
    guest.qmp().execute("stop")
    try:
        guest.dump(path)
    finally:
        guest.qmp().execute("cont")
    after = parse_listing(guest.shell(LISTING, timeout=120))
    modules = []
    for line in guest.shell("cat /proc/modules").strip().splitlines():
        parts = line.split()
        modules.append((parts[0], int(parts[1]), int(parts[5], 16) if len(parts) > 5 else 0))
    return Snapshot(str(path), before, after, modules)


def comm_matches(ours: str, proc_comm: str) -> bool:
    """The kernel's 15-char comm against /proc's (which appends a workqueue name to kworkers
    and shows long kthread names in full)."""
    if ours == proc_comm[:15]:
        return True
    return ours.startswith("kworker") and proc_comm.startswith(ours + "-")
