"""MMIO events: watchpoints on the kernel's own mappings of a device's guest-physical range.

Theory of operation: a range is given by address, or by the name the guest's own resource
tree gives it (``iomem_resource``, what /proc/iomem shows; vmwatch/os/linux/resources.py).
gdbstub watchpoints take virtual addresses (``Qqemu.PhyMemMode`` changes
what ``m``/``M`` read, not what ``Z2``-``Z4`` watch), and a driver reaches its device through a
kernel mapping (ioremap in vmalloc space, or a fixmap slot such as the local APIC's). So the
kernel half of the page tables is walked once at start for pages that map the range, and each
such page is watched for the access kinds asked. Whole pages: QEMU's watchpoints cost by the
page anyway, and a watch of 64 bytes or less makes the backend read the watched bytes at each
stop, which for a device register is an access of its own (a UART's data register would lose a
byte).

The stop comes after the accessing instruction (a trap, as x86 debug registers do) and names
only the watched page, so the instruction is found again: of the decodings of the 1-15 code
bytes that end at RIP, the one whose memory operand's effective address (from the registers,
which a ``mov`` to or from memory leaves alone) falls in the page gives address, width, direction
and, for a write, the value (its source register or immediate). No decoding or several that
disagree: the event carries the page and no value rather than a guess.

Not seen: user-space mappings of a device (``/dev/mem``, UIO), DMA, port I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import ast

import attrs
import capstone
import capstone.x86 as cx
import structlog

from vmwatch.errors import VmwatchError
from vmwatch.events import Access, MemoryAccess, MmioAccess
from vmwatch.os.linux.resources import iomem

if TYPE_CHECKING:
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

PAGE = 0x1000
MAX_INSN = 15
ACCESS = {"r": Access.READ, "w": Access.WRITE, "rw": Access.READ_WRITE}
_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True
_GPRS: dict[str, tuple[str, int]] = {}
"""Register name -> (64-bit register, width in bits)."""
for _names in (("rax", "eax", "ax", "al"), ("rbx", "ebx", "bx", "bl"), ("rcx", "ecx", "cx", "cl"),
               ("rdx", "edx", "dx", "dl"), ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
               ("rbp", "ebp", "bp", "bpl"), ("rsp", "esp", "sp", "spl"),
               *((f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16))):
    for _name, _width in zip(_names, (64, 32, 16, 8)):
        _GPRS[_name] = (_names[0], _width)


@attrs.frozen
class Watch:
    """One watched page of a kernel mapping of a device range."""

    vaddr: int
    paddr: int
    size: int
    ranges: tuple[tuple[tuple, int, int, str], ...]
    """``(listener key, start, size, access)`` of the rule ranges this page serves."""


@attrs.frozen
class Decoded:
    """What the instruction before RIP did to memory."""

    vaddr: int
    size: int
    write: bool
    value: int | None


def register_value(regs: Any, name: str) -> int | None:
    """A general register of ``regs`` by any of its names (``eax``, ``r8d``, ``dl``), or None."""
    full, width = _GPRS.get(name, (None, 0))
    value = getattr(regs, full, None) if full else None
    return None if value is None else value & ((1 << width) - 1)


def decode_access(code: bytes, rip: int, regs: Any, start: int, end: int) -> Decoded | None:
    """The access of the instruction that ends at ``rip`` into ``[start, end)``; None if unsure.

    Args:
        code: the :data:`MAX_INSN` bytes before ``rip`` (fewer when the page before is unmapped).
    """
    found = set()
    for length in range(1, len(code) + 1):
        insns = list(_md.disasm(code[len(code) - length :], rip - length, 1))
        if not insns or insns[0].size != length:
            continue
        insn = insns[0]
        mems = [op for op in insn.operands if op.type == cx.X86_OP_MEM]
        if len(mems) != 1 or mems[0].mem.segment != 0:
            continue
        mem = mems[0]
        ea = _effective_address(insn, mem, regs)
        if ea is None or not start <= ea < end:
            continue
        write = bool(mem.access & capstone.CS_AC_WRITE)
        value = _source_value(insn, regs) if write else None
        found.add(Decoded(ea, mem.size, write, value))
    return found.pop() if len(found) == 1 else None


def _effective_address(insn: Any, mem: Any, regs: Any) -> int | None:
    m = mem.mem
    ea = m.disp
    if m.base:
        name = insn.reg_name(m.base)
        base = insn.address + insn.size if name == "rip" else register_value(regs, name)
        if base is None:
            return None
        ea += base
    if m.index:
        index = register_value(regs, insn.reg_name(m.index))
        if index is None:
            return None
        ea += index * m.scale
    return ea & 0xFFFFFFFFFFFFFFFF


def _source_value(insn: Any, regs: Any) -> int | None:
    """What a store wrote: its register or immediate source (``mov``/``xchg``-like stores only)."""
    if insn.mnemonic not in ("mov", "movl", "movq", "xchg", "movnti"):
        return None
    for op in insn.operands:
        if op.type == cx.X86_OP_REG:
            return register_value(regs, insn.reg_name(op.reg))
        if op.type == cx.X86_OP_IMM:
            return op.imm & ((1 << 8 * op.size) - 1 if op.size else (1 << 64) - 1)
    return None


def wanted_targets(wanted: dict[str, list]) -> list[tuple[int | str, int, str]]:
    """``{"mmio:(4276092928, 4096, 'w')": [...]}`` -> ``[(0xfee00000, 0x1000, "w")]`` (arming's keys)."""
    return sorted((ast.literal_eval(key[5:]) for key in wanted if key.startswith("mmio:")), key=repr)


def resolve(targets: list[tuple[int | str, int, str]], devices: list[Any]) -> list[tuple[tuple, int, int, str]]:
    """Listener targets -> ``(key, start, size, access)`` ranges; a device name gives one range
    per resource of that name (``devices``: :func:`vmwatch.os.linux.resources.iomem`)."""
    out = []
    for start, size, kind in targets:
        if isinstance(start, str):
            out += [((start, 0), d.start, d.end + 1 - d.start, kind) for d in devices
                    if d.name == start and d.end >= d.start]
        else:
            out.append(((start, size), start, size, kind))
    return out


def watched_pages(mappings: Iterator[Any], ranges: list[tuple[tuple, int, int, str]]) -> list[Watch]:
    """The pages of kernel ``mappings`` that map some part of ``ranges``."""
    pages: dict[int, tuple[int, set]] = {}
    for m in mappings:
        for r in ranges:
            _, start, size, _ = r
            lo, hi = max(start, m.paddr), min(start + size, m.paddr + m.size)
            if lo >= hi:
                continue
            for paddr in range(lo & ~(PAGE - 1), hi, PAGE):
                vaddr = m.vaddr + (paddr - m.paddr)
                pages.setdefault(vaddr, (paddr, set()))[1].add(r)
    return [Watch(v, p, PAGE, tuple(sorted(r, key=repr))) for v, (p, r) in sorted(pages.items())]


def _page_access(watch: Watch) -> Access:
    kinds = {k for _, _, _, k in watch.ranges}
    return Access.READ_WRITE if "rw" in kinds or kinds == {"r", "w"} else ACCESS[kinds.pop()]


class MmioSensor:
    """Watchpoint stop on a watched page -> :class:`MmioAccess` for each rule range it touched."""

    def __init__(self, watches: dict[int, Watch]) -> None:
        self.watches = watches

    def __call__(self, event: MemoryAccess, guest: Guest) -> None:
        watch = self.watches.get(event.address)
        regs = guest.registers
        if watch is None:
            return
        decoded = None
        if regs is not None and regs.rip:
            code = _code_before(guest, regs.rip)
            decoded = decode_access(code, regs.rip, regs, watch.vaddr, watch.vaddr + watch.size)
        if decoded is not None:
            paddr, size, value = watch.paddr + decoded.vaddr - watch.vaddr, decoded.size, decoded.value
            access = Access.WRITE if decoded.write else Access.READ
        else:
            paddr, size, value, access = watch.paddr, 0, None, event.access
        for key, start, length, kind in watch.ranges:
            if decoded is not None and not (start <= paddr < start + length and access & ACCESS[kind]):
                continue
            guest.emit(MmioAccess(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, access=access,
                                  paddr=paddr, size=size, value=value, rip=regs.rip if regs else 0,
                                  watched=key))


def _code_before(guest: Guest, rip: int) -> bytes:
    memory = guest.linux.memory
    try:
        return memory.read(rip - MAX_INSN, MAX_INSN)
    except VmwatchError:  # the page before is unmapped: the instruction starts in RIP's page
        keep = rip & (PAGE - 1)
        return memory.read(rip - keep, keep) if keep else b""


async def plan(engine: SensorHost, wanted: dict[str, list]) -> None:
    """Watch the kernel's mappings of every MMIO range a rule listens to."""
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler, Trap

    targets = wanted_targets(wanted)
    if not targets:
        return
    if caps.WATCHPOINTS not in engine.capabilities:
        engine.inactive(f"MMIO sensor ({len(targets)} ranges)", "the source has no watchpoints")
        return
    try:
        linux = engine.guest.linux
        devices = iomem(linux) if any(isinstance(t[0], str) for t in targets) else []
        ranges = resolve(targets, devices)
        memory = linux.memory
        kernel_half = 1 << 63 if memory.pointer_size == 8 else 0xC0000000
        watches = watched_pages(memory.mappings(start=kernel_half), ranges)
    except VmwatchError as exc:
        engine.inactive(f"MMIO sensor ({len(targets)} ranges)", str(exc))
        return
    for start, size, kind in targets:
        where = repr(start) if isinstance(start, str) else f"{start:#x}+{size:#x}"
        what = f"MMIO sensor ({where}, {kind})"
        if not any(r[0] == (start, size) for r in ranges):
            engine.inactive(what, "no such device in the guest's /proc/iomem")
        elif not any(r[0] == (start, size) for w in watches for r in w.ranges):
            engine.inactive(what, "no kernel mapping of the range")
    run = engine.sensor_run("sensor.mmio")
    run.func = MmioSensor({w.vaddr: w for w in watches})
    for w in watches:
        await engine.add_trap(Trap("watchpoint", w.vaddr, w.size, f"MMIO {w.paddr:#x}", access=_page_access(w)),
                              Handler(run, None))
    log.info("mmio sensor armed", pages=len(watches))
