"""What the scheduler runs: a view of tasks apart from the task list (it sees unlinked processes)."""

from __future__ import annotations

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.objects import warn_broken

MAX_NODES = 100_000
"""Run-queue tree nodes visited per CPU: a tree in hostile memory must not hang us."""


def runnable_tasks(linux, cpus: int) -> set[int]:
    """task_struct addresses of each CPU's current task and its CFS run-queue tree (CPUs 0..cpus-1).

    A tree with a cycle, an unreadable node or more than ``MAX_NODES`` nodes gives the tasks
    found before it, and a ``linux.list_broken`` warning naming the CPU's run queue.
    """
    types, memory = linux.types, linux.memory
    rq_curr = types.offset("rq", "curr")
    rq_cfs = types.offset("rq", "cfs")
    timeline = types.offset("cfs_rq", "tasks_timeline")  # rb_root_cached: rb_root first
    left, right = types.offset("rb_node", "rb_left"), types.offset("rb_node", "rb_right")
    run_node = types.offset("task_struct", "se") + types.offset("sched_entity", "run_node")
    found: set[int] = set()
    for cpu in range(cpus):
        rq = linux.per_cpu("runqueues", cpu)
        found.add(memory.pointer(rq + rq_curr))
        root = rq + rq_cfs + timeline
        stack, seen = [memory.pointer(root)], set()
        while stack:
            node = stack.pop()
            if not node:
                continue
            why = (f"node {node:#x} reached twice (a cycle)" if node in seen
                   else f"more than {MAX_NODES} nodes" if len(seen) == MAX_NODES else None)
            if why is not None:
                warn_broken(linux.logged_breaks, f"runqueues[{cpu}].cfs", root, len(seen), why)
                break
            seen.add(node)
            try:
                children = memory.pointer(node + left), memory.pointer(node + right)
            except VmwatchError:
                warn_broken(linux.logged_breaks, f"runqueues[{cpu}].cfs", root, len(seen) - 1,
                            f"unreadable node {node:#x}")
                break
            found.add(node - run_node)
            stack.extend(children)
    return found

