"""A task's name as ``/proc/PID/comm`` shows it, read from guest memory the way the kernel builds it.

``proc_task_name()`` (fs/proc/array.c, 6.1) prints ``task->comm`` except for kernel threads:
a workqueue worker gets ``+desc`` (running a work item now) or ``-desc`` (the last one) appended
by ``wq_worker_comm()`` (kernel/workqueue.c), and another kthread whose name was truncated shows
``kthread->full_name`` (``get_kthread_comm()``, 5.17+). The worker and the ``struct kthread`` hang
off ``task->worker_private`` (5.17+; ``set_child_tid`` before). Every offset comes from BTF; a
field this kernel lacks, or memory that does not read, leaves the raw comm.
"""

from __future__ import annotations

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.objects import StructReader

# Flag values are #defines, absent from BTF; both unchanged since they were introduced
# (include/linux/sched.h, 6.1: "#define PF_WQ_WORKER 0x00000020 /* I'm a workqueue worker */",
# "#define PF_KTHREAD 0x00200000 /* I am a kernel thread */").
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
TCOMM_LEN = 64
"""``char tcomm[64]`` in proc_task_name(): the name /proc prints is at most 63 bytes."""


class ProcName:
    """Builds /proc-style names for the tasks of one kernel; raw comm where its profile lacks the types."""

    def __init__(self, types, task: StructReader) -> None:
        self.task = task
        self.private = next((f for f in ("worker_private", "set_child_tid") if task.has(f)), None)
        self.kthread = self.worker = None
        if self.private is None or not task.has("flags"):
            return
        if types.has_type("struct kthread"):
            kthread = StructReader(types, "kthread")
            if kthread.has("data"):
                self.kthread = kthread
        if self.kthread is not None and types.has_type("struct worker"):
            worker = StructReader(types, "worker")
            if all(worker.has(f) for f in ("pool", "desc", "current_work")):
                self.worker = worker

    def name(self, memory, buf: bytes, comm: bytes) -> bytes:
        """The bytes /proc/PID/comm shows for the task in ``buf`` whose raw ``comm`` is given."""
        if self.kthread is None:
            return comm
        flags = self.task.int(buf, "flags")
        if not flags & (PF_WQ_WORKER | PF_KTHREAD):
            return comm
        try:
            kthread_at = self.task.int(buf, self.private)
            if not kthread_at:
                return comm
            kthread = memory.read(kthread_at, self.kthread.size)
            if flags & PF_WQ_WORKER:
                return self._worker(memory, self.kthread.int(kthread, "data"), comm)
            if self.kthread.has("full_name"):
                full = self.kthread.int(kthread, "full_name")
                if full:
                    return memory.read(full, TCOMM_LEN, pad=True).split(b"\0", 1)[0][:TCOMM_LEN - 1]
        except VmwatchError:
            pass
        return comm

    def _worker(self, memory, worker_at: int, comm: bytes) -> bytes:
        if self.worker is None or not worker_at:
            return comm
        w = self.worker
        buf = memory.read(worker_at, w.size)
        desc = w.bytes(buf, "desc").split(b"\0", 1)[0]
        if not w.int(buf, "pool") or not desc:
            return comm
        mark = b"+" if w.int(buf, "current_work") else b"-"
        return (comm + mark + desc)[:TCOMM_LEN - 1]
