"""Processes: the ``init_task.tasks`` list of thread-group leaders, and their threads.

Fields come from BTF by name; kernels moved some of them (``state`` became ``__state`` in 5.14,
threads moved from ``task_struct.thread_group`` to ``signal_struct.thread_head`` in 6.7), so
each is looked up by the names the kernel may use.
"""

from __future__ import annotations

import attrs

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.objects import StructReader, c_string, walk_list, warn_broken
from vmwatch.os.linux.procname import ProcName

MAX_THREADS = 1 << 18
"""Threads read in one walk of all tasks, every group's list together: a task list spliced into
garbage must not cost a thread walk per garbage task (65,536 of them, 4,096 nodes each)."""
MAX_GROUP_THREADS = 4096

_TASK_STATES = "RSDTtXZP"
_TASK_IDLE = 0x402  # TASK_UNINTERRUPTIBLE | TASK_NOLOAD: what ps shows as I


@attrs.frozen(kw_only=True)
class Task:
    """One process (thread-group leader) or thread."""

    pid: int
    tgid: int
    ppid: int | None
    name: str
    """The name /proc/PID/comm shows: ``comm``, plus a kworker's ``+desc``/``-desc``, or a kthread's full name."""
    comm: str
    """The raw ``task_struct.comm`` (at most 15 bytes)."""
    uid: int | None
    gid: int | None
    euid: int | None
    start_time_ns: int | None
    """``start_time``: nanoseconds of CLOCK_MONOTONIC at fork."""
    state: str
    """ps-style letter: R running, S sleeping, D disk sleep, T stopped, Z zombie, I idle..."""
    address: int
    """Virtual address of the ``task_struct``."""
    mm: int
    pgd: int | None
    """Virtual address of the page-global directory (None for kernel threads)."""
    cr3: int | None
    """Physical page-table root of the address space (None for kernel threads)."""
    threads: tuple[int, ...] = ()
    """pids of the other threads of the group."""

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class Listing(list):
    """A list of kernel objects plus what the bounded walk had to skip."""

    def __init__(self, items=(), skipped: list[str] | None = None) -> None:
        super().__init__(items)
        self.skipped = skipped or []


def _state_letter(state: int, exit_state: int) -> str:
    if state & _TASK_IDLE == _TASK_IDLE:
        return "I"
    value = (state | exit_state) & 0x7F  # TASK_REPORT
    if value == 0:
        return "R"
    for i, letter in enumerate(_TASK_STATES[1:]):
        if value & (1 << i):
            return letter
    return "?"


class TaskWalker:
    """Reads tasks, creds and address spaces of one kernel."""

    def __init__(self, linux) -> None:
        self.linux = linux
        types = linux.types
        self.task = StructReader(types, "task_struct")
        # A hand-written profile (libvmi.conf) may describe only tasks, mm, pid and comm.
        self.cred = StructReader(types, "cred") if types.has_type("struct cred") else None
        self.mm = StructReader(types, "mm_struct")
        self.state_field = next((f for f in ("__state", "state") if self.task.has(f)), None)
        self.tasks_off = self.task.offset("tasks")
        self.proc_name = ProcName(types, self.task)
        self.thread_head = self.thread_link = None
        if self.task.has("thread_group"):
            self.thread_link = self.task.offset("thread_group")
        elif self.task.has("thread_node") and types.has_type("struct signal_struct"):
            self.thread_head = StructReader(types, "signal_struct").offset("thread_head")
            self.thread_link = self.task.offset("thread_node")
        self.thread_budget = MAX_THREADS
        self.broken_groups: list[str] = []

    def _optional(self, buf: bytes, member: str, default=None):
        return self.task.int(buf, member) if self.task.has(member) else default

    def walk(self) -> Listing:
        linux = self.linux
        memory = linux.memory
        skipped: list[str] = []
        self.thread_budget = MAX_THREADS
        head = linux.symbols["init_task"] + self.tasks_off
        tasks = []
        self.broken_groups = []
        for address in walk_list(memory, head, self.tasks_off, name="init_task.tasks", skipped=skipped,
                                 logged=linux.logged_breaks):
            try:
                tasks.append(self.read(address, skipped))
            except VmwatchError as exc:
                skipped.append(f"task at {address:#x}: {exc}")
        if self.broken_groups:  # one line for them all: a task list spliced into garbage breaks thousands
            warn_broken(linux.logged_breaks, "threads", head, MAX_THREADS - max(0, self.thread_budget),
                        f"{len(self.broken_groups)} tasks' thread lists broken, the first: {self.broken_groups[0]}")
        return Listing(tasks, skipped)

    def read(self, address: int, skipped: list[str]) -> Task:
        memory, t = self.linux.memory, self.task
        buf = memory.read(address, t.size)
        pid = t.int(buf, "pid")
        parent = self._optional(buf, "real_parent", 0)
        ppid = None
        if parent:
            try:
                ppid = memory.u32(parent + t.offset("tgid"))
            except VmwatchError:
                skipped.append(f"task at {address:#x}: unreadable parent {parent:#x}")
        uid = gid = euid = None
        cred_ptr = self._optional(buf, "real_cred") or self._optional(buf, "cred")
        if self.cred is not None and cred_ptr:
            try:
                cbuf = memory.read(cred_ptr, self.cred.size)
                uid, gid, euid = (self.cred.int(cbuf, f) for f in ("uid", "gid", "euid"))
            except VmwatchError:
                skipped.append(f"task at {address:#x}: unreadable cred {cred_ptr:#x}")
        mm = t.int(buf, "mm")
        pgd = cr3 = None
        if mm:
            try:
                pgd = memory.pointer(mm + self.mm.offset("pgd"))
                cr3 = memory.translate(pgd)
            except VmwatchError:
                skipped.append(f"task at {address:#x}: unreadable mm {mm:#x}")
        state = "?"
        if self.state_field is not None:
            state = _state_letter(t.int(buf, self.state_field), self._optional(buf, "exit_state", 0))
        comm = t.bytes(buf, "comm").split(b"\0", 1)[0]
        return Task(
            pid=pid, tgid=self._optional(buf, "tgid", pid), ppid=ppid,
            name=c_string(self.proc_name.name(memory, buf, comm)), comm=c_string(comm), uid=uid, gid=gid, euid=euid,
            start_time_ns=self._optional(buf, "start_time"), state=state,
            address=address, mm=mm, pgd=pgd, cr3=cr3,
            threads=tuple(self._threads(address, buf, skipped)),
        )

    def _threads(self, address: int, buf: bytes, skipped: list[str]) -> list[int]:
        memory, t = self.linux.memory, self.task
        if self.thread_link is None or self.thread_budget < 0:
            return []
        if not self.thread_budget:
            self.thread_budget = -1
            skipped.append(f"threads of the tasks from {address:#x} on not read: more than {MAX_THREADS} threads in all")
            return []
        if self.thread_head is None:
            head = address + self.thread_link
        else:
            head = t.int(buf, "signal") + self.thread_head
        pids = []
        problems = len(skipped)
        threads = walk_list(memory, head, self.thread_link, name=f"pid {t.int(buf, 'pid')} threads",
                            skipped=skipped, limit=min(MAX_GROUP_THREADS, self.thread_budget), log_broken=False)
        self.broken_groups += skipped[problems:]
        self.thread_budget -= len(threads)
        for thread in threads:
            if thread == address:
                continue
            try:
                pids.append(memory.u32(thread + t.offset("pid")))
            except VmwatchError:
                skipped.append(f"thread at {thread:#x} unreadable")
        return pids
