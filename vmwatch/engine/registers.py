"""Register-write events derived generically from breakpoints (DESIGN.md "How register ... arise").

Theory of operation: gdbstub cannot report "CR4 was written". Every write to a control register
or an MSR is one instruction, ``mov crN, reg`` (0F 22 /r) or ``wrmsr`` (0F 30), and the kernel
only executes them from its text. So: scan kernel text for those opcode bytes, confirm each hit
is a real instruction boundary by disassembling (capstone) from the start of the function that
contains it (a linear sweep inside one function; data in x86-64 kernel text is rare and a false
hit is rejected by the boundary check), and break right after it. At that breakpoint the new
value is in the register file (CRn), or in EDX:EAX with the MSR index in ECX (``wrmsr`` leaves
them intact); the ``mov``s of ``native_write_cr0/4`` take an inline hook on the instruction
itself instead (:func:`hookable`), whose stop comes before it with the new value in its source
register; the old value is the last one seen on that vCPU (from the registers at start,
then from each event). Only the sites of registers some rule listens to are armed. CR3, written
at every switch of process, comes from one inline hook on Linux's switch function where the
kernel has it (engine/address_spaces.py); the generic sites only serve kernels without it.

MSRs a live source can read (``poll_msrs``: the QEMU backend runs the guest's own ``rdmsr``,
see vmwatch/live/inline_hooks.py) are polled instead, every :data:`MSR_POLL_SECONDS`, with the
registers of the engine's tick: a change on a vCPU becomes a RegisterWrite (``rip`` 0: where
is unknown). That sees writes made from anywhere, a module's own ``wrmsr`` included, and costs
no breakpoint on the generic ``wrmsr`` every MSR write of the kernel goes through (the TSC
deadline timer alone ~25/s, each stop a translation flush for a TCG guest).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterator

import attrs
import structlog

from vmwatch.cpu import COMMON_MSRS, MSR_NUMBERS, msr_name
from vmwatch.errors import RuleError, VmwatchError
from vmwatch.events import Breakpoint, RegisterWrite

if TYPE_CHECKING:
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8")
MSR_POLL_SECONDS = 1.0
RUNTIME_WRITERS = {"cr0": "native_write_cr0", "cr4": "native_write_cr4"}
"""The functions a running Linux writes CR0 and CR4 with (arch/x86/kernel/cpu/common.c)."""
SYSCALL_MSRS = ("msr:lstar", "msr:cstar", "msr:star", "msr:fmask", "msr:sysenter_cs", "msr:sysenter_esp",
                "msr:sysenter_eip")


def msr_register(number: int) -> str:
    """Canonical event name of MSR ``number``: ``msr:lstar`` or ``msr:0x1234``."""
    return "msr:" + msr_name(number)


def canonical_register(name: str) -> str:
    """Normalise a register name as rules write it: ``CR0`` -> ``cr0``, ``msr:0xc0000082`` -> ``msr:lstar``."""
    if not isinstance(name, str):
        raise RuleError(f"register must be a name like 'cr0' or 'msr:lstar', not {name!r}")
    low = name.strip().lower()
    if low in CONTROL_REGISTERS:
        return low
    if low.startswith("msr:"):
        rest = low[4:]
        if rest in MSR_NUMBERS:
            return low
        try:
            return msr_register(int(rest, 0))
        except ValueError:
            pass
    raise RuleError(f"unknown register {name!r} (cr0, cr3, cr4, cr8, msr:<name or number>; "
                    f"MSR names: {', '.join(sorted(MSR_NUMBERS))})")


@attrs.frozen
class WriteSite:
    """A register-writing instruction in kernel text."""

    address: int
    """The instruction."""
    next_address: int
    """Where the breakpoint goes (right after it)."""
    register: str
    """``cr0``..``cr8`` or ``msr`` (the MSR is known only at run time, from ECX)."""
    source: str = ""
    """For ``mov crN, reg``: the general register holding the new value."""
    msr: int | None = None
    """For ``wrmsr``: the MSR index when the code loads ECX with a constant right before (the
    entry code's SPEC_CTRL writes), None when it is only known at run time (``native_write_msr``)."""


_MOV_CR = re.compile(rb"\x0f\x22", re.DOTALL)
_WRMSR = re.compile(rb"\x0f\x30", re.DOTALL)
_MAX_FUNCTION = 64 << 10


def find_write_sites(text: bytes, text_start: int, function_start: Any) -> Iterator[WriteSite]:
    """Every ``mov crN, reg`` and ``wrmsr`` in ``text`` (mapped at ``text_start``).

    Args:
        function_start: ``vaddr -> start of the function containing it`` (kallsyms ``lookup``),
            or None if unknown (the candidate is then dropped).
    """
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    seen: set[int] = set()
    candidates = sorted({m.start() for m in _MOV_CR.finditer(text)} | {m.start() for m in _WRMSR.finditer(text)})
    for offset in candidates:
        opcode_va = text_start + offset
        start = function_start(opcode_va)
        if start is None or not 0 <= opcode_va - start < _MAX_FUNCTION or start < text_start:
            continue
        end = min(offset + 3, len(text))
        ecx: int | None = None  # constant loaded into ECX by the instructions before, if any
        for address, size, mnemonic, operands in md.disasm_lite(text[start - text_start:end], start):
            if address > opcode_va:
                break
            if address + size <= opcode_va or address in seen:
                ecx = _track_ecx(ecx, mnemonic, operands)
                continue
            # the opcode bytes start this instruction (maybe after a REX prefix)
            if mnemonic == "wrmsr":
                seen.add(address)
                yield WriteSite(address, address + size, "msr", msr=ecx)
            elif mnemonic == "mov" and operands.startswith("cr"):
                seen.add(address)
                dest, _, src = operands.partition(",")
                yield WriteSite(address, address + size, dest.strip(), src.strip())
            break


def _track_ecx(ecx: int | None, mnemonic: str, operands: str) -> int | None:
    """ECX after one instruction of a linear sweep: a constant if just loaded, else unknown.

    Control flow resets it (a jump target may arrive with any ECX); so does any instruction
    naming ECX/RCX/CX/CL as destination. A branch *into* the gap between the load and the wrmsr
    would escape this; kernel entry code does not do that.
    """
    dest = operands.split(",", 1)[0].strip()
    if mnemonic == "mov" and dest in ("ecx", "rcx"):
        value = operands.split(",", 1)[1].strip()
        try:
            return int(value, 0) & 0xFFFFFFFF
        except ValueError:
            return None
    if dest in ("ecx", "rcx", "cx", "cl", "ch") or mnemonic.startswith(("j", "call", "ret", "loop", "xchg")) \
            or mnemonic in ("cpuid", "rdmsr", "rdtsc", "rdtscp", "rep movsb", "rep stosb", "syscall", "sysret"):
        return None
    return ecx


def runtime_sites(sites: list[WriteSite], symbols: Any) -> list[WriteSite]:
    """Of the CR0/CR4 writers, only those in the kernel's runtime functions, when it has them.

    A running Linux writes CR0 and CR4 through ``native_write_cr0``/``native_write_cr4`` only;
    the other ``mov`` sites are boot, kexec, suspend/resume and SME code (20 of the 22 on the
    lab kernel). Under TCG every armed gdbstub breakpoint costs at each lookup of translated
    code, whether hit or not: two sites instead of 22, each an inline hook on the ``mov``
    itself where :func:`hookable` (no breakpoint at all), is what lets the security pack keep
    ``control_register_write`` on.
    """
    kept = []
    for register, writer in RUNTIME_WRITERS.items():
        address = symbols.get(writer)
        mine = [s for s in sites if s.register == register]
        inside = [s for s in mine if address is not None and (symbols.lookup(s.address) or ("",))[0] == writer]
        kept += inside or mine
    return [s for s in sites if s.register not in RUNTIME_WRITERS] + kept


def hookable(site: WriteSite, text: bytes, text_start: int, symbols: Any) -> bool:
    """True when a runtime writer's ``mov`` can take an inline hook at its own address: no
    direct branch of its function lands inside the 5 bytes the hook's call covers (a jump to the
    ``mov`` itself, the pinning code's retry, is fine). See vmwatch/live/inline_hooks.py."""
    import capstone

    hit = symbols.lookup(site.address)
    if hit is None or hit[0] != RUNTIME_WRITERS.get(site.register):
        return False
    start = site.address - hit[1]
    end = min(symbols.next_address(start) or start + _HOOKABLE_SPAN, start + _HOOKABLE_SPAN)
    code = text[start - text_start:end - text_start]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for _, _, mnemonic, operands in md.disasm_lite(code, start):
        if mnemonic.startswith(("j", "call", "loop")):
            try:
                target = int(operands, 0)
            except ValueError:
                continue
            if site.address < target < site.address + 5:
                return False
    return True


_HOOKABLE_SPAN = 0x200
"""Bytes of a runtime writer looked at for branches (native_write_cr0 is 0x4a bytes)."""


def kernel_text(guest: Guest) -> tuple[int, bytes]:
    linux = guest.linux
    symbols = linux.symbols
    start = symbols["_stext"]
    end = symbols["_etext"]
    if not 0 < end - start <= 256 << 20:
        raise VmwatchError(f"implausible kernel text {start:#x}-{end:#x}")
    return start, linux.memory.read(start, end - start)


class RegisterSensor:
    """Turns breakpoints after writer instructions, or on a ``mov crN`` itself (the site's own
    address: the value about to be written is in its source register, the old one still in
    CRn), into :class:`RegisterWrite` events."""

    def __init__(self, sites: dict[int, WriteSite], initial: dict[str, int]) -> None:
        self.sites = sites
        self._initial = initial
        self._last: dict[tuple[int, str], int] = {}

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        site = self.sites.get(event.address)
        regs = guest.registers
        if site is None or regs is None:
            return
        if event.address == site.address:
            new, old = getattr(regs, site.source, None), getattr(regs, site.register, None)
            if new is None:
                return
            if old is None:
                old = self._last.get((event.vcpu, site.register), self._initial.get(site.register))
            self._last[(event.vcpu, site.register)] = new
            guest.emit(RegisterWrite(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, register=site.register,
                                     old=old, new=new, rip=site.address))
            return
        if site.register == "msr":
            number = (regs.rcx or 0) & 0xFFFFFFFF
            name = msr_register(number)
            new = ((regs.rdx or 0) & 0xFFFFFFFF) << 32 | ((regs.rax or 0) & 0xFFFFFFFF)
        else:
            name = site.register
            value = getattr(regs, name, None)
            if value is None:  # the source does not report this control register: use the operand
                value = getattr(regs, site.source, None)
            if value is None:
                return
            new = value
        key = (event.vcpu, name)
        old = self._last.get(key, self._initial.get(name))
        self._last[key] = new
        guest.emit(RegisterWrite(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, register=name,
                                 old=old, new=new, rip=site.address))


class MsrPoller:
    """Turns the MSR values of tick registers into :class:`RegisterWrite` events: on change, and
    once for the first value seen on each vCPU (``old`` None), so a rule can judge a value that
    was already wrong when the watch began."""

    def __init__(self, registers: set[str]) -> None:
        self.registers = registers
        self._last: dict[tuple[int, str], int] = {}

    def __call__(self, event: Any, guest: Guest) -> None:
        for regs in guest.cpus:
            for name, new in (regs.msrs or {}).items():
                register = "msr:" + name
                if register not in self.registers:
                    continue
                key = (regs.vcpu, register)
                old = self._last.get(key)
                self._last[key] = new
                if old != new:
                    guest.emit(RegisterWrite(seq=event.seq, time_ns=event.time_ns, vcpu=regs.vcpu, register=register,
                                             old=old, new=new, rip=0))


def initial_values(cpus: tuple) -> dict[str, int]:
    values: dict[str, int] = {}
    if cpus:
        regs = cpus[0]
        for name in ("cr0", "cr3", "cr4", "cr8"):
            value = getattr(regs, name, None)
            if value is not None:
                values[name] = value
        for name, value in (regs.msrs or {}).items():
            values["msr:" + name] = value
    return values


async def plan(engine: SensorHost, wanted: dict[str, list]) -> None:
    """Arm breakpoints after the writers of the registers rules listen to."""
    from vmwatch.engine import address_spaces
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler, Trap

    registers = {k.split(":", 1)[1] for k in wanted if k.startswith("register:")}
    if not registers:
        return
    if caps.BREAKPOINTS not in engine.capabilities:
        return  # the source delivers RegisterWrite itself (replay, synthetic) or not at all
    polled = {r for r in registers if r.startswith("msr:") and MSR_NUMBERS.get(r[4:]) in COMMON_MSRS}
    if polled and (hasattr(engine.source, "poll_msrs") or getattr(engine.source, "replays_ticks", False)):
        poll = getattr(engine.source, "poll_msrs", None)
        if poll is not None:
            poll(sorted(MSR_NUMBERS[r[4:]] for r in polled), MSR_POLL_SECONDS)
        run = engine.sensor_run("sensor.msr_poll")
        run.func = MsrPoller(polled)
        engine.dispatcher.periodic.append((MSR_POLL_SECONDS, Handler(run, None)))
        registers -= polled
        log.info("msr polling armed", registers=sorted(polled), seconds=MSR_POLL_SECONDS)
    if not registers:
        return
    cpus = tuple(await engine.source.all_registers()) if caps.REGISTERS in engine.capabilities else ()
    initial = initial_values(cpus)
    if "cr3" in registers and await address_spaces.plan(engine, initial.get("cr3")):
        registers.discard("cr3")  # one inline hook on the switch function, not a breakpoint per writer
        if not registers:
            return
    want_msr = any(r.startswith("msr:") for r in registers)
    restore = getattr(engine.source, "restore_left_hooks", None)
    try:
        for writer in sorted({RUNTIME_WRITERS[r] for r in registers if r in RUNTIME_WRITERS} if restore else ()):
            address = engine.guest.linux.symbols.get(writer)  # a dead watch's hook hides the mov
            if address is not None:
                await restore(int(address), _HOOKABLE_SPAN)
        text_start, text = kernel_text(engine.guest)
        symbols = engine.guest.linux.symbols

        def function_start(vaddr: int) -> int | None:
            hit = symbols.lookup(vaddr)
            return None if hit is None else vaddr - hit[1]

        sites = [s for s in find_write_sites(text, text_start, function_start)
                 if s.register in registers
                 or (s.register == "msr" and want_msr and (s.msr is None or msr_register(s.msr) in registers))]
        sites = runtime_sites(sites, symbols)
    except VmwatchError as exc:
        engine.inactive(f"register sensor ({', '.join(sorted(registers))})", str(exc))
        return
    on_mov = {s for s in sites if hookable(s, text, text_start, symbols)}
    sensor = RegisterSensor({s.address if s in on_mov else s.next_address: s for s in sites}, initial)
    run = engine.sensor_run("sensor.registers")
    run.func = sensor
    for site in sites:
        hit = symbols.lookup(site.address)
        where = f"{hit[0]}+{hit[1]:#x}" if hit else f"{site.address:#x}"
        what = "wrmsr" if site.register == "msr" else "mov " + site.register
        if site in on_mov:  # an inline hook where the backend can place one (a watchpoint stop: no flush)
            await engine.add_trap(Trap("breakpoint", site.address, 1, f"{what} in {where}", entry=True),
                                  Handler(run, None))
        else:
            await engine.add_trap(Trap("breakpoint", site.next_address, 1, f"after {what} in {where}"),
                                  Handler(run, None))
    log.info("register sensor armed", registers=sorted(registers), sites=len(sites))
