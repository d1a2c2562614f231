"""Continuing a QEMU guest past a breakpoint, and single steps: the cheapest way for each stop.

QEMU <= 10.1 flushes its WHOLE translation cache on every breakpoint or single-step stop
(``tb_flush`` in gdbstub's ``gdb_vm_state_change``; not on watchpoint hits nor on interrupts),
and the guest then re-translates its hot code for milliseconds: measured here, one flush per
stop (``info jit``). So continuing past a breakpoint at X must not stop twice. By default
("emulate") the instruction at X is not executed by QEMU at all when it is one of the NOPs
that open kernel functions (ftrace ``nop5``, ``endbr64``) or a ``push``: RIP (and RSP plus the
stack slot) are written with ``P``/``M`` and the guest continues, all in one pipelined write.
Otherwise "hop" (one vCPU: lift X, break on the next instruction, put X back there) or a
``vCont;s`` of just that vCPU (SMP: X is global to all vCPUs, another could pass it while
lifted), both of which cost a second stop. A mixin of :class:`vmwatch.live.qemu.QemuVM`.
"""

from __future__ import annotations

import contextlib

import capstone
import structlog
import trio

from vmwatch.events import SingleStep
from vmwatch.live import aarch64_steps as a64
from vmwatch.live import inline_hooks as ih
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import RemoteError
from vmwatch.live.qemu_points import BP, WATCH_KIND

log = structlog.get_logger()

SIGTRAP = 5
STEP_RETRIES = 3
"""Tries for one single step whose report left RIP on an instruction that always moves it."""
_BRANCH_GROUPS = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_IRET,
                  capstone.CS_GRP_INT, capstone.CS_GRP_BRANCH_RELATIVE)
_GPR64 = frozenset(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                    "r13", "r14", "r15"))
_SERIALIZING = frozenset(("syscall", "sysret", "sysenter", "sysexit", "hlt", "mwait", "ud2", "int3",
                          "wrmsr", "cpuid", "lgdt", "lidt", "mov cr", "invlpg", "swapgs", "iretq"))


class Hop:
    """A step-over in flight: the user breakpoint ``addr`` is lifted until ``next_addr`` is reached."""

    __slots__ = ("addr", "next_addr")

    def __init__(self, addr: int, next_addr: int) -> None:
        self.addr = addr
        self.next_addr = next_addr


class Stepping:
    """The step-over and single-step half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

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
                self._hop = Hop(addr, nxt)
                self.stats["hops"] += 1
                await self.gdb.batch([p.remove_point(BP, addr), p.insert_point(BP, nxt), p.cont()])
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
        if self._a64 is not None:
            return await self._emulate_aarch64(vcpu, addr)
        rip = self._layout["rip"]
        hook = self._hooks.get(addr)
        if hook is not None:
            return await self._past_site(vcpu, hook)
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

    async def _past_site(self, vcpu: int, hook: ih.Hook) -> list[p.Command]:
        """Writes that run a hook's patched site by hand: the NOPs up to and including it, or
        the ``mov crN, reg`` it moved into the trampoline (CRn written from the register)."""
        writes = [p.write_register(self._layout["rip"].regnum, (hook.site + ih.SITE_SIZE).to_bytes(8, "little"))]
        if hook.moved:
            control, source = ih.moved_write(hook.moved)
            value = getattr(await self._read_g(vcpu), source)
            info = self._layout[control]
            writes.insert(0, p.write_register(info.regnum, value.to_bytes(info.size, "little")))
        await self._select(vcpu)
        return writes

    async def _emulate_aarch64(self, vcpu: int, addr: int) -> list[p.Command] | None:
        """``nop`` and ``mov xD, xN`` (the ``mov x9, x30`` that opens ftrace-patched functions) by hand."""
        insn = await self._decode(vcpu, addr)
        if insn is None:
            return None
        after = [p.write_register(self._layout["pc"].regnum, (addr + 4).to_bytes(8, "little"))]
        if a64.emulates_as_nop(insn):
            await self._select(vcpu)
            return after
        move = a64.register_move(insn)
        if move is None:
            return None
        regs = await self._read_g(vcpu)
        await self._select(vcpu)
        value = regs.x[move[1]]
        return [p.write_register(self._layout[f"x{move[0]}"].regnum, value.to_bytes(8, "little")), *after]

    async def _step_past_access(self, vcpu: int, addr: int) -> None:
        """An aarch64 watchpoint stops the vCPU before the access (QEMU reports it so, as Arm's
        watchpoints do; gdb's "non-steppable watchpoints"): run that one instruction with the
        watchpoints at ``addr`` lifted, so the event shows the access done (the value written,
        registers after it), as on x86, and continuing does not hit it again."""
        lifted = [(a, s, acc) for (a, s, acc) in self._watchpoints if a == addr]
        await self.gdb.batch([p.remove_point(WATCH_KIND[acc], a, s) for a, s, acc in lifted])
        await self._set_sstep(p.SSTEP_ENABLE | p.SSTEP_NOIRQ | p.SSTEP_NOTIMER)
        for callback in self.on_resume:
            callback()
        await self.gdb.resume(p.vcont(("s", str(self._thread(vcpu)))))
        stop = await self.gdb.wait_stop(soon=True)
        await self.gdb.batch([p.insert_point(WATCH_KIND[acc], a, s) for a, s, acc in lifted])
        self.stats["watch_steps"] += 1
        if not self._is_plain_step(stop):
            self._raw_stops.append(stop)  # a breakpoint on the next instruction: digested after this event

    def _is_plain_step(self, stop: p.StopReply | p.Exited) -> bool:
        return isinstance(stop, p.StopReply) and stop.signal == SIGTRAP and stop.watch is None

    async def _next_instruction(self, vcpu: int, addr: int) -> int | None:
        """Address of the instruction after ``addr`` if it surely falls through (None otherwise)."""
        if addr in self._next_insn:
            return self._next_insn[addr]
        nxt = None
        insn = await self._decode(vcpu, addr)
        if self._a64 is not None:
            nxt = addr + 4 if insn is not None and a64.falls_through(insn) else None
        elif insn is not None and not any(insn.group(g) for g in _BRANCH_GROUPS) and \
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
            if hook is not None:  # the call stands for a NOP or the moved mov: step it by hand
                await self.gdb.batch(await self._past_site(vcpu, hook))
                self._regs_cache.pop(vcpu, None)
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


def _drain_qmp_events(qmp: object) -> None:
    """Drop queued QMP STOP/RESUME events (every gdb stop makes some) so the buffer never fills."""
    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        while True:
            qmp.events.receive_nowait()
