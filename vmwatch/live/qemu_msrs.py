"""Model-specific registers of a QEMU guest, read and written by the guest's own ``rdmsr`` and
``wrmsr`` run from outside (gdbstub exposes no MSR; the technique is in
:mod:`vmwatch.live.inline_hooks`). A mixin of :class:`vmwatch.live.qemu.QemuVM`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import attrs
import trio

from vmwatch.cpu import COMMON_MSRS, Registers
from vmwatch.cpu_aarch64 import refuse_aarch64
from vmwatch.errors import ProtocolError
from vmwatch.live import inline_hooks as ih
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import RemoteError

RFLAGS_TF = 0x100
RFLAGS_IF = 0x200
HLT = b"\xf4"
PROBE_TIMEOUT = 2.0
HOOK_STOP_PROBE_PAGES = 16
"""How far past a trampoline a probe may be: its page's padding may be taken by other trampolines."""
"""Seconds an MSR probe (two instructions) may take before it is called lost."""


class MsrAccess:
    """The MSR half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    async def read_msrs(self, numbers: Iterable[int], vcpu: int | None = None) -> dict[int, int] | None:
        """Values of model-specific registers, read by the guest's own ``rdmsr`` run in dead
        padding of the code a vCPU stopped in (see ``inline_hooks``; no flush, ~1 ms each).

        Runs on ``vcpu``, else on the first vCPU stopped in kernel mode and not halted (a halted
        vCPU runs nothing until an interrupt wakes it). Returns None when that is impossible
        right now (user mode, ``hlt``, no padding in that code page, nor in the hooked
        function's at a hook stop; a probe an earlier session left is used again): ask again at the next
        stop; a vCPU stopped at a breakpoint or hook always qualifies. Stops the guest for the
        read if it runs.

        Raises:
            ValueError: an MSR outside ``vmwatch.cpu.COMMON_MSRS`` (an ``rdmsr`` of an MSR the
                CPU model lacks would fault inside the guest).
        """
        return await self._msr_access({n: None for n in numbers}, vcpu)

    async def write_msrs(self, values: dict[int, int], vcpu: int | None = None) -> bool:
        """Write model-specific registers the way :meth:`read_msrs` reads them (``wrmsr``), on a
        guest attached writable. False when no vCPU can run the probe right now.

        Raises:
            UnsupportedOperation: the guest was not attached for writing.
        """
        if not getattr(self.memory, "writable", False):
            from vmwatch.errors import UnsupportedOperation

            raise UnsupportedOperation("MSR writes need a guest attached for writing")
        return await self._msr_access(dict(values), vcpu) is not None

    async def _msr_access(self, access: dict[int, int | None], vcpu: int | None) -> dict[int, int] | None:
        """Read (value None) or write each MSR of ``access`` on one suitable vCPU."""
        refuse_aarch64((self,), "MSRs")
        unknown = [f"{n:#x}" for n in access if n not in COMMON_MSRS]
        if unknown:
            raise ValueError(f"MSR {', '.join(unknown)} is not one vmwatch reads (see vmwatch.cpu.COMMON_MSRS)")
        if any(not 0 <= v < 1 << 64 for v in access.values() if v is not None):
            raise ValueError("an MSR value must fit 64 bits")
        async with self._stopped_link():
            for v in [vcpu] if vcpu is not None else range(self.vcpu_count):
                self._thread(v)
                regs = await self._read_g(v)
                if v in self._hook_stops:  # really inside the trampoline: put back exactly that
                    hook, rsp = self._hook_stops[v]
                    regs = attrs.evolve(regs, rip=hook.slot + hook.stop_offset, rsp=rsp)
                if regs.cs is None or regs.cs.selector & 3 or regs.rip is None or regs.rip < 1 << 63:
                    continue
                pages = 1
                if v in self._hook_stops:  # in a hooked C function CR3 maps all kernel text
                    pages = HOOK_STOP_PROBE_PAGES
                else:
                    await self._set_phys(False)
                    await self._select(v)
                    with contextlib.suppress(RemoteError):
                        if p.decode_hex(await self.gdb.request(p.read_memory(regs.rip - 1, 1))) == HLT:
                            continue  # halted, most likely: it would run the probe at its next interrupt
                kinds = {ih.RDMSR if value is None else ih.WRMSR for value in access.values()}
                probes = {kind: await self._probe_near(regs.rip, kind, pages) for kind in kinds}
                if None not in probes.values():
                    return await self._run_probe(v, regs, access, probes)
        return None

    async def _probe_near(self, rip: int, instruction: bytes, pages: int = 1) -> int | None:
        """The MSR probe for a vCPU at ``rip``: in dead padding after ``rip`` in its code page, or
        in the ``pages - 1`` pages after it (lock held, stopped). Placed on first use, or one an
        earlier session left there is used again. Only the stop's own page is sure to be mapped
        in any CR3 (the entry code runs on the user's with KPTI)."""
        page = rip & ~0xFFF
        key = (page, instruction, pages)  # a page's probe for a hook stop may lie past it: kept apart
        if key not in self._probes:
            code = await self._read_code(page, 0x1000 * pages)
            left = ih.left_probe(code, page, instruction)
            if left is not None:  # an earlier session's: its bytes stay, as its trampolines do
                self._probes[key] = left
                await self.gdb.request(p.insert_point(p.WatchKind.READ, left, 8))
                return left
            code = code[rip - page:]  # from an instruction boundary
            found = ih.free_slots(code, rip, self._patched(), size=ih.PROBE_SIZE)
            probe = self._probes[key] = found[0] if found else None
            if probe is not None:
                await self._hide(probe, code[probe - rip : probe - rip + ih.PROBE_SIZE])
                await self.gdb.batch([p.write_memory(probe, ih.msr_probe(probe, instruction)),
                                      p.insert_point(p.WatchKind.READ, probe, 8)])
        return self._probes[key]

    async def _run_probe(self, vcpu: int, regs: Registers, access: dict[int, int | None],
                         probes: dict[bytes, int]) -> dict[int, int]:
        layout = self._layout

        def put(name: str, value: int) -> p.Command:
            info = layout[name]
            return p.write_register(info.regnum, (value & (1 << info.bitsize) - 1).to_bytes(info.size, "little"))

        thread = str(self._thread(vcpu))
        masked = regs.rflags & ~(RFLAGS_IF | RFLAGS_TF)
        values: dict[int, int] = {}
        await self._select(vcpu)
        try:
            for number, value in access.items():
                kind = ih.RDMSR if value is None else ih.WRMSR
                probe = probes[kind]
                setup = [put("rcx", number), put("rip", probe), put("eflags", masked)]
                if value is not None:
                    setup += [put("rax", value & 0xFFFFFFFF), put("rdx", value >> 32)]
                await self.gdb.batch(setup)
                await self.gdb.resume(p.vcont(("c", thread)))  # this vCPU alone
                stop = None
                with trio.move_on_after(PROBE_TIMEOUT):
                    stop = await self.gdb.wait_stop()
                if stop is None:
                    await self.gdb.interrupt()
                    stop = await self.gdb.wait_stop(soon=True)
                if not (isinstance(stop, p.StopReply) and stop.watch is not None and stop.watch[1] == probe):
                    raise ProtocolError(f"MSR probe on vCPU {vcpu} did not come back (stopped with {stop})")
                if value is not None:
                    values[number] = value
                    continue
                rax, rdx = await self.gdb.batch([p.read_register(layout["rax"].regnum),
                                                  p.read_register(layout["rdx"].regnum)])
                low = int.from_bytes(p.decode_hex(rax), "little") & 0xFFFFFFFF
                values[number] = (int.from_bytes(p.decode_hex(rdx), "little") & 0xFFFFFFFF) << 32 | low
        finally:
            with trio.CancelScope(shield=True):
                await self.gdb.batch([put("rax", regs.rax), put("rcx", regs.rcx), put("rdx", regs.rdx),
                                      put("rsp", regs.rsp), put("eflags", regs.rflags), put("rip", regs.rip)])
        self.stats["msr_reads"] += sum(v is None for v in access.values())
        self.stats["msr_writes"] += sum(v is not None for v in access.values())
        return values
