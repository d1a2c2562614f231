"""Linux sensors: process start, exec, exit and module load, from breakpoints on kernel functions.

Theory of operation: each OS-level event has a kernel function every such event goes through,
found by name in kallsyms, whose first argument (RDI, x86-64 System V calling convention; x0 on
AArch64) is the object to report. Fields are read with offsets from the kernel's own BTF, never hand-written:

* ``wake_up_new_task(struct task_struct *p)``: a new task is about to run -> ``ProcessStart``
  (thread-group leaders only; threads are not processes).
* ``begin_new_exec(struct linux_binprm *bprm)``: the point of no return of execve ->
  ``Exec`` with ``bprm->filename``; the caller is the task being replaced.
* ``do_exit(long code)``: the current task exits -> ``ProcessExit`` (leaders only).
* ``do_init_module(struct module *mod)``: a module was loaded and is being initialised ->
  ``ModuleLoad`` with its name and core layout.

The current task is ``current_task`` (per-CPU; inside ``pcpu_hot`` from 6.2) at
``__per_cpu_offset[vcpu]``, which does not depend on whether GS was swapped. On AArch64 it is
SP_EL0, where Linux keeps ``current`` while a vCPU runs in EL1 (every sensor's function does).
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any

import structlog

from vmwatch.engine.guest import Current, Guest, user_root
from vmwatch.errors import VmwatchError
from vmwatch.events import Breakpoint, Exec, ModuleLoad, ProcessExit, ProcessStart

if TYPE_CHECKING:
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

_MAX_CPUS = 8192


class TaskReader:
    """Reads task_struct fields with BTF offsets, resolved once per kernel."""

    def __init__(self, linux: Any) -> None:
        types = linux.types
        self.memory = linux.memory
        self.pid = types.offset("task_struct", "pid")
        self.tgid = types.offset("task_struct", "tgid")
        self.comm = types.offset("task_struct", "comm")
        self.real_parent = types.offset("task_struct", "real_parent")
        self.aarch64 = getattr(linux, "arch", "x86") == "aarch64"
        if self.aarch64:
            return  # `current` is SP_EL0 (no per-CPU variable needed)
        symbols = linux.symbols
        self.per_cpu_offset = symbols["__per_cpu_offset"]
        current = symbols.get("current_task")
        if current is None:
            current = symbols["pcpu_hot"] + types.offset("pcpu_hot", "current_task")
        self.current_task = current

    def current(self, vcpu: int, regs: Any = None) -> int:
        """The task on ``vcpu``: x86, its per-CPU ``current_task``; AArch64, SP_EL0 of ``regs`` (EL1)."""
        if self.aarch64:
            if regs is None or regs.sp_el0 is None or regs.el != 1:
                raise VmwatchError(f"vCPU {vcpu} is not in EL1 with SP_EL0 known: its task is unknown")
            return regs.sp_el0
        if not 0 <= vcpu < _MAX_CPUS:
            raise VmwatchError(f"vCPU index {vcpu} out of range")
        base = self.memory.u64(self.per_cpu_offset + 8 * vcpu)
        return self.memory.u64((base + self.current_task) & 0xFFFFFFFFFFFFFFFF)

    def ids(self, task: int) -> tuple[int, int, str]:
        mem = self.memory
        return mem.s32(task + self.pid), mem.s32(task + self.tgid), mem.cstring(task + self.comm, 16)

    def ppid(self, task: int) -> int:
        parent = self.memory.pointer(task + self.real_parent)
        return self.memory.s32(parent + self.tgid) if parent else 0


def _reader(guest: Guest) -> TaskReader:
    reader = getattr(guest, "_task_reader", None)
    if reader is None:
        reader = TaskReader(guest.linux)
        guest._task_reader = reader  # type: ignore[attr-defined]
    return reader


def _current(guest: Guest, vcpu: int) -> int:
    return _reader(guest).current(vcpu, guest.registers)


def current_task(guest: Guest) -> Current | None:
    """The task on the event's vCPU (``guest.current`` for Linux guests)."""
    event = guest.event
    regs = guest.registers
    reader = _reader(guest)
    task = reader.current(event.vcpu if event is not None else 0, regs)
    if not task:
        return None
    _pid, tgid, comm = reader.ids(task)
    return Current(tgid, comm, user_root(regs))


def _arg0(guest: Guest) -> int:
    """The first argument of the function a breakpoint stopped at: RDI (x86-64 System V), x0 (AAPCS64)."""
    regs = guest.registers
    value = None
    if regs is not None:
        value = (regs.x[0] if regs.x is not None else None) if regs.arch == "aarch64" else regs.rdi
    if value is None:
        raise VmwatchError("the source gives no registers: cannot read function arguments")
    return value


def on_new_task(event: Breakpoint, guest: Guest) -> None:
    reader = _reader(guest)
    task = _arg0(guest)
    pid, tgid, comm = reader.ids(task)
    if pid != tgid:
        return
    guest.emit(ProcessStart(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, pid=pid,
                            ppid=reader.ppid(task), comm=comm))


class ExecSensor:
    def __init__(self, linux: Any) -> None:
        self.filename = linux.types.offset("linux_binprm", "filename")

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        reader = _reader(guest)
        mem = guest.linux.memory
        filename = mem.cstring(mem.pointer(_arg0(guest) + self.filename), 4096)
        _pid, tgid, _comm = reader.ids(_current(guest, event.vcpu))
        guest.emit(Exec(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, pid=tgid, filename=filename,
                        comm=posixpath.basename(filename)[:15]))


def on_exit(event: Breakpoint, guest: Guest) -> None:
    reader = _reader(guest)
    pid, tgid, comm = reader.ids(_current(guest, event.vcpu))
    if pid != tgid:
        return
    code = _arg0(guest) & 0xFFFFFFFF
    guest.emit(ProcessExit(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, pid=pid, comm=comm,
                           exit_code=code))


class ModuleSensor:
    def __init__(self, linux: Any) -> None:
        types = linux.types
        self.name = types.offset("module", "name")
        try:  # up to 6.3
            self.base = types.offset("module", "core_layout.base")
            self.size = types.offset("module", "core_layout.size")
        except VmwatchError:  # 6.4+: mem[MOD_TEXT]
            self.base = types.offset("module", "mem") + types.offset("module_memory", "base")
            self.size = types.offset("module", "mem") + types.offset("module_memory", "size")

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        mem = guest.linux.memory
        mod = _arg0(guest)
        guest.emit(ModuleLoad(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu,
                              name=mem.cstring(mod + self.name, 56), base=mem.pointer(mod + self.base),
                              size=mem.u32(mod + self.size)))


# event class name -> (kernel functions to try, sensor factory)
SENSORS: dict[str, tuple[tuple[str, ...], Any]] = {
    "ProcessStart": (("wake_up_new_task",), lambda linux: on_new_task),
    "Exec": (("begin_new_exec",), ExecSensor),
    "ProcessExit": (("do_exit",), lambda linux: on_exit),
    "ModuleLoad": (("do_init_module",), ModuleSensor),
}


async def plan(engine: SensorHost, wanted: dict[str, list]) -> None:
    """Arm the sensors of the OS events rules listen to."""
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler, Trap

    kinds = [k for k in wanted if k in SENSORS]
    if not kinds or caps.BREAKPOINTS not in engine.capabilities:
        return
    for kind in kinds:
        functions, factory = SENSORS[kind]
        try:
            linux = engine.guest.linux
            func = factory(linux)
            _reader(engine.guest)
            name = next((f for f in functions if f in linux.symbols), None)
            if name is None:
                raise VmwatchError(f"none of {', '.join(functions)} in kallsyms")
        except VmwatchError as exc:
            engine.inactive(f"{kind} sensor", str(exc))
            continue
        run = engine.sensor_run(f"sensor.{kind}")
        run.func = func
        await engine.add_trap(Trap("breakpoint", linux.symbols[name], 1, name, entry=True), Handler(run, None))
        log.info("linux sensor armed", kind=kind, function=name)
