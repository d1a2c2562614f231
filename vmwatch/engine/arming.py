"""Arming a watch: rules' listeners -> dispatcher entries, armed traps and sensors.

:class:`Arming` is one part of :class:`vmwatch.engine.pump.Engine` (a mixin): it binds each
active rule's listeners at start-up, resolves the symbols traps name, arms and disarms traps on
the source (once per address, the widest watch wins), re-arms a trap governance unhooked, and
lets the sensors plan (``SensorHost`` is what they see of it). A listener the source cannot serve
is reported inactive, never dropped silently.
"""

from __future__ import annotations

import collections
from typing import Any

import structlog
import trio

from vmwatch.engine import sources as caps
from vmwatch.engine.dispatch import Handler, RuleRun, Trap
from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.events import Breakpoint, Fault, Interrupt, MemoryAccess, MmioAccess, RegisterWrite, Tick
from vmwatch.ruletypes import ListenerKind

log = structlog.get_logger()

X86_ONLY_LISTENERS = ("register:", "interrupt:", "exception:")
"""Sensors that read x86 state (CR/MSR writers, IDT entry points): never planned on an aarch64 guest."""


class Arming:
    """The engine's start-up and trap table (state lives on the engine: ``_armed``, ``dispatcher``)."""

    async def _setup(self) -> None:
        d = self.dispatcher
        wanted: dict[str, list[Handler]] = collections.defaultdict(list)
        arch = getattr(self.source, "arch", "x86")
        if arch == "aarch64" and self.has_registers and not self.guest.cpus:
            # an arm64 kernel is found from TTBR1_EL1/TCR_EL1 (no blind scan): sensors need it now
            self.guest.cpus = tuple(await self.source.all_registers())
        for r in self.ruleset.active():
            if r.arches and arch not in r.arches:
                self.inactive(f"rule {r.name}", f"{' and '.join(r.arches)} only, the guest is {arch}"
                                                + (f" ({r.doc.rstrip('.')})" if r.doc else ""))
                continue
            run = self.runs[r.name] = RuleRun(r.name, r.func, config=self.ruleset.config_of(r))
            for lst in r.listeners:
                h = Handler(run, lst, None if lst.narrow.empty else lst.narrow)
                kind = lst.kind
                if kind is ListenerKind.START:
                    d.start.append(h)
                elif kind is ListenerKind.EVERY:
                    d.periodic.append((lst.target, h))
                    d.add(Tick, h)  # a source's own ticks (an image: one look) reach periodic rules
                elif kind is ListenerKind.EVENT:
                    d.add(lst.target, h)
                    wanted[lst.target.__name__].append(h)
                elif kind is ListenerKind.REGISTER:
                    d.add((RegisterWrite, lst.target), h)
                    wanted["register:" + lst.target].append(h)
                elif kind is ListenerKind.INTERRUPT:
                    d.add((Interrupt, lst.target), h)
                    wanted[f"interrupt:{lst.target}"].append(h)
                elif kind is ListenerKind.MMIO:
                    d.add((MmioAccess, lst.target[:2]), h)
                    wanted[f"mmio:{lst.target!r}"].append(h)
                elif kind is ListenerKind.EXCEPTION:
                    vector, user = lst.target
                    for mode in (True, False) if user is None else (user,):
                        d.add((Fault, (vector, mode)), h)
                        wanted[f"exception:{vector}:{'user' if mode else 'kernel'}"].append(h)
                else:
                    await self._bind_trap(h)
        if self.options.sensors and wanted:
            await self._plan_sensors(wanted)
        self.summary.traps = len(self._armed)
        log.info("watch armed", vm=self.vm, rules=len(self.runs), traps=len(self._armed),
                 inactive=len(self.summary.inactive))

    def inactive(self, what: str, why: str) -> None:
        """Record a listener or sensor that cannot work on this source (reported, never silent)."""
        self.summary.inactive.append(f"{what}: {why}")
        log.info("listener inactive", what=what, why=why)

    def resolve(self, target: str | int) -> int:
        """A symbol (``name`` or ``name+0x10``) or address -> address (symbols of the guest's OS layer)."""
        if isinstance(target, int):
            return target
        name, _, off = target.partition("+")
        return resolve_symbol(self.guest.kernel, name.strip()) + (int(off, 0) if off else 0)

    def _is_function(self, target: str) -> bool:
        """``target`` names a kernel function itself (no offset): its address is an entry."""
        if not target or "+" in target or ".." in target:
            return False
        try:
            return self.guest.linux.symbols.type_of(target.strip()) in ("t", "T")
        except (VmwatchError, KeyError, AttributeError):
            return False

    def resolve_range(self, target: str | int, size: int) -> tuple[int, int]:
        """``(address, size)`` of a watched range: ``"a..b"``, or ``size`` 0 = up to the next symbol."""
        if isinstance(target, str) and ".." in target:
            start, _, end = target.partition("..")
            first, last = self.resolve(start), self.resolve(end)
            if not 0 < last - first <= 1 << 30:
                raise ValueError(f"empty or absurd range {target!r} ({first:#x}..{last:#x})")
            return first, last - first
        address = self.resolve(target)
        if size:
            return address, size
        symbols = self.guest.kernel.symbols
        known = getattr(symbols, "sizes", {}).get(target) if isinstance(target, str) else None
        if known:  # an object the OS layer sized itself (arm64's sys_call_table)
            return address, known
        next_address = getattr(symbols, "next_address", None)  # Windows: exports only
        following = next_address(address) if next_address is not None else None
        if following is None or not 0 < following - address <= 1 << 20:
            raise ValueError(f"cannot size {target!r} from the symbol table: give a size")
        return address, following - address

    async def _bind_trap(self, h: Handler) -> None:
        lst = h.listener
        assert lst is not None
        is_bp = lst.kind is ListenerKind.BREAKPOINT
        what = f"{h.rule.name} ({'breakpoint' if is_bp else 'write watch'} on {lst.target!r})"
        needed = caps.BREAKPOINTS if is_bp else caps.WATCHPOINTS
        passive = needed not in self.capabilities
        if passive and not getattr(self.source, "replays_traps", False):
            self.inactive(what, f"the source has no {needed}")
            return
        try:
            if is_bp:
                address, size = self.resolve(lst.target), 1
            else:
                address, size = self.resolve_range(lst.target, lst.size)
        except (VmwatchError, KeyError, ValueError) as exc:
            self.inactive(what, f"cannot resolve: {exc}")
            return
        label = lst.target if isinstance(lst.target, str) else ""
        trap = Trap("breakpoint" if is_bp else "watchpoint", address, size, label,
                    entry=is_bp and self._is_function(label))
        if passive:  # a replay carries the trap events it recorded: index them, arm nothing
            key = (Breakpoint if is_bp else MemoryAccess, address)
            self.dispatcher.traps.setdefault(key, trap)
            self.dispatcher.add(key, h)
        else:
            await self.add_trap(trap, h)

    async def add_trap(self, trap: Trap, handler: Handler) -> Trap:
        """Arm ``trap`` (once per address) and route its events to ``handler``."""
        cls = Breakpoint if trap.kind == "breakpoint" else MemoryAccess
        key = (cls, trap.address)
        existing = self.dispatcher.traps.get(key)
        if existing is None or existing.size < trap.size:
            if existing is not None and existing in self._armed:
                await self._disarm(existing)
            self.dispatcher.traps[key] = trap
            await self._arm(trap)
        self.dispatcher.add(key, handler)
        return self.dispatcher.traps[key]

    async def _arm(self, trap: Trap) -> None:
        if trap.kind == "breakpoint":
            if trap.guard is not None:
                if not await self.source.add_breakpoint(trap.address, entry=True, guard=trap.guard):
                    log.warning("guarded hook not placed again", trap=trap.name)
            else:
                await self.source.add_breakpoint(trap.address, entry=trap.entry)
        else:
            await self.source.add_watchpoint(trap.address, trap.size, trap.access)
        self._armed.add(trap)

    async def _disarm(self, trap: Trap) -> None:
        self._armed.discard(trap)
        if trap.kind == "breakpoint":
            await self.source.remove_breakpoint(trap.address)
        else:
            await self.source.remove_watchpoint(trap.address, trap.size, trap.access)

    async def _plan_sensors(self, wanted: dict[str, list[Handler]]) -> None:
        from vmwatch.engine import exceptions, interrupts, linux_sensors, mmio, registers

        if getattr(self.source, "arch", "x86") == "aarch64":
            for key in [k for k in wanted if k.startswith(X86_ONLY_LISTENERS)]:
                self.inactive(key, "x86 only (control registers, MSRs, IDT vectors): not on an aarch64 guest")
                del wanted[key]
        for planner in (registers.plan, interrupts.plan, exceptions.plan, mmio.plan, linux_sensors.plan):
            await planner(self, wanted)

    def sensor_run(self, name: str) -> RuleRun:
        run = self.runs.get(name)
        if run is None:
            run = self.runs[name] = RuleRun(name, lambda e, g: None, internal=True)
        return run

    async def _rearm_later(self, trap: Trap, seconds: float) -> None:
        await trio.sleep(seconds)
        async with self.guest_stopped():
            due = self.governor.due_rearm(trio.current_time() + 1e-9)
            if trap in due and trap not in self._armed:
                await self._arm(trap)
                log.info("trap re-armed", trap=trap.name)


def resolve_symbol(kernel: Any, name: str) -> int:
    """Address of a kernel symbol through the OS layer's symbol table (Linux or Windows)."""
    address = kernel.symbols.get(name)
    if address is None:
        raise SymbolError(f"unknown kernel symbol {name!r}", name=name)
    return int(address)
