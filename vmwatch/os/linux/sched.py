"""What the scheduler runs: a view of tasks apart from the task list (it sees unlinked processes)."""

from __future__ import annotations

MAX_NODES = 100_000
"""Run-queue tree nodes visited per CPU: a cyclic tree in hostile memory must not hang us."""


def runnable_tasks(linux, cpus: int) -> set[int]:
    """task_struct addresses of each CPU's current task and its CFS run-queue tree (CPUs 0..cpus-1)."""
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
        stack = [memory.pointer(rq + rq_cfs + timeline)]
        budget = MAX_NODES
        while stack and budget:
            node = stack.pop()
            budget -= 1
            if not node:
                continue
            found.add(node - run_node)
            stack.append(memory.pointer(node + left))
            stack.append(memory.pointer(node + right))
    return found
