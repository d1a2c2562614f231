"""The QEMU live backend: shared-RAM reads, QMP control, gdbstub registers, breakpoints and events.

Theory of operation:

* Memory: QMP ``qom-list``/``qom-get`` on ``/objects`` find a ``memory-backend-file`` with
  ``share=on``; its file is mapped (read-only unless asked) and QEMU's flat view of the system
  address space gives the GPA -> file offset runs (``qemu_ram``). Without one, reads go through
  the gdbstub in physical mode (``Qqemu.PhyMemMode:1``), ~100x slower, with a warning once.
* Run state has ONE owner: the gdbstub link. QMP is used for queries only (status, HMP
  ``info registers``/``info mtree``, starting the stub); a QMP ``cont`` behind the stub's back
  would make its next packet act as an interrupt (DESIGN.md).
* Events: the guest runs until a stop reply; it then stays stopped while the consumer handles
  the event. QEMU <= 10.1 flushes its WHOLE translation cache on every breakpoint or
  single-step stop (``tb_flush`` in gdbstub's ``gdb_vm_state_change``; not on watchpoint hits
  nor on interrupts), and the guest then re-translates its hot code for milliseconds: measured
  here, one flush per stop (``info jit``). So continuing past a breakpoint at X must not stop
  twice. By default ("emulate") the instruction at X is not executed by QEMU at all when it
  is one of the NOPs that open kernel functions (ftrace ``nop5``, ``endbr64``) or a ``push``:
  RIP (and RSP plus the stack slot) are written with ``P``/``M`` and the guest continues, all
  in one pipelined write. Otherwise "hop" (one vCPU: lift X, break on the next instruction,
  put X back there) or a ``vCont;s`` of just that vCPU (SMP: X is global to all vCPUs, another
  could pass it while lifted), both of which cost a second stop.
* Inline hooks (``add_breakpoint(..., inline=True)``, for function entries): the guest's NOP
  becomes a call to a trampoline whose data read a watchpoint catches, so the stop is a
  watchpoint stop and QEMU flushes nothing (``inline_hooks``). The consumer sees the stop as
  a breakpoint at the hooked address, with the registers as they were there.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import socket
import tempfile
import time
from typing import AsyncIterator, Callable

import attrs
import capstone
import structlog
import trio

from vmwatch.cpu import Registers
from vmwatch.errors import LinkClosedError, LinkError, ProtocolError
from vmwatch.events import Access, Breakpoint, Event, MemoryAccess, SingleStep, SourceEnded
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import GdbConnection, RemoteError
from vmwatch.live import inline_hooks as ih
from vmwatch.live.qemu_hooks import InlineHooking
from vmwatch.live.qemu_msrs import MsrAccess
from vmwatch.live.qemu_registers import g_decoder, parse_descriptor_tables, with_descriptors
from vmwatch.live.qemu_ram import GdbMemory, SharedRam, overlay, ram_runs
from vmwatch.live.qmp import open_qmp

log = structlog.get_logger()

SIGINT = 2
SIGTRAP = 5
STEP_RETRIES = 3
"""Tries for one single step whose report left RIP on an instruction that always moves it."""
_BP = p.WatchKind.SOFTWARE
_WATCH_KIND = {Access.WRITE: p.WatchKind.WRITE, Access.READ: p.WatchKind.READ, Access.READ_WRITE: p.WatchKind.ACCESS}
_WATCH_ACCESS = {"watch": Access.WRITE, "rwatch": Access.READ, "awatch": Access.READ_WRITE}
_REG_ALIASES = {"rflags": "eflags", "kernel_gs_base": "k_gs_base"}
_BRANCH_GROUPS = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_IRET,
                  capstone.CS_GRP_INT, capstone.CS_GRP_BRANCH_RELATIVE)
_GPR64 = frozenset(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                    "r13", "r14", "r15"))
_SERIALIZING = frozenset(("syscall", "sysret", "sysenter", "sysexit", "hlt", "mwait", "ud2", "int3",
                          "wrmsr", "cpuid", "lgdt", "lidt", "mov cr", "invlpg", "swapgs", "iretq"))


class _Hop:
    """A step-over in flight: the user breakpoint ``addr`` is lifted until ``next_addr`` is reached."""

    __slots__ = ("addr", "next_addr")

    def __init__(self, addr: int, next_addr: int) -> None:
        self.addr = addr
        self.next_addr = next_addr


class QemuVM(InlineHooking, MsrAccess):
    """A live QEMU guest. Get one from :func:`attach_qemu`."""

    def __init__(self, qmp: object, gdb: GdbConnection, *, layout: list[p.RegisterInfo],
                 threads: list[p.ThreadId], gdb_path: str) -> None:
        self.qmp = qmp
        self.gdb = gdb
        self.gdb_path = gdb_path
        self.memory: object = None
        """Guest-physical memory (``SharedRam`` or the slow ``GdbMemory``); volatile."""
        self.on_resume: list[Callable[[], None]] = [self._forget_registers]
        """Called (synchronously) every time the guest is let run: drop caches of guest memory."""
        self.step_over = "auto"
        """How to continue past a breakpoint: ``"emulate"`` (NOP/``push``: move RIP by hand, else
        step), ``"hop"``, ``"step"``, or ``"auto"`` (emulate, else hop on one vCPU, else step)."""
        self._layout = {r.name: r for r in layout}
        self._g_size = sum(r.size for r in layout)
        self._decode_g = g_decoder(self._layout)
        self._threads = threads
        self._lock = trio.Lock()
        self._pending: collections.deque[Event] = collections.deque()
        self._raw_stops: collections.deque[p.StopReply | p.Exited] = collections.deque()
        """Stop replies a synchronous gdbstub memory read ran into; digested by the async side."""
        self._breakpoints: set[int] = set()
        self.inline_hooks = True
        """Allow inline hooks (attach turns them off under KVM, whose breakpoints are cheap)."""
        self._hooks: dict[int, ih.Hook] = {}
        self._hook_at_slot: dict[int, ih.Hook] = {}
        self._spare_slots: set[int] = set()
        """Trampolines of removed hooks (left in place, see inline_hooks)."""
        self._hook_stops: dict[int, tuple[ih.Hook, int]] = {}
        """vCPUs stopped inside a trampoline: the hook and the raw RSP there."""
        self._hidden: dict[int, bytes] = {}
        """Guest code vmwatch patched (call sites, trampolines, MSR probes): address -> original."""
        self._masks: dict[int, bytes] = {}
        """The same by guest-physical address: what ``memory`` shows over the patches."""
        self._probes: dict[tuple[int, bytes], int | None] = {}
        """(code page, rdmsr or wrmsr) -> its MSR probe (``inline_hooks.msr_probe``), None when
        the page has no room."""
        self._watchpoints: dict[tuple[int, int, Access], None] = {}
        self._hop: _Hop | None = None
        self._held = False  # the consumer called pause(): don't auto-resume
        self._resume_from: tuple[int, int] | None = None  # (vcpu, rip) of a delivered breakpoint
        self._selected: str | None = None
        self._sstep_flags: int | None = None
        self._phys_mode = False
        self._waiting = False
        self._stop_wanted = False
        self._stopped = trio.Event()
        self._closed: str | None = None
        self._seq = 0
        self._next_insn: dict[int, int | None] = {}
        self._insns: dict[int, capstone.CsInsn | None] = {}
        self._descriptors: dict[int, tuple[int, int, int, int]] = {}
        self._regs_cache: dict[int, Registers] = {}
        self._md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._md.detail = True
        self.stats = collections.Counter()
        """Counts of internal stops, hops and steps (for benchmarks)."""

    # ------------------------------------------------------------------ basic facts

    @property
    def vcpu_count(self) -> int:
        return len(self._threads)

    @property
    def running(self) -> bool:
        """True when the gdbstub link says the guest runs."""
        return self.gdb.state is p.State.RUNNING

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``debug``, ...) from QMP."""
        return (await self.qmp.execute("query-status"))["status"]

    def _thread(self, vcpu: int) -> p.ThreadId:
        if not 0 <= vcpu < len(self._threads):
            raise ValueError(f"vcpu {vcpu!r} out of range 0..{len(self._threads) - 1}")
        return self._threads[vcpu]

    def _vcpu_of(self, thread: p.ThreadId | None) -> int:
        if thread is None:
            return 0
        for i, t in enumerate(self._threads):
            if t.tid == thread.tid:
                return i
        return max(thread.tid - 1, 0)

    def _event_fields(self, vcpu: int) -> dict:
        self._seq += 1
        return {"seq": self._seq - 1, "time_ns": time.monotonic_ns(), "vcpu": vcpu}

    # ------------------------------------------------------------------ run-state ownership

    def _forget_registers(self) -> None:
        self._regs_cache.clear()
        self._hook_stops.clear()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise LinkClosedError(f"QEMU link closed: {self._closed}")

    async def _stop_locked(self) -> None:
        """Make sure the guest is stopped (lock held). Real events that race in are queued."""
        if self.gdb.state is not p.State.RUNNING:
            return
        if self._waiting:
            self._stop_wanted = True
            self._stopped = trio.Event()
            await self.gdb.interrupt()
            await self._stopped.wait()
            self._stop_wanted = False
            self._check_open()
            if self.gdb.state is p.State.RUNNING:  # the waiter was cancelled before the stop reply
                await self._on_stop(await self.gdb.wait_stop(soon=True))
            return
        await self.gdb.interrupt()
        await self._on_stop(await self.gdb.wait_stop(soon=True))

    @contextlib.asynccontextmanager
    async def _stopped_link(self) -> AsyncIterator[None]:
        """Hold the link with the guest stopped; put it back running if we stopped it."""
        self._check_open()
        async with self._lock:
            was_running = self.gdb.state is p.State.RUNNING
            await self._stop_locked()
            yield
            if was_running and not self._pending and not self._held and self.gdb.state is p.State.STOPPED \
                    and not self._waiting:
                await self._resume_locked()

    async def pause(self) -> None:
        """Stop the guest and keep it stopped until :meth:`resume` (also across ``events()``)."""
        self._check_open()
        async with self._lock:
            self._held = True
            await self._stop_locked()

    async def resume(self) -> None:
        """Let the guest run (stepping over a breakpoint it is stopped at, without losing it).

        Not while events are queued: a stop that :meth:`pause` took for an interrupt may have
        been a trap hit; the guest then stays stopped for it until ``events()`` hands it out
        and is asked for the next one (as ``_stopped_link`` already does).
        """
        self._check_open()
        async with self._lock:
            self._held = False
            if self.gdb.state is p.State.STOPPED and not self._pending:
                await self._resume_locked()

    async def _resume_locked(self) -> None:
        _drain_qmp_events(self.qmp)
        start = self._resume_from
        self._resume_from = None
        if start is not None and start[1] in self._breakpoints:
            vcpu, addr = start
            mode = self.step_over
            if mode in ("auto", "emulate"):
                writes = await self._emulate(vcpu, addr)
                if writes is not None:
                    self.stats["emulated"] += 1
                    self._call_on_resume()
                    await self.gdb.batch([*writes, p.cont()])
                    return
            self._call_on_resume()
            nxt = None
            if mode == "hop" or (mode == "auto" and self.vcpu_count == 1):
                nxt = await self._next_instruction(vcpu, addr)
            if nxt is not None and nxt not in self._breakpoints:
                self._hop = _Hop(addr, nxt)
                self.stats["hops"] += 1
                await self.gdb.batch([p.remove_point(_BP, addr), p.insert_point(_BP, nxt), p.cont()])
                return
            # single-step just that vCPU (others stay stopped), then continue all
            self.stats["steps_over"] += 1
            await self._set_sstep(p.SSTEP_ENABLE | p.SSTEP_NOIRQ | p.SSTEP_NOTIMER)
            await self.gdb.resume(p.vcont(("s", str(self._thread(vcpu)))))
            stop = await self.gdb.wait_stop(soon=True)
            if not self._is_plain_step(stop):
                await self._on_stop(stop)
                return
        else:
            self._call_on_resume()
        await self.gdb.resume(p.cont())

    def _call_on_resume(self) -> None:
        for callback in self.on_resume:
            callback()

    async def _decode(self, vcpu: int, addr: int) -> capstone.CsInsn | None:
        """The instruction at ``addr`` (cached: code under a breakpoint is assumed not to change)."""
        if addr not in self._insns:
            try:
                await self._select(vcpu)
                await self._set_phys(False)
                code = p.decode_hex(await self.gdb.request(p.read_memory(addr, 16)))
                self._insns[addr] = next(self._md.disasm(code, addr), None)
            except RemoteError:
                self._insns[addr] = None
        return self._insns[addr]

    async def _emulate(self, vcpu: int, addr: int) -> list[p.Command] | None:
        """Register (and stack) writes that do what the instruction at ``addr`` would do.

        Only for instructions with no flags and no side effects beyond that: the NOPs that open
        kernel functions (the ftrace ``nop5``, ``endbr64``) and ``push reg``. Moving RIP past the
        breakpoint by hand needs no single step and no breakpoint change, and QEMU 7.2 flushes
        its whole translation cache on both (measured: 2 flushes per hop, ~5 ms each).
        """
        rip = self._layout["rip"]
        hook = self._hooks.get(addr)
        if hook is not None:  # the NOPs up to and including the patched site
            await self._select(vcpu)
            return [p.write_register(rip.regnum, (hook.site + ih.SITE_SIZE).to_bytes(8, "little"))]
        insn = await self._decode(vcpu, addr)
        if insn is None:
            return None
        after = [p.write_register(rip.regnum, (addr + insn.size).to_bytes(8, "little"))]
        if insn.mnemonic in ("nop", "endbr64", "endbr32", "pause"):
            await self._select(vcpu)
            return after
        if insn.mnemonic == "push" and insn.op_str in _GPR64:
            regs = await self._read_g(vcpu)
            value = getattr(regs, insn.op_str)
            rsp = (regs.rsp - 8) & (1 << 64) - 1
            await self._set_phys(False)
            await self._select(vcpu)
            rsp_info = self._layout["rsp"]
            return [p.write_memory(rsp, value.to_bytes(8, "little")),
                    p.write_register(rsp_info.regnum, rsp.to_bytes(8, "little")), *after]
        return None

    def _is_plain_step(self, stop: p.StopReply | p.Exited) -> bool:
        return isinstance(stop, p.StopReply) and stop.signal == SIGTRAP and stop.watch is None

    async def _next_instruction(self, vcpu: int, addr: int) -> int | None:
        """Address of the instruction after ``addr`` if it surely falls through (None otherwise)."""
        if addr in self._next_insn:
            return self._next_insn[addr]
        nxt = None
        insn = await self._decode(vcpu, addr)
        if insn is not None and not any(insn.group(g) for g in _BRANCH_GROUPS) and \
                not any(f"{insn.mnemonic} {insn.op_str}".startswith(s) for s in _SERIALIZING) and \
                insn.mnemonic not in ("loop", "loope", "loopne", "jrcxz", "jecxz", "xbegin", "xend") \
                and not insn.mnemonic.startswith("rep"):
            nxt = addr + insn.size
        self._next_insn[addr] = nxt
        return nxt

    async def _set_sstep(self, flags: int) -> None:
        if self._sstep_flags != flags:
            await self.gdb.request(p.set_sstep_flags(flags))
            self._sstep_flags = flags

    async def _set_phys(self, on: bool) -> None:
        if self._phys_mode != on:
            await self.gdb.request(p.set_physical_mode(on))
            self._phys_mode = on
            if isinstance(self.memory, GdbMemory):
                self.memory.phys_mode = on

    async def _select(self, vcpu: int) -> None:
        thread = str(self._thread(vcpu))
        if self._selected != thread:
            await self.gdb.request(p.set_thread(thread, "g"))
            self._selected = thread

    # ------------------------------------------------------------------ stops -> events

    async def _on_stop(self, stop: p.StopReply | p.Exited, *, may_continue: bool = False) -> bool:
        """Digest a stop reply (lock held, or the sole reader). Returns True when there is
        nothing for the consumer (our own interrupt, or the internal stop of a hop).

        ``may_continue``: the caller is the event loop, which may let the guest go on at once
        after a hop's internal stop; anyone who wanted the guest stopped passes False.
        """
        if isinstance(stop, p.Exited):
            self._closed = f"guest exited with status {stop.status}"
            self._pending.append(SourceEnded(reason=self._closed, **self._event_fields(0)))
            return False
        vcpu = self._vcpu_of(stop.thread)
        hop = self._hop
        if hop is not None:
            self._hop = None
            restore = [p.insert_point(_BP, hop.addr), p.remove_point(_BP, hop.next_addr)]
            if stop.signal == SIGTRAP and stop.watch is None and may_continue:
                # Optimistic: put the breakpoint back, read RIP and continue in one write. If
                # RIP is not the hop target but a user breakpoint B, the guest re-stops at B at
                # once (a plain continue at a breakpoint does), and B is reported then.
                await self._select(vcpu)
                for callback in self.on_resume:
                    callback()
                replies = await self.gdb.batch([*restore, p.read_register(self._layout["rip"].regnum), p.cont()])
                rip = int.from_bytes(p.decode_hex(replies[-1]), "little")
                self.stats["internal_stops" if rip == hop.next_addr else "hops_interrupted"] += 1
                return True
            await self.gdb.batch(restore)
        if stop.watch is not None and stop.watch[1] in self._hook_at_slot and stop.watch[0] == "rwatch":
            hook = self._hook_at_slot[stop.watch[1]]
            self._regs_cache.pop(vcpu, None)
            regs = await self._read_g(vcpu)
            if regs.rip != hook.slot + ih.RIP_AFTER_PUSH:
                return True  # the guest read its own code there (not the trampoline's read)
            self._hook_stops[vcpu] = (hook, regs.rsp)
            self._regs_cache[vcpu] = attrs.evolve(regs, rip=hook.address, rsp=regs.rsp + ih.STACK_DEPTH)
            self._pending.append(Breakpoint(address=hook.address, **self._event_fields(vcpu)))
            return False
        if stop.watch is not None:
            kind, addr = stop.watch
            size = next((s for (a, s, _acc) in self._watchpoints if a == addr), 0)
            value = None
            if 0 < size <= 64:
                try:
                    await self._select(vcpu)
                    await self._set_phys(False)
                    value = p.decode_hex(await self.gdb.request(p.read_memory(addr, size)))
                except RemoteError:
                    value = None
            self._pending.append(MemoryAccess(access=_WATCH_ACCESS[kind], address=addr, size=size,
                                              value=value, **self._event_fields(vcpu)))
            return False
        if stop.signal == SIGTRAP:
            regs = await self._read_g(vcpu)
            if regs.rip not in self._breakpoints:
                return True  # a breakpoint removed meanwhile, or a spurious trap
            self._resume_from = (vcpu, regs.rip)
            self._pending.append(Breakpoint(address=regs.rip, **self._event_fields(vcpu)))
            return False
        return True  # SIGINT (our interrupt) or another signal: nothing to report

    async def _read_g(self, vcpu: int) -> Registers:
        """Registers of a stopped vCPU, cached until the guest runs again."""
        regs = self._regs_cache.get(vcpu)
        if regs is None:
            await self._select(vcpu)
            data = p.decode_hex(await self.gdb.request(p.read_registers()))
            if len(data) < self._g_size:
                raise ProtocolError(f"g packet of {len(data)} bytes, expected {self._g_size}")
            regs = self._decode_g(data, vcpu)
            stopped = self._hook_stops.get(vcpu)
            if stopped is not None:  # as at the hooked address: before the call and the push
                regs = attrs.evolve(regs, rip=stopped[0].address, rsp=stopped[1] + ih.STACK_DEPTH)
            self._regs_cache[vcpu] = regs
        return regs

    async def _rip(self, vcpu: int) -> int:
        await self._select(vcpu)
        info = self._layout["rip"]
        return int.from_bytes(p.decode_hex(await self.gdb.request(p.read_register(info.regnum))), "little")

    def events(self) -> EventStream:
        """Breakpoint / MemoryAccess / SingleStep events, one at a time, guest stopped meanwhile.

        The guest stays stopped while the consumer handles an event. Asking for the next event
        lets it run again, unless the consumer called :meth:`pause` (then only :meth:`resume`
        does); an explicit :meth:`resume` inside the loop body is fine too. The stream ends with
        one :class:`SourceEnded` when QEMU exits or the link drops. Breaking out of the loop
        leaves the guest stopped at the last event (``resume()`` or detaching lets it go).
        """
        return EventStream(self)

    async def _next_event(self) -> Event:
        while True:
            while self._raw_stops and not self._pending:
                async with self._lock:
                    await self._on_stop(self._raw_stops.popleft())
            if self._pending:
                return self._pending.popleft()
            if self._closed is not None:
                raise StopAsyncIteration
            try:
                async with self._lock:
                    if self.gdb.state is p.State.STOPPED and not self._pending and not self._held:
                        await self._resume_locked()
                    self._waiting = self.gdb.state is p.State.RUNNING
                if not self._waiting:
                    await trio.sleep(0.01)  # held by pause(), or events queued meanwhile
                    continue
                try:
                    stop = await self.gdb.wait_stop()
                finally:
                    self._waiting = False
                    if self._stop_wanted and self.gdb.state is p.State.RUNNING:
                        self._stopped.set()  # cancelled: the requester reads the stop itself
                # From here the stop reply is consumed: digest it whatever cancellation says,
                # or a lifted breakpoint (hop) or an event would be lost.
                with trio.CancelScope(shield=True):
                    if self._stop_wanted:
                        self._stop_wanted = False
                        await self._on_stop(stop)
                        self._stopped.set()
                        continue
                    async with self._lock:
                        await self._on_stop(stop, may_continue=True)
            except (LinkClosedError, ProtocolError) as exc:
                self._closed = str(exc)
                self._stopped.set()
                return SourceEnded(reason=self._closed, **self._event_fields(0))

    # ------------------------------------------------------------------ registers

    async def registers(self, vcpu: int = 0, *, descriptors: bool = True) -> Registers:
        """All registers of one vCPU (GDT/IDT bases from HMP, cached: they change only at boot).

        Stops the guest for the read if it runs, and lets it go again afterwards.
        """
        self._thread(vcpu)
        async with self._stopped_link():
            regs = await self._read_g(vcpu)
        if descriptors:
            desc = self._descriptors.get(vcpu)
            if desc is None:
                desc = self._descriptors[vcpu] = await self._read_descriptors(vcpu)
            regs = with_descriptors(regs, desc)
        return regs

    async def all_registers(self) -> tuple[Registers, ...]:
        return tuple([await self.registers(v) for v in range(self.vcpu_count)])

    async def _read_descriptors(self, vcpu: int) -> tuple[int, int, int, int]:
        text = await self.qmp.execute("human-monitor-command", command_line="info registers", cpu_index=vcpu)
        return parse_descriptor_tables(text)

    async def set_registers(self, vcpu: int = 0, **values: int) -> None:
        """Write registers by ``Registers`` field name (``rip=...``, ``rax=...``, ``cr3=...``)."""
        writes = []
        for name, value in values.items():
            info = self._layout.get(_REG_ALIASES.get(name, name))
            if info is None:
                raise ValueError(f"unknown or unwritable register {name!r}")
            if not isinstance(value, int) or value < 0 or value >= 1 << info.bitsize:
                raise ValueError(f"value {value!r} does not fit register {name!r}")
            writes.append(p.write_register(info.regnum, value.to_bytes(info.size, "little")))
        async with self._stopped_link():
            await self._leave_trampoline(vcpu)
            await self._select(vcpu)
            for command in writes:
                await self.gdb.request(command)
            self._regs_cache.pop(vcpu, None)
            if "rip" in values:
                self._resume_from = None

    # ------------------------------------------------------------------ break / watch / step

    async def add_breakpoint(self, vaddr: int, *, inline: bool = False) -> bool:
        """Execution breakpoint at a guest virtual address. Returns True when it is inline.

        A gdbstub breakpoint is invisible to the guest but costs a TCG guest a flush of all its
        translated code per hit. ``inline=True`` is for callers that know ``vaddr`` is the
        entry of a kernel function: where it opens with the ftrace NOP (and the guest runs
        under TCG), the breakpoint is an inline hook instead (see ``inline_hooks``): no flush,
        about 10x more events per second, but the guest's own reads of its code see the patch
        (vmwatch's reads, through ``memory`` and :meth:`read_memory`, see the original bytes).
        """
        async with self._stopped_link():
            if vaddr in self._breakpoints:
                return vaddr in self._hooks
            if inline and self.inline_hooks and await self._add_hook(vaddr):
                self._breakpoints.add(vaddr)
                return True
            await self.gdb.request(p.insert_point(_BP, vaddr))
            self._breakpoints.add(vaddr)
            return False

    async def remove_breakpoint(self, vaddr: int) -> None:
        async with self._stopped_link():
            if vaddr in self._breakpoints:
                self._breakpoints.discard(vaddr)
                self._next_insn.pop(vaddr, None)
                self._insns.pop(vaddr, None)
                hook = self._hooks.pop(vaddr, None)
                if hook is None:
                    await self.gdb.request(p.remove_point(_BP, vaddr))
                    return
                await self._unhook(hook)

    async def add_watchpoint(self, vaddr: int, size: int, access: Access = Access.WRITE) -> None:
        """Watch ``size`` bytes at ``vaddr`` for reads, writes or both (any length).

        The event's ``address`` is the START of the watched range (what QEMU reports).
        """
        kind = _WATCH_KIND.get(access)
        if kind is None:
            raise ValueError(f"access must be READ, WRITE or READ_WRITE, not {access!r}")
        if size <= 0:
            raise ValueError(f"size must be > 0, not {size!r}")
        async with self._stopped_link():
            await self.gdb.request(p.insert_point(kind, vaddr, size))
            self._watchpoints[(vaddr, size, access)] = None

    async def remove_watchpoint(self, vaddr: int, size: int, access: Access = Access.WRITE) -> None:
        async with self._stopped_link():
            if self._watchpoints.pop((vaddr, size, access), 0) is None:
                await self.gdb.request(p.remove_point(_WATCH_KIND[access], vaddr, size))

    async def step(self, vcpu: int = 0, *, mask_interrupts: bool = True) -> SingleStep:
        """Execute one instruction on ``vcpu`` (interrupts and timers masked unless told).

        The guest is stopped before and after (a running guest is paused first and stays paused).
        """
        self._check_open()
        async with self._lock:
            self._held = True
            await self._stop_locked()
            flags = p.SSTEP_ENABLE | (p.SSTEP_NOIRQ | p.SSTEP_NOTIMER if mask_interrupts else 0)
            await self._set_sstep(flags)
            await self._leave_trampoline(vcpu)
            for callback in self.on_resume:
                callback()
            self._resume_from = None
            before = await self._rip(vcpu)
            hook = next((h for h in self._hooks.values() if h.site == before), None)
            if hook is not None:  # the call stands for a NOP: step it by hand
                await self._select(vcpu)
                await self.gdb.request(p.write_register(self._layout["rip"].regnum,
                                                        (hook.site + ih.SITE_SIZE).to_bytes(8, "little")))
                self.stats["steps"] += 1
                return SingleStep(rip=hook.site + ih.SITE_SIZE, **self._event_fields(vcpu))
            for _ in range(STEP_RETRIES):
                await self.gdb.resume(p.vcont(("s", str(self._thread(vcpu)))))
                stop = await self.gdb.wait_stop(soon=True)
                if isinstance(stop, p.Exited) or stop.watch is not None:
                    await self._on_stop(stop)
                    break
                rip = await self._rip(vcpu)
                # Seen once under load (QEMU 7.2, TCG): a step reported with RIP still on an
                # instruction that always moves it (not rep, not a branch): nothing ran; step again.
                if rip != before or await self._next_instruction(vcpu, before) is None:
                    break
                log.debug("single step did not execute; stepping again", rip=hex(rip), stop=str(stop))
            rip = await self._rip(vcpu)
            if rip in self._breakpoints:
                self._resume_from = (vcpu, rip)
            self.stats["steps"] += 1
            return SingleStep(rip=rip, **self._event_fields(vcpu))

    # ------------------------------------------------------------------ memory through QEMU

    async def read_memory(self, addr: int, size: int, *, physical: bool = False, vcpu: int = 0) -> bytes:
        """Read guest memory through the gdbstub (QEMU's own MMU for virtual addresses).

        Slow (one ``m`` round trip per 0x800 bytes) but independent of vmwatch's page walker
        and of the RAM file: a reference for checks, and the only way for MMIO-free reads of a
        guest without shared RAM. Stops the guest for the read if it runs.

        Raises:
            PhysicalReadError: physical bytes not readable. TranslationError: a virtual one.
        """
        from vmwatch.errors import PhysicalReadError, TranslationError

        out = bytearray()
        async with self._stopped_link():
            if not physical:
                await self._select(vcpu)
            await self._set_phys(physical)
            for chunk_addr, chunk_size in p.memory_chunks(addr, size):
                try:
                    out += p.decode_hex(await self.gdb.request(p.read_memory(chunk_addr, chunk_size)))
                except RemoteError:
                    if physical:
                        raise PhysicalReadError(chunk_addr, chunk_size) from None
                    raise TranslationError(chunk_addr, 0, f"QEMU cannot read virtual address {chunk_addr:#x}") from None
        overlay(out, addr, (self._masks if physical else self._hidden).items())  # the bytes under our patches
        return bytes(out)

    # ------------------------------------------------------------------ lifetime

    async def _detach(self) -> None:
        if self._closed is not None:
            return
        with contextlib.suppress(LinkError):
            async with self._lock:
                await self._stop_locked()
                if self._hop is not None:
                    await self.gdb.batch([p.insert_point(_BP, self._hop.addr), p.remove_point(_BP, self._hop.next_addr)])
                    self._hop = None
                for addr in self._breakpoints:
                    hook = self._hooks.pop(addr, None)
                    if hook is not None:  # a vCPU inside its trampoline just returns from it
                        await self._unhook(hook)
                    else:
                        await self.gdb.request(p.remove_point(_BP, addr), check=False)
                for (addr, size, access) in self._watchpoints:
                    await self.gdb.request(p.remove_point(_WATCH_KIND[access], addr, size), check=False)
                await self._set_phys(False)
                await self.gdb.request(p.detach())


class EventStream:
    """Async iterator over a :class:`QemuVM`'s events (a class, not an async generator, so
    leaving the loop early needs no ``aclosing``)."""

    def __init__(self, vm: QemuVM) -> None:
        self._vm = vm
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        event = await self._vm._next_event()
        if isinstance(event, SourceEnded):
            self._ended = True
        return event


# ---------------------------------------------------------------------- attaching


async def _find_ram(qmp: object) -> list[tuple[str, str]]:
    """``(region name, file path)`` of every shared memory-backend-file."""
    found = []
    for child in await qmp.execute("qom-list", path="/objects"):
        if child.get("type") != "child<memory-backend-file>":
            continue
        obj = f"/objects/{child['name']}"
        if not await qmp.execute("qom-get", path=obj, property="share"):
            continue  # a private mapping: the file does not show the guest's writes
        path = await qmp.execute("qom-get", path=obj, property="mem-path")
        found.append((child["name"], path))
        found.append((obj, path))  # x-use-canonical-path-for-ramblock-id names the region by path
    return found


def _private_dir() -> str:
    """``$TMPDIR/vmwatch-<uid>``, mode 0700 and ours, for gdbstub sockets we ask QEMU to open.

    The sockets outlive an attach: QEMU 7.2 cannot start a second gdbstub ("duplicate yank
    instance"), so the next attach finds and reuses the first one. Sockets of QEMUs that are
    gone are removed here.
    """
    path = os.path.join(tempfile.gettempdir(), f"vmwatch-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path) or os.path.islink(path):
        raise LinkError(f"{path} is not a private directory of ours (mode {st.st_mode & 0o777:o})")
    # A socket file nobody listens on any more (its QEMU exited) is removed. Never probe by
    # connecting: a gdbstub stops its guest when a client connects.
    try:
        with open("/proc/net/unix") as f:
            bound = {line.split()[-1] for line in f if len(line.split()) >= 8}
    except OSError:
        bound = None
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if bound is not None and name.startswith("gdb-") and name.endswith(".sock") and full not in bound:
            with contextlib.suppress(OSError):
                os.unlink(full)
    return path


async def _gdb_socket(qmp: object) -> str:
    """Path of a gdbstub unix socket: QEMU's existing one or a new one we start."""
    for chardev in await qmp.execute("query-chardev"):
        name = chardev.get("filename", "")
        if chardev.get("label") == "gdb":
            name = name.removeprefix("disconnected:")
            path = name[len("unix:"):].split(",")[0] if name.startswith("unix:") else ""
            if path and os.path.exists(path):
                return path
            raise LinkError(f"QEMU's gdbstub listens on {name!r}, which vmwatch cannot reach "
                            "(and QEMU cannot start a second one)")
    path = os.path.join(await trio.to_thread.run_sync(_private_dir), f"gdb-{secrets.token_hex(6)}.sock")
    reply = await qmp.execute("human-monitor-command", command_line=f"gdbserver unix:{path},server=on,wait=off")
    if not os.path.exists(path):
        raise LinkError(f"QEMU did not start a gdbstub at {path}: {str(reply).strip()}")
    return path


async def _connect_gdb(path: str) -> GdbConnection:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise LinkClosedError(f"cannot connect to gdbstub at {path}: {exc.strerror or exc}") from exc
    return GdbConnection(stream)


async def _fetch_layout(gdb: GdbConnection) -> list[p.RegisterInfo]:
    docs: dict[str, bytes] = {}

    async def fetch(name: str, depth: int) -> None:
        if name in docs or depth > 8:
            return
        docs[name] = await gdb.read_features(name)
        for inc in p.parse_target_xml(docs[name])[0]:
            await fetch(inc, depth + 1)

    await fetch("target.xml", 0)
    return p.register_layout(docs.__getitem__)


async def _thread_list(gdb: GdbConnection) -> list[p.ThreadId]:
    threads: list[p.ThreadId] = []
    chunk = p.parse_thread_list(await gdb.request(p.query_threads(True)))
    while chunk:
        threads.extend(chunk)
        if len(threads) > 4096:
            raise ProtocolError("gdbstub lists more than 4096 threads")
        chunk = p.parse_thread_list(await gdb.request(p.query_threads(False)))
    if not threads:
        raise ProtocolError("gdbstub lists no threads")
    return threads


@contextlib.asynccontextmanager
async def attach_qemu(qmp_path: str, *, writable: bool = False) -> AsyncIterator[QemuVM]:
    """Attach to a running QEMU by its QMP socket alone.

    Maps the shared RAM file, starts a gdbstub on a private unix socket when QEMU has none,
    connects to it and leaves the guest in the run state it was found in (also on exit,
    when every breakpoint and watchpoint is removed and the stub detached).

    Raises:
        LinkError: QMP or the gdbstub cannot be reached or misbehave.
    """
    async with open_qmp(qmp_path) as qmp:
        was_running = (await qmp.execute("query-status"))["running"]
        ram = await _find_ram(qmp)
        mtree = await qmp.execute("human-monitor-command", command_line="info mtree -f")
        gdb_path = await _gdb_socket(qmp)
        with trio.fail_after(10):
            gdb = await _connect_gdb(gdb_path)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(gdb.aclose)
            with trio.fail_after(10):
                await gdb.request(p.query_supported())
                await gdb.query_stop()
                layout = await _fetch_layout(gdb)
                threads = await _thread_list(gdb)
                await gdb.request(p.set_physical_mode(False))
            vm = QemuVM(qmp, gdb, layout=layout, threads=threads, gdb_path=gdb_path)
            with contextlib.suppress(LinkError, KeyError, TypeError):
                vm.inline_hooks = not (await qmp.execute("query-kvm"))["enabled"]
            vm.memory = _open_memory(vm, ram, mtree, writable)
            stack.callback(_close_memory, vm)
            if was_running:
                await vm.gdb.resume(p.cont())
            try:
                yield vm
            finally:
                with trio.CancelScope(shield=True):
                    await vm._detach()
                    if not was_running and vm._closed is None:
                        with contextlib.suppress(LinkError):
                            await qmp.execute("stop")


_WARNED: list[bool] = []
"""Say once per process that memory goes through the gdbstub."""


def _open_memory(vm: QemuVM, ram: list[tuple[str, str]], mtree: str, writable: bool) -> object:
    if ram:
        paths = {path for _, path in ram}
        if len(paths) == 1:
            runs = ram_runs(mtree, [name for name, _ in ram])
            if runs:
                return SharedRam(paths.pop(), runs, writable=writable)
    if not _WARNED:
        _WARNED.append(True)
        log.warning("qemu.slow_memory", reason="no shared memory-backend-file: reading guest RAM through the gdbstub",
                    hint="start QEMU with -object memory-backend-file,share=on,... -machine memory-backend=...")

    def link_idle() -> bool:
        return not vm._lock.locked() and not vm._waiting

    def on_stop(stop: p.StopReply | p.Exited) -> bool:
        # called from a synchronous read that interrupted the guest: a real event stays queued
        if isinstance(stop, p.StopReply) and stop.signal == SIGINT:
            return True
        vm._raw_stops.append(stop)
        return False

    def set_phys(on: bool) -> None:
        vm._phys_mode = on

    sock = socket.fromfd(vm.gdb.stream.socket.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    return GdbMemory(vm.gdb.core, sock, ram_runs(mtree, None),
                     link_idle=link_idle, on_stop=on_stop, set_phys_mode=set_phys, writable=writable)


def _close_memory(vm: QemuVM) -> None:
    if isinstance(vm.memory, SharedRam):
        vm.memory.close()
    elif isinstance(vm.memory, GdbMemory):
        vm.memory.close()


def _drain_qmp_events(qmp: object) -> None:
    """Drop queued QMP STOP/RESUME events (every gdb stop makes some) so the buffer never fills."""
    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        while True:
            qmp.events.receive_nowait()
