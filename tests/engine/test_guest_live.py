"""The shipped packs on the live lab guest: quiet on a clean guest, each security rule fires on a real trigger.

One watch (security + timeline packs) stays attached for the whole module, in its own thread
with its own trio loop; tests act inside the guest through its serial shell, or tamper from
outside through vmwatch's own write API (then restore), and wait for the alert. Truth about the
guest (pids, uids) comes from the guest's shell, not from vmwatch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import trio

from vmwatch.engine import Engine, ListSink
from vmwatch.engine.sources import source_for
from vmwatch.rules import RuleSet, Severity

pytestmark = pytest.mark.guest
NARROW_PACK = Path(__file__).parent / "packs" / "narrow.py"
SLOW = 180.0
"""Guest commands under a full watch on a loaded 2-core host: each stop costs the TCG guest
milliseconds, so allow what a busy CI machine needs."""


class Watcher:
    """A running watch on the lab guest, driven from synchronous tests."""

    def __init__(self, guest, sinks=()) -> None:
        self.guest = guest
        self.sink = ListSink()
        self.sinks = [self.sink, *sinks]
        self.engine: Engine | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(120) or self.error is not None:
            raise RuntimeError(f"watch did not start: {self.error!r}")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.set()

    async def _run(self) -> None:
        from vmwatch.target import open_target

        self.token = trio.lowlevel.current_trio_token()
        async with open_target(self.guest.target, writable=True) as target:
            self.target = target
            packs = ["security", "timeline", NARROW_PACK]
            self.engine = Engine(source_for(target), RuleSet.load(packs), self.sinks)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.engine.run)
                while self.engine.summary.traps == 0:
                    await trio.sleep(0.05)
                self._ready.set()

    def stop(self):
        if self.engine is not None and self.token is not None:
            trio.from_thread.run_sync(self.engine.stop, trio_token=self.token)
        self._thread.join(60)
        return self.engine.summary if self.engine else None

    def mark(self) -> int:
        return len(self.sink.alerts)

    def serious_since(self, mark: int) -> list:
        return [a for a in self.sink.alerts[mark:] if a.severity >= Severity.WARNING]

    def wait_for(self, rule: str, mark: int, timeout: float = 60.0, severity: Severity = Severity.WARNING):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [a for a in self.sink.alerts[mark:] if a.rule == rule and a.severity >= severity]
            if hits:
                return hits
            if self.error is not None:
                raise self.error
            time.sleep(0.1)
        got = [(a.rule, a.message) for a in self.sink.alerts[mark:]]
        raise AssertionError(f"{rule} did not fire within {timeout} s; alerts since: {got}")

    def serious_messages(self, rule: str, mark: int, count: int, timeout: float = 60.0) -> list[str]:
        """Sorted messages of ``rule``'s warnings and worse since ``mark``, once ``count`` came (or at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            messages = sorted(a.message for a in self.serious_since(mark) if a.rule == rule)
            if len(messages) >= count or time.monotonic() >= deadline:
                return messages
            time.sleep(0.2)

    def wait_seen_by_root_without_exec(self, pid: int, timeout: float = SLOW) -> None:
        """Until a periodic check of security.root_without_exec recorded ``pid`` (with its uids then):
        a condition, not a sleep, for a host whose load delays the 2 s checks."""
        def seen() -> bool:
            state = self.engine.runs["security.root_without_exec"].state
            return any(key[0] == pid for key in state.get("seen", {}))

        deadline = time.monotonic() + timeout
        while not trio.from_thread.run_sync(seen, trio_token=self.token):
            if time.monotonic() > deadline:
                raise AssertionError(f"security.root_without_exec did not check pid {pid} within {timeout} s")
            time.sleep(0.2)

    def stopped(self, work):
        """Run ``work(linux, source)`` with the guest paused and no rule running; return its result."""

        async def run():
            async with self.engine.guest_stopped():
                return work(self.engine.guest.linux, self.engine.source)

        return trio.from_thread.run(run, trio_token=self.token)

    def stopped_async(self, work):
        async def run():
            async with self.engine.guest_stopped():
                return await work(self.engine.guest.linux, self.engine.source)

        return trio.from_thread.run(run, trio_token=self.token)


@pytest.fixture(scope="module")
def watcher(lab_guest):
    # other tests share this guest: bring it back to its boot-time baseline first
    lab_guest.shell("scenario unsysctl; scenario unmodule 2>/dev/null; scenario busy stop 2>/dev/null; true",
                    timeout=SLOW)
    w = Watcher(lab_guest)
    w.start()
    yield w
    summary = w.stop()
    assert summary is not None and not summary.rule_errors, summary


def test_clean_guest_running_its_scenario_is_quiet(watcher, lab_guest):
    """Normal activity for a while: the timeline sees it, no security alert at warning or above."""
    mark = watcher.mark()
    deadline = time.monotonic() + 12
    lab_guest.shell("scenario benign; scenario creds", timeout=SLOW)
    time.sleep(max(0.0, deadline - time.monotonic()))  # every periodic check has run at least once
    assert watcher.serious_since(mark) == []
    timeline = {a.rule for a in watcher.sink.alerts[mark:]}
    assert {"timeline.process_start", "timeline.process_exec", "timeline.process_exit"} <= timeline
    execs = [a.details["filename"] for a in watcher.sink.alerts[mark:] if a.rule == "timeline.process_exec"]
    assert "/bin/true" in execs or "/bin/su" in execs


def test_listener_narrowed_to_a_process_name(watcher, lab_guest):
    """A breakpoint listener with comm= sees only that process; the current task is read from the guest."""
    mark = watcher.mark()
    named = int(lab_guest.shell("sh -c 'echo $$; exec uname -r'", timeout=SLOW).split()[0])
    other = int(lab_guest.shell("sh -c 'echo $$; exec busybox uname -r'", timeout=SLOW).split()[0])
    watcher.wait_for("narrow.uname_by_anyone", mark, severity=Severity.INFO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        anyone = {a.pid for a in watcher.sink.alerts[mark:] if a.rule == "narrow.uname_by_anyone"}
        if {named, other} <= anyone:
            break
        time.sleep(0.2)
    narrowed = [a for a in watcher.sink.alerts[mark:] if a.rule == "narrow.uname_by_uname"]
    assert {named, other} <= anyone
    assert [(a.pid, a.comm) for a in narrowed] == [(named, "uname")]


def test_module_load_outside_allowlist(watcher, lab_guest):
    mark = watcher.mark()
    out = lab_guest.shell("scenario module", timeout=SLOW)
    try:
        loaded = out.split()[-1]
        hits = watcher.wait_for("security.module_allowlist", mark)
        assert any(loaded in a.message for a in hits), hits
        loads = [a for a in watcher.sink.alerts[mark:] if a.rule == "timeline.module_load"]
        assert loaded in {a.details["module"] for a in loads}
    finally:
        lab_guest.shell("scenario unmodule", timeout=SLOW)


def test_security_sysctl_write(watcher, lab_guest):
    mark = watcher.mark()
    lab_guest.shell("scenario sysctl", timeout=SLOW)
    try:
        watcher.wait_for("security.security_sysctl", mark)
        expected = ["sysctl kernel.kptr_restrict weakened: 1 -> 0",
                    "sysctl kernel.modprobe weakened: '/sbin/modprobe' -> '/tmp/.x/modprobe'"]
        # strings count once two periodic checks agree
        assert watcher.serious_messages("security.security_sysctl", mark, 2) == expected
    finally:
        lab_guest.shell("scenario unsysctl", timeout=SLOW)


def test_exec_from_hidden_tmp_directory(watcher, lab_guest):
    mark = watcher.mark()
    lab_guest.shell("scenario dropper", timeout=SLOW)
    hits = watcher.wait_for("security.exec_from_scratch_dir", mark)
    assert any("/tmp/.x/sh" in a.message for a in hits)


@contextlib.contextmanager
def tampered(watcher, locate, size, mutate):
    """Overwrite ``size`` guest-physical bytes at ``locate(linux, source)`` with
    ``mutate(linux, original)`` while the guest is stopped; put the original back on exit."""

    def patch(linux, source):
        paddr = locate(linux, source)
        original = linux.memory.read_phys(paddr, size)
        source.memory.write(paddr, mutate(linux, original))
        return paddr, original

    paddr, original = watcher.stopped(patch)
    try:
        yield
    finally:
        watcher.stopped(lambda linux, source: source.memory.write(paddr, original))


def test_syscall_table_hook_from_outside(watcher):
    """Overwrite sys_call_table[getpid] through vmwatch's write API, detect, restore."""
    mark = watcher.mark()
    slot = lambda linux, source: linux.memory.translate(linux.symbols["sys_call_table"] + 8 * 39)  # noqa: E731
    hook = lambda linux, original: linux.symbols["__x64_sys_getppid"].to_bytes(8, "little")  # noqa: E731
    with tampered(watcher, slot, 8, hook):
        hits = watcher.wait_for("security.syscall_table", mark, severity=Severity.CRITICAL)
        assert "sys_call_table[39] changed" in hits[0].message and "__x64_sys_getppid" in hits[0].message


def test_idt_gate_changed_from_outside(watcher):
    """Point the IDT gate of vector 0x80 elsewhere in physical memory, detect, restore."""
    mark = watcher.mark()

    def gate_0x80(linux, source):
        regs = watcher.engine.guest.cpus[0] if watcher.engine.guest.cpus else None
        base = regs.idtr_base if regs and regs.idtr_base else linux.symbols["idt_table"]
        return linux.memory.translate(base + 16 * 0x80)

    def flip_offset_bit(linux, original):
        gate = bytearray(original)
        gate[0] ^= 0x10  # offset bits 0-7 of the handler
        return bytes(gate)

    with tampered(watcher, gate_0x80, 16, flip_offset_bit):
        hits = watcher.wait_for("security.idt", mark, severity=Severity.CRITICAL)
        assert "IDT vector 128 handler changed" in hits[0].message


def test_kernel_text_patch_from_outside(watcher):
    """Change one byte inside a never-called syscall's code, detect, restore."""
    mark = watcher.mark()
    byte = lambda linux, source: linux.memory.translate(linux.symbols["__x64_sys_kexec_load"] + 1)  # noqa: E731
    with tampered(watcher, byte, 1, lambda linux, original: bytes([original[0] ^ 0xFF])):
        hits = watcher.wait_for("security.kernel_text", mark, severity=Severity.CRITICAL)
        assert "__x64_sys_kexec_load+0x1" in hits[0].message


def test_cr0_wp_cleared_from_outside(watcher):
    """Clear CR0.WP on vCPU 0 through the debugger link, detect, restore."""
    from vmwatch.cpu import CR0_WP

    mark = watcher.mark()

    async def clear(linux, source):
        regs = await source.registers(0)
        await source.vm.set_registers(0, cr0=regs.cr0 & ~CR0_WP)
        return regs.cr0

    cr0 = watcher.stopped_async(clear)
    try:
        hits = watcher.wait_for("security.control_register_state", mark, severity=Severity.CRITICAL)
        assert "CR0.WP cleared" in hits[0].message
    finally:
        async def restore(linux, source):
            await source.vm.set_registers(0, cr0=cr0)

        watcher.stopped_async(restore)


def test_syscall_msr_changed_from_outside(watcher, lab_guest):
    """Clear the CF bit of FMASK (the RFLAGS mask of syscall entry; harmless) with the backend's
    wrmsr probe, detect it at an MSR poll, restore."""
    fmask = 0xC0000084

    def on_awake_vcpu(work):
        # the probes need a vCPU caught in kernel mode and awake: the write loop keeps one so
        for _ in range(200):
            done = watcher.stopped_async(work)
            if done is not None:
                return done
            time.sleep(0.05)
        raise AssertionError("no vCPU could run the MSR probe")

    async def clear_cf(linux, source):
        values = await source.vm.read_msrs([fmask])
        if values is None or not await source.vm.write_msrs({fmask: values[fmask] & ~1}):
            return None
        return values[fmask]

    mark = watcher.mark()
    lab_guest.shell("scenario busy start", timeout=SLOW)
    deadline = time.monotonic() + 60  # the first poll that catches a vCPU awake: the baseline
    while not any("fmask" in regs.msrs for regs in watcher.engine.guest.cpus):
        assert time.monotonic() < deadline, "no MSR poll succeeded"
        time.sleep(0.2)
    original = on_awake_vcpu(clear_cf)
    try:
        assert original & 1
        hits = watcher.wait_for("security.syscall_msr", mark)
        assert f"FMASK changed {original:#x} -> {original & ~1:#x}" in hits[0].message
    finally:
        async def restore(linux, source):
            return await source.vm.write_msrs({fmask: original}) or None

        on_awake_vcpu(restore)
        lab_guest.shell("scenario busy stop", timeout=SLOW)


def test_hidden_process_unlinked_from_task_list(watcher, lab_guest):
    """Unlink a busy process from the task list (DKOM) from outside: the scheduler still runs it."""
    pid = int(lab_guest.shell("scenario busy start", timeout=SLOW).split()[-1])
    mark = watcher.mark()

    def unlink(linux, source):
        task = next(t for t in linux.tasks() if t.pid == pid)
        mem = linux.memory
        link = task.address + linux.types.offset("task_struct", "tasks")
        nxt, prev = mem.u64(link), mem.u64(link + 8)
        mem.write(prev, nxt.to_bytes(8, "little"))        # prev->next = next
        mem.write(nxt + 8, prev.to_bytes(8, "little"))    # next->prev = prev
        return link, nxt, prev

    link, nxt, prev = watcher.stopped(unlink)
    try:
        assert str(pid) in lab_guest.shell(f"cat /proc/{pid}/stat", timeout=SLOW)  # alive from the guest's view
        hits = watcher.wait_for("security.hidden_process", mark, severity=Severity.CRITICAL)
        assert f"pid {pid}" in hits[0].message
    finally:
        def relink(linux, source):
            mem = linux.memory
            mem.write(prev, link.to_bytes(8, "little"))
            mem.write(nxt + 8, link.to_bytes(8, "little"))

        watcher.stopped(relink)
        lab_guest.shell("scenario busy stop", timeout=SLOW)


def test_root_without_exec(watcher, lab_guest):
    """A uid-1000 process whose credentials are overwritten with root from outside."""
    out = lab_guest.shell("su -s /bin/sh lab -c 'exec sleep 600' </dev/null >/dev/null 2>&1 & echo $!", timeout=SLOW)
    pid = int(out.split()[-1])
    watcher.wait_seen_by_root_without_exec(pid)  # its periodic check must know it as uid 1000 first
    assert lab_guest.shell(f"grep Uid /proc/{pid}/status", timeout=SLOW).split()[1] == "1000"
    mark = watcher.mark()
    fields = ("uid", "euid", "suid", "fsuid")

    def escalate(linux, source):
        mem, types = linux.memory, linux.types
        task = next(t for t in linux.tasks() if t.pid == pid)
        cred = mem.pointer(task.address + types.offset("task_struct", "real_cred"))
        saved = {f: mem.read(cred + types.offset("cred", f), 4) for f in fields}
        for f in fields:
            mem.write(cred + types.offset("cred", f), bytes(4))
        return cred, saved

    cred, saved = watcher.stopped(escalate)
    try:
        assert lab_guest.shell(f"grep Uid /proc/{pid}/status", timeout=SLOW).split()[1] == "0"  # the guest agrees
        hits = watcher.wait_for("security.root_without_exec", mark, severity=Severity.CRITICAL)
        assert f"pid {pid}" in hits[0].message
    finally:
        def restore(linux, source):
            for f, raw in saved.items():
                linux.memory.write(cred + linux.types.offset("cred", f), raw)

        watcher.stopped(restore)
        lab_guest.shell(f"kill {pid}", timeout=SLOW)


def test_cr0_wp_cleared_through_native_write_cr0(watcher, lab_guest):
    """A debugger's ``call native_write_cr0(cr0 & ~WP)`` (gdb's way: the return address pushed,
    RIP and RDI set) on the idle vCPU: caught at the mov, before it runs. The kernel's own CR
    pinning then puts WP back and warns, which its log shows."""
    import capstone

    from vmwatch.cpu import CR0_WP

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    async def call(linux, source):
        regs = await source.registers(0)
        insn = next(md.disasm_lite(linux.memory.read(regs.rip, 16), regs.rip), None)
        if regs.cs.selector & 3 or insn is None or insn[2] != "ret":  # at a ret no scratch register is live
            return None
        rsp = regs.rsp - 8
        linux.memory.write(rsp, regs.rip.to_bytes(8, "little"))
        await source.vm.set_registers(0, rsp=rsp, rip=linux.symbols["native_write_cr0"], rdi=regs.cr0 & ~CR0_WP)
        return regs.cr0

    mark = watcher.mark()
    for _ in range(200):  # the idle guest is mostly stopped in native_safe_halt's ret
        cr0 = watcher.stopped_async(call)
        if cr0 is not None:
            break
        time.sleep(0.05)
    assert cr0 is not None and cr0 & CR0_WP, "no stop at a kernel ret"
    hits = watcher.wait_for("security.control_register_write", mark, severity=Severity.CRITICAL)
    assert "CR0.WP cleared" in hits[0].message and hits[0].details["new"] == hex(cr0 & ~CR0_WP), hits[0]
    assert hits[0].details["old"] == hex(cr0) and hits[0].details["where"].startswith("native_write_cr0+"), hits[0]
    assert watcher.target.live.is_inline(int(hits[0].details["rip"], 16))  # a watchpoint stop, no flush
    assert "CR0 WP bit went missing" in lab_guest.shell("dmesg | grep 'WP bit'", timeout=SLOW)

    async def cr0_now(linux, source):
        return (await source.registers(0)).cr0

    assert watcher.stopped_async(cr0_now) == cr0  # pinned back
