"""Truth about a lab guest from inside it (its /proc on the serial console), around a dump."""

from __future__ import annotations

import re

import attrs

LISTING = ("for p in /proc/[0-9]*; do read -r pid rest < $p/stat || continue; set -- ${rest##*)}; ppid=$2; "
           "while read -r k u rest; do [ \"$k\" = Uid: ] && break; done < $p/status; read -r comm < $p/comm; "
           "echo \"${p#/proc/} $ppid $u $comm\"; done")
"""pid, ppid, real uid and comm of every process, with shell builtins only (no fork per pid)."""

NAMES = "for p in /proc/[0-9]*; do read -r c < $p/comm && echo \"${p#/proc/} $c\"; done"
"""pid and /proc/PID/comm of every process: the quick second look taken right after a walk."""


@attrs.frozen
class Proc:
    pid: int
    ppid: int
    uid: int
    comm: str


def parse_names(text: str) -> dict[int, str]:
    names = {}
    for line in text.strip().splitlines():
        pid, _, name = line.partition(" ")
        if pid.isdigit():
            names[int(pid)] = name
    return names


def stable(before: dict[int, Proc], after: set[int]) -> dict[int, Proc]:
    """Processes listed before and still there after: they existed throughout."""
    return {pid: p for pid, p in before.items() if pid in after}


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
    after: set[int]
    after_names: dict[int, str]
    """/proc/PID/comm of every pid, read right after the dump."""
    modules: list[tuple[str, int, int]]
    """(name, size, base) from /proc/modules."""

    @property
    def stable(self) -> dict[int, Proc]:
        """Processes present, identical, in both listings: they existed while the guest was paused."""
        return stable(self.before, self.after)

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
    after_names = parse_names(guest.shell(NAMES, timeout=60))
    modules = []
    for line in guest.shell("cat /proc/modules").strip().splitlines():
        parts = line.split()
        modules.append((parts[0], int(parts[1]), int(parts[5], 16) if len(parts) > 5 else 0))
    return Snapshot(str(path), before, set(after_names), after_names, modules)


def worker_descs(*listings: dict[int, str]) -> set[str]:
    """The workqueue names (``+desc``/``-desc``) the guest's kworkers showed in these /proc listings."""
    return {name.split(sep, 1)[1] for names in listings for name in names.values()
            if name.startswith("kworker/") for sep in "+-" if sep in name}


def name_matches(ours: str, before: str | None, after: str | None, descs: set[str] = frozenset()) -> bool:
    """vmwatch's name equals /proc/PID/comm read just before or just after the walk.

    Either is accepted because a name can legitimately change between the two console reads
    while the guest runs: a kworker's ``+desc``/``-desc`` names the workqueue of its last work
    item. On a loaded machine it can change twice between the reads (seen: ``-events`` before
    and after, ``-events_power_efficient`` in the dump), so a kworker's name is also accepted
    when it is the same worker and its desc a workqueue some kworker of the guest showed (``descs``).
    """
    if ours in (before, after):
        return True
    worker = re.split(r"[+-]", ours, maxsplit=1)
    return (ours.startswith("kworker/") and len(worker) == 2 and worker[1] in descs
            and any(name is not None and re.split(r"[+-]", name, maxsplit=1)[0] == worker[0] for name in (before, after)))


def assert_lists_match_proc(guest, qmp: str) -> None:
    """``vmwatch ps`` and ``modules`` of the running guest agree with its /proc, with no warning:
    the pids seen before and after the walk, and /proc/modules."""
    import json

    from vmwatch.testing.cli import run_cli

    before = parse_names(guest.shell(NAMES, timeout=60))
    ps = run_cli("ps", qmp, "--json")
    after = parse_names(guest.shell(NAMES, timeout=60))
    assert ps.status == 0 and "warning" not in ps.stderr, ps.stderr
    ours = {p["pid"] for p in json.loads(ps.stdout) if p["pid"]}
    assert set(before) & set(after) <= ours <= set(before) | set(after)
    modules = {line.split()[0] for line in guest.shell("cat /proc/modules").splitlines() if line.strip()}
    assert {m["name"] for m in json.loads(run_cli("modules", qmp, "--json").stdout)} == modules
