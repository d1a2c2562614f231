"""Security pack: kernel integrity, control registers, modules, hidden processes, credentials, sysctls.

This file holds the Linux rules; the Windows ones (SSDT, per-vCPU IDT, drivers, unlinked
processes) are in its part _security_windows.py and join the pack under its name
(``security.ssdt``). Each rule of one OS is set aside, reported inactive, on a guest of the other.
The x86 rules (IDT, CR0/CR4, syscall MSRs) are set aside the same way on an arm64 guest.

Every check takes a baseline when the watch starts (``on_start``) and compares against it, both
when the guest writes the watched memory (watchpoints: instant, the writer is stopped in the
act) and periodically (a tamper by any other path: DMA, another mapping, an outside debugger).
A change is reported once; the new value becomes the baseline, so a restore is reported too.
"""

from __future__ import annotations

import posixpath

from vmwatch.cpu import CR0_WP, CR4_SMAP, CR4_SMEP
from vmwatch.events import Exec, MemoryAccess, ModuleLoad, RegisterWrite
from vmwatch.rules import rule

PARTS = ("_security_windows.py",)
PAGE = 4096


def _where(linux, address: int) -> str:
    """``symbol+off`` for kernel text, else "outside kernel text" (hex address either way)."""
    symbols = linux.symbols
    if symbols["_stext"] <= address < symbols["_etext"]:
        hit = symbols.lookup(address)
        if hit is not None:
            return f"{hit[0]}+{hit[1]:#x} ({address:#x})" if hit[1] else f"{hit[0]} ({address:#x})"
    return f"{address:#x}, outside kernel text"


def _in_modules(linux, address: int) -> str | None:
    for module in linux.modules():
        if module.base <= address < module.base + module.size:
            return module.name
    return None


# -- system call table --------------------------------------------------------------------------

@rule.on_start
@rule.every(2.0)
@rule.on_write("sys_call_table", size=None)
def syscall_table(event, guest):
    """sys_call_table entries changed or pointing outside kernel text (syscall hooking)."""
    linux = guest.linux
    current = {s.index: s for s in linux.syscalls()}
    baseline = guest.state.get("baseline")
    if baseline is None:
        guest.state["baseline"] = {i: s.address for i, s in current.items()}
        for s in current.values():
            if not s.in_text:
                guest.alert("critical", f"sys_call_table[{s.index}] points outside kernel text: {s.address:#x}",
                            index=s.index, address=hex(s.address), module=_in_modules(linux, s.address))
        return
    for index, s in current.items():
        old = baseline.get(index)
        if old is not None and old != s.address:
            baseline[index] = s.address
            guest.alert("critical", f"sys_call_table[{index}] changed: {_where(linux, old)} -> {_where(linux, s.address)}",
                        index=index, old=hex(old), new=hex(s.address), in_text=s.in_text,
                        module=_in_modules(linux, s.address), trigger=type(event).__name__)


# -- interrupt descriptor table -----------------------------------------------------------------

@rule.arch("x86")
@rule.on_start
@rule.every(2.0)
@rule.on_write("idt_table", size=PAGE)
def idt(event, guest):
    """IDT gates changed, or IDTR moved to another table."""
    linux = guest.linux
    cpus = guest.cpus or ((guest.registers,) if guest.registers else ())
    bases = {r.vcpu: r.idtr_base for r in cpus if r is not None and r.idtr_base}
    entries = {e.vector: e.address for e in linux.idt(cpus[0] if cpus else None)}
    state = guest.state
    if "gates" not in state:
        state["gates"], state["bases"] = entries, bases
        return
    for vcpu, base in bases.items():
        old = state["bases"].get(vcpu)
        if old is not None and old != base:
            state["bases"][vcpu] = base
            guest.alert("critical", f"IDTR of vCPU {vcpu} moved: {old:#x} -> {base:#x}", vcpu=vcpu,
                        old=hex(old), new=hex(base))
    gates = state["gates"]
    for vector, address in entries.items():
        old = gates.get(vector)
        if old is not None and old != address:
            gates[vector] = address
            guest.alert("critical", f"IDT vector {vector} handler changed: {_where(linux, old)} -> {_where(linux, address)}",
                        vector=vector, old=hex(old), new=hex(address), trigger=type(event).__name__)


# -- kernel text --------------------------------------------------------------------------------

@rule.on_start
@rule.every(10.0)
@rule.on_write("_stext.._etext")
def kernel_text(event, guest):
    """Kernel code modified outside the kernel's own patch sites (inline hooks)."""
    linux = guest.linux
    start, end = linux.symbols["_stext"], linux.symbols["_etext"]
    text = linux.memory.read(start, end - start, pad=True)
    state = guest.state
    if "text" not in state:
        state["text"], state["sites"] = text, linux.patch_sites()
        return
    old = state["text"]
    if text == old:
        return
    state["text"] = text
    sites = state["sites"]
    changed_pages = [p for p in range(0, len(text), PAGE) if text[p:p + PAGE] != old[p:p + PAGE]]
    hooks: list[int] = []
    for page in changed_pages:
        for i in range(page, min(page + PAGE, len(text))):
            if text[i] != old[i] and not sites.covers(start + i):
                if not hooks or start + i > hooks[-1] + 16:  # one report per patched spot
                    hooks.append(start + i)
    for address in hooks[:20]:
        off = address - start
        guest.alert("critical", f"kernel text modified at {_where(linux, address)}", address=hex(address),
                    old=old[off:off + 16].hex(), new=text[off:off + 16].hex(), trigger=type(event).__name__,
                    spots=len(hooks))


# -- control registers and syscall MSRs ---------------------------------------------------------

_MSR_ENTRY = {"msr:lstar": "entry_SYSCALL_64", "msr:cstar": "entry_SYSCALL_compat",
              "msr:sysenter_eip": "entry_SYSENTER_compat"}


def _cr_findings(name: str, old: int, new: int) -> list[str]:
    found = []
    if name == "cr0" and old & CR0_WP and not new & CR0_WP:
        found.append("CR0.WP cleared: the kernel can now write read-only memory")
    if name == "cr4" and old & CR4_SMEP and not new & CR4_SMEP:
        found.append("CR4.SMEP cleared: the kernel may now execute user pages")
    if name == "cr4" and old & CR4_SMAP and not new & CR4_SMAP:
        found.append("CR4.SMAP cleared: the kernel may now access user pages freely")
    return found


@rule.arch("x86")
@rule.on_register_write("cr0", "cr4")
def control_register_write(event: RegisterWrite, guest):
    """An instruction cleared CR0.WP, CR4.SMEP or CR4.SMAP.

    Seen before the write: an inline hook on the ``mov cr0``/``mov cr4`` of ``native_write_cr0``/
    ``native_write_cr4`` (the writers a running Linux uses; the mov moves into the hook's
    trampoline), whose stops flush nothing, so the rule costs a TCG guest next to nothing while
    nothing writes: benchmarks/bench_pump.py, 5 interleaved rounds, security+timeline 0.68-1.23x
    (median 0.79x) with it, 0.80-2.37x (median 1.06x) without it, on a host loaded by others
    (it was 1.28x as a breakpoint after each mov). Since Linux 5.3 those writers put WP, SMEP and
    SMAP back at once; ``control_register_state`` sees a change made any other way within 2 s.
    """
    if event.old is None:
        return
    for finding in _cr_findings(event.register, event.old, event.new):
        guest.alert("critical", finding, register=event.register, old=hex(event.old), new=hex(event.new),
                    rip=hex(event.rip), where=_where(guest.linux, event.rip))


@rule.arch("x86")
@rule.on_start
@rule.every(2.0)
def control_register_state(event, guest):
    """CR0.WP / CR4.SMEP / CR4.SMAP found cleared on a vCPU (whatever cleared them)."""
    state = guest.state
    for regs in guest.cpus:
        for name in ("cr0", "cr4"):
            value = getattr(regs, name)
            if value is None:
                continue
            key = (regs.vcpu, name)
            old = state.get(key)
            state[key] = value
            if old is not None:
                for finding in _cr_findings(name, old, value):
                    guest.alert("critical", f"vCPU {regs.vcpu}: {finding}", register=name, old=hex(old), new=hex(value))


@rule.arch("x86")
@rule.on_register("msr:lstar")
@rule.on_register("msr:cstar")
@rule.on_register("msr:star")
@rule.on_register("msr:fmask")
@rule.on_register("msr:sysenter_eip")
@rule.on_register("msr:sysenter_cs")
def syscall_msr(event: RegisterWrite, guest):
    """A system call entry MSR written with a value other than the kernel's own.

    On live QEMU the engine polls these MSRs once a second (the guest's own ``rdmsr``, run from
    outside: no breakpoint on the kernel's generic ``wrmsr``, and writes from a module's own
    code are seen too); ``event.rip`` is then 0.
    """
    expected_symbol = _MSR_ENTRY.get(event.register)
    seen = guest.state.setdefault("values", {})
    if expected_symbol is not None:
        expected = guest.linux.symbols.get(expected_symbol)
        if event.new != expected:
            guest.alert("critical", f"{event.register[4:].upper()} set to {_where(guest.linux, event.new)}, "
                                    f"not {expected_symbol}", register=event.register, new=hex(event.new),
                        expected=hex(expected) if expected else None, rip=hex(event.rip))
        return
    previous = seen.get(event.register, event.old)
    seen[event.register] = event.new
    if previous is not None and previous != event.new:
        guest.alert("warning", f"{event.register[4:].upper()} changed {previous:#x} -> {event.new:#x}",
                    register=event.register, old=hex(previous), new=hex(event.new), rip=hex(event.rip))


# -- modules ------------------------------------------------------------------------------------

@rule.on_start
@rule.on(ModuleLoad)
@rule.every(5.0)
@rule.configure(allow=[])
def module_allowlist(event, guest):
    """A kernel module not in the allowlist (modules present at start are allowed)."""
    state = guest.state
    if "allowed" not in state:
        state["allowed"] = {m.name for m in guest.linux.modules()} | set(guest.config["allow"])
        state["reported"] = set()
        return
    names = [event.name] if isinstance(event, ModuleLoad) else [m.name for m in guest.linux.modules()]
    for name in names:
        if name not in state["allowed"] and name not in state["reported"]:
            state["reported"].add(name)
            guest.alert("warning", f"module {name} loaded (not in the allowlist)", module=name,
                        how="load" if isinstance(event, ModuleLoad) else "found in module list")


# -- hidden processes ---------------------------------------------------------------------------

@rule.every(2.0)
def hidden_process(event, guest):
    """A task the scheduler runs whose process is missing from the task list (unlinked, DKOM)."""
    linux = guest.linux
    listed = {t.address for t in linux.tasks()}
    types, memory = linux.types, linux.memory
    leader_off = types.offset("task_struct", "group_leader")
    pid_off, tgid_off = types.offset("task_struct", "pid"), types.offset("task_struct", "tgid")
    comm_off = types.offset("task_struct", "comm")
    reported = guest.state.setdefault("reported", set())
    for task in linux.runnable_tasks(max(1, len(guest.cpus))):
        if memory.s32(task + pid_off) == 0:
            continue  # idle tasks are nobody's child
        leader = memory.pointer(task + leader_off)
        if leader in listed or task in listed or leader in reported:
            continue
        reported.add(leader)
        pid = memory.s32(leader + tgid_off)
        comm = memory.cstring(leader + comm_off, 16)
        guest.alert("critical", f"hidden process: pid {pid} ({comm}) is scheduled but not in the task list",
                    pid=pid, comm=comm, task=hex(leader))


# -- credentials --------------------------------------------------------------------------------

@rule.on(Exec)
@rule.every(2.0)
def root_without_exec(event, guest):
    """A process that became root with no exec in between (credentials overwritten in memory)."""
    state = guest.state
    execs = state.setdefault("execs", set())
    if isinstance(event, Exec):
        execs.add(event.pid)
        return
    seen = state.setdefault("seen", {})
    now = {}
    for task in guest.linux.tasks():
        if task.uid is None or task.euid is None:
            continue
        key = (task.pid, task.start_time_ns)
        now[key] = (task.uid, task.euid)
        before = seen.get(key)
        if before is None or task.pid in execs:
            continue
        was_root = before[0] == 0 or before[1] == 0
        if not was_root and (task.uid == 0 or task.euid == 0):
            guest.alert("critical", f"pid {task.pid} ({task.comm}) became root without exec: "
                                    f"uid {before[0]}->{task.uid}, euid {before[1]}->{task.euid}",
                        pid=task.pid, comm=task.comm, task=hex(task.address))
    state["seen"] = now
    execs.clear()


# -- security sysctls ---------------------------------------------------------------------------

# sysctl -> (kernel variable, bytes, kind). Missing variables (not built in) are skipped.
SYSCTLS = {
    "kernel.kptr_restrict": ("kptr_restrict", 4, "int"),
    "kernel.dmesg_restrict": ("dmesg_restrict", 4, "int"),
    "kernel.modules_disabled": ("modules_disabled", 4, "int"),
    "kernel.randomize_va_space": ("randomize_va_space", 4, "int"),
    "kernel.perf_event_paranoid": ("sysctl_perf_event_paranoid", 4, "int"),
    "kernel.kexec_load_disabled": ("kexec_load_disabled", 4, "int"),
    "kernel.unprivileged_bpf_disabled": ("sysctl_unprivileged_bpf_disabled", 4, "int"),
    "kernel.yama.ptrace_scope": ("ptrace_scope", 4, "int"),
    "vm.mmap_min_addr": ("dac_mmap_min_addr", 8, "int"),  # what /proc/sys shows (mmap_min_addr: max of it and the LSM's)
    "kernel.modprobe": ("modprobe_path", 256, "str"),
    "kernel.core_pattern": ("core_pattern", 128, "str"),
}


def _sysctl_values(linux) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, (symbol, size, kind) in SYSCTLS.items():
        address = linux.symbols.get(symbol)
        if address is None:
            continue
        raw = linux.memory.read(address, size)
        if kind == "int":
            values[name] = int.from_bytes(raw, "little", signed=True)
        else:
            values[name] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return values


def _sysctl_rule(func):
    for symbol, size, _kind in SYSCTLS.values():
        func = rule.on_write(symbol, size)(func)
    return func


@rule.on_start
@rule.every(2.0)
@_sysctl_rule
def security_sysctl(event, guest):
    """A security sysctl was weakened (kptr_restrict lowered, modprobe path redirected, ASLR off...).

    Numbers: lower is weaker for every sysctl here. Strings (helper paths) are compared only on
    the periodic check, and must read the same on two checks: the kernel writes them byte by
    byte, and a check may stop the guest halfway.
    """
    values = _sysctl_values(guest.linux)
    state = guest.state
    old = state.get("values")
    if old is None:
        state["values"], state["baseline"] = values, dict(values)
        return
    on_write = isinstance(event, MemoryAccess)
    settling = state.setdefault("settling", {})
    for name, value in values.items():
        before = old.get(name)
        if before is None or before == value:
            settling.pop(name, None)
            continue
        if isinstance(value, str):
            # a string counts once two periodic checks agree: one may land mid-write
            if on_write or settling.get(name) != value:
                if not on_write:
                    settling[name] = value
                continue
            settling.pop(name, None)
        old[name] = value
        if isinstance(value, str):
            weaker = value != state["baseline"].get(name)
        else:
            weaker = value < before
        verb = "weakened" if weaker else ("restored" if value == state["baseline"].get(name) else "hardened")
        guest.alert("warning" if weaker else "info", f"sysctl {name} {verb}: {before!r} -> {value!r}",
                    sysctl=name, old=before, new=value, trigger=type(event).__name__)


# -- suspicious executions ----------------------------------------------------------------------

@rule.on(Exec)
@rule.configure(dirs=["/tmp", "/dev/shm", "/var/tmp", "/run"])
def exec_from_scratch_dir(event: Exec, guest):
    """A program executed from a world-writable scratch directory or a hidden (dot) directory."""
    path = posixpath.normpath(event.filename)
    parts = path.split("/")
    hidden = any(p.startswith(".") and p not in (".", "..") for p in parts[:-1])
    scratch = any(path.startswith(d.rstrip("/") + "/") for d in guest.config["dirs"])
    if hidden or scratch:
        why = "a hidden directory" if hidden else "a scratch directory"
        guest.alert("warning", f"pid {event.pid} executed {path} from {why}", filename=path)
