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
  the event (``qemu_events``). Continuing past a breakpoint costs no second stop where the
  instruction can be emulated (``qemu_stepping``, which says why: QEMU's translation flush).
* Inline hooks (``add_breakpoint(..., inline=True)``, for function entries): the guest's NOP
  becomes a call to a trampoline whose data read a watchpoint catches, so the stop is a
  watchpoint stop and QEMU flushes nothing (``inline_hooks``). The consumer sees the stop as
  a breakpoint at the hooked address, with the registers as they were there.

The class is assembled from mixins, one file per job: ``qemu_points`` (breakpoints and
watchpoints), ``qemu_events`` (stops -> events), ``qemu_stepping`` (step-over and single
steps), ``qemu_hooks``, ``qemu_msrs``; ``qemu_connect`` holds the steps of attaching.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import AsyncIterator, Callable

import capstone
import trio

from vmwatch.cpu import Registers
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import LinkClosedError, LinkError, ProtocolError, bare_exception
from vmwatch.events import Access, Event
from vmwatch.live import inline_hooks as ih
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import GdbConnection, RemoteError
from vmwatch.live.qemu_connect import (answered_within, connect_gdb, fetch_layout, find_ram,
                                       gdb_socket, open_memory, thread_list)
from vmwatch.live.qemu_events import EventDelivery, EventStream as EventStream
from vmwatch.live.qemu_hooks import InlineHooking
from vmwatch.live.qemu_liveness import Liveness
from vmwatch.live.qemu_msrs import MsrAccess
from vmwatch.live.qemu_points import BP, WATCH_KIND, Points
from vmwatch.live.qemu_ram import GdbMemory, overlay
from vmwatch.live.qemu_registers import Aarch64Layout, g_decoder, parse_descriptor_tables, with_descriptors
from vmwatch.live.qemu_stepping import Hop, Stepping
from vmwatch.live.qmp import open_qmp

_REG_ALIASES = {"rflags": "eflags", "kernel_gs_base": "k_gs_base"}


class QemuVM(Points, EventDelivery, Stepping, InlineHooking, MsrAccess, Liveness):
    """A live QEMU guest. Get one from :func:`attach_qemu`."""

    def __init__(self, qmp: object, gdb: GdbConnection, *, layout: list[p.RegisterInfo],
                 threads: list[p.ThreadId], gdb_path: str, arch: str | None = None) -> None:
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
        self.arch = arch
        """The gdbstub's ``<architecture>``: ``i386:x86-64``, ``i386``, ``aarch64`` (None if it names none)."""
        self._layout = {r.name: r for r in layout}
        self._a64: Aarch64Layout | None = None
        if arch == "aarch64":
            self._a64 = Aarch64Layout.from_layout(self._layout)
            self._g_size = self._a64.g_size
        else:
            self._g_size = sum(r.size for r in layout)
            self._decode_g = g_decoder(self._layout)
        self._pc_name = "pc" if self._a64 else "rip"
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
        self._spares: dict[tuple[int, object], int] = {}
        """(site, guard or moved instruction) -> the trampoline a removed guarded (hook_guards)
        or ``mov crN`` hook left there, reused only by the same hook."""
        self._hook_stops: dict[int, tuple[ih.Hook, int]] = {}
        """vCPUs stopped inside a trampoline: the hook and the raw RSP there."""
        self._hidden: dict[int, bytes] = {}
        """Guest code vmwatch patched (call sites, trampolines, MSR probes): address -> original."""
        self._masks: dict[int, bytes] = {}
        """The same by guest-physical address: what ``memory`` shows over the patches."""
        self._probes: dict[tuple[int, bytes, int], int | None] = {}
        """(code page, rdmsr or wrmsr, pages searched) -> its MSR probe (``inline_hooks.msr_probe``),
        None when those pages have no room."""
        self._watchpoints: dict[tuple[int, int, Access], None] = {}
        self._hop: Hop | None = None
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
        self._regs_cache: dict[int, Registers | Aarch64Registers] = {}
        self._md = capstone.Cs(*((capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM) if self._a64
                                 else (capstone.CS_ARCH_X86, capstone.CS_MODE_64)))
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

    def _link_idle(self) -> bool:
        """No request or event wait holds the gdb link: a synchronous read may use it."""
        return not self._lock.locked() and not self._waiting

    def _note_phys_mode(self, on: bool) -> None:
        self._phys_mode = on

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

    async def _read_g(self, vcpu: int) -> Registers | Aarch64Registers:
        """Registers of a stopped vCPU, cached until the guest runs again."""
        regs = self._regs_cache.get(vcpu)
        if regs is None:
            await self._select(vcpu)
            data = p.decode_hex(await self.gdb.request(p.read_registers()))
            if len(data) < self._g_size:
                raise ProtocolError(f"g packet of {len(data)} bytes, expected {self._g_size}")
            if self._a64 is not None:
                regs = self._a64.decode(data, await self._read_system_registers(), vcpu)
                self._regs_cache[vcpu] = regs
                return regs
            regs = self._decode_g(data, vcpu)
            stopped = self._hook_stops.get(vcpu)
            if stopped is not None:  # as at the hooked address: before the call and the push
                regs = await self._as_at_hook(regs, *stopped)
            self._regs_cache[vcpu] = regs
        return regs

    async def _read_system_registers(self) -> dict[str, int]:
        """The AArch64 system registers of the selected vCPU, one pipelined ``p`` packet each (they are
        not in ``g``): a whole uncached read (``g`` and 14 ``p``) took 0.67 ms here, 0.83 ms with a
        round trip per register (x86's ``g`` alone: 0.11 ms).

        A register the stub refuses to read (``Exx``, empty) stays unknown.
        """
        values: dict[str, int] = {}
        if not self._a64.system:  # a stub without the system-register feature (QEMU before 7.1)
            return values
        replies = await self.gdb.batch([p.read_register(regnum) for _, regnum, _ in self._a64.system], check=False)
        for (field, _, size), reply in zip(self._a64.system, replies):
            try:
                data = p.decode_hex(reply)
            except ProtocolError:
                continue
            if len(data) == size:
                values[field] = int.from_bytes(data, "little")
        return values

    async def _rip(self, vcpu: int) -> int:
        await self._select(vcpu)
        info = self._layout[self._pc_name]
        return int.from_bytes(p.decode_hex(await self.gdb.request(p.read_register(info.regnum))), "little")

    # ------------------------------------------------------------------ registers

    async def registers(self, vcpu: int = 0, *, descriptors: bool = True) -> Registers | Aarch64Registers:
        """All registers of one vCPU (x86: GDT/IDT bases from HMP, cached: they change only at boot).

        Stops the guest for the read if it runs, and lets it go again afterwards.
        """
        self._thread(vcpu)
        async with self._stopped_link():
            regs = await self._read_g(vcpu)
        if descriptors and self._a64 is None:
            desc = self._descriptors.get(vcpu)
            if desc is None:
                desc = self._descriptors[vcpu] = await self._read_descriptors(vcpu)
            regs = with_descriptors(regs, desc)
        return regs

    async def all_registers(self) -> tuple[Registers | Aarch64Registers, ...]:
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
            if "rip" in values or "pc" in values:
                self._resume_from = None

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

    async def _detach(self, *, resume: bool) -> None:
        """Remove every point; ``resume``: detach, which lets the guest run. Else the link is only
        closed: QEMU's gdbstub starts the VM on a detach packet whatever its run state (7.2's
        handle_detach -> gdb_continue -> vm_start), and a guest found paused (``-S``) must not run."""
        if self._closed is not None:
            return
        with contextlib.suppress(LinkError):
            async with self._lock:
                await self._stop_locked()
                if self._hop is not None:
                    await self.gdb.batch([p.insert_point(BP, self._hop.addr), p.remove_point(BP, self._hop.next_addr)])
                    self._hop = None
                for addr in self._breakpoints:
                    hook = self._hooks.pop(addr, None)
                    if hook is not None:  # a vCPU inside its trampoline just returns from it
                        await self._unhook(hook)
                    else:
                        await self.gdb.request(p.remove_point(BP, addr), check=False)
                for (addr, size, access) in self._watchpoints:
                    await self.gdb.request(p.remove_point(WATCH_KIND[access], addr, size), check=False)
                await self._set_phys(False)
                if resume:
                    await self.gdb.request(p.detach())


@contextlib.asynccontextmanager
async def attach_qemu(qmp_path: str, *, writable: bool = False) -> AsyncIterator[QemuVM]:
    """Attach to a running QEMU by its QMP socket alone.

    Maps the shared RAM file, starts a gdbstub on a private unix socket when QEMU has none,
    connects to it and leaves the guest in the run state it was found in (also on exit,
    when every breakpoint and watchpoint is removed and the stub detached). While attached,
    QMP is probed for liveness (``qemu_liveness``): a QEMU that stops answering ends the link.

    Raises:
        LinkError: QMP or the gdbstub cannot be reached or misbehave.
    """
    async with open_qmp(qmp_path) as qmp:
        with answered_within("QMP"):
            was_running = (await qmp.execute("query-status"))["running"]
            ram = await find_ram(qmp)
            mtree = await qmp.execute("human-monitor-command", command_line="info mtree -f")
            gdb_path = await gdb_socket(qmp)
        with answered_within("the gdbstub"):
            gdb = await connect_gdb(gdb_path)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(gdb.aclose)
            with answered_within("the gdbstub"):
                await gdb.request(p.query_supported())
                await gdb.query_stop()
                arch, layout = await fetch_layout(gdb)
                threads = await thread_list(gdb)
                await gdb.request(p.set_physical_mode(False))
            vm = QemuVM(qmp, gdb, layout=layout, threads=threads, gdb_path=gdb_path, arch=arch)
            with contextlib.suppress(LinkError, KeyError, TypeError), answered_within("QMP"):
                vm.inline_hooks = vm._a64 is None and not (await qmp.execute("query-kvm"))["enabled"]
            vm.memory = open_memory(gdb, ram, mtree, writable, link_idle=vm._link_idle,
                                    keep_stop=vm._raw_stops.append, set_phys_mode=vm._note_phys_mode)
            stack.callback(vm.memory.close)
            if was_running:
                await vm.gdb.resume(p.cont())
            try:
                with bare_exception():  # the probe never raises
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(vm._probe_liveness)
                        try:
                            yield vm
                        finally:
                            nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await vm._detach(resume=was_running)
                    if not was_running and vm._closed is None:  # "debug" after our stops: say "paused" again
                        with contextlib.suppress(LinkError):
                            await qmp.execute("stop")
