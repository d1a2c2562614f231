"""Page faults from guarded inline hooks on the kernel's C fault path, filtered in the guest.

Theory of operation: the IDT breakpoint of engine/exceptions.py stops at every page fault and
flushes TCG's translated code each time (~50 faults/s at best). x86-64 Linux sends every page
fault, after the noinstr entry code (``exc_page_fault``, no ftrace NOP), through one of three
traceable functions (arch/x86/mm/fault.c, mm/memory.c), each with a 5-byte ftrace NOP for a
guarded inline hook (vmwatch/live/hook_guards.py), which tests the watch's filters with guest
instructions and stops only when they match -- a watchpoint stop, no flush:

=========================  ==========================================  ===========================
function (arguments)       the faults it sees                          guard
=========================  ==========================================  ===========================
``handle_mm_fault``        a user address inside a VMA, either mode    ``regs`` (RCX) not NULL:
(vma, address, flags,      (demand paging, copy-on-write): nearly all  not get_user_pages; no
regs)                                                                  FAULT_FLAG_TRIED: a retry
                                                                       is the same fault
``do_kern_addr_fault``     every fault on a kernel address (>=         address >= TASK_SIZE_MAX
(regs, error_code,         TASK_SIZE_MAX), either mode: spurious,
address)                   bad ones (oops or exception-table fixup)
``__bad_area_nosemaphore`` a user address outside any VMA, or an       address < TASK_SIZE_MAX
(regs, error_code,         access the VMA forbids: SIGSEGV, or a       (a kernel address came
address, pkey, si_code)    kernel fixup (copy_from_user)               through the one above)
=========================  ==========================================  ===========================

Each guard also tests the mode (CPL of the CS saved in ``regs``), the rules' address range and
their pid (the tgid of ``gs:[current_task]``) where every listener names one. Not seen: faults
with reserved bits set (``pgtable_bad``: an oops) and faults a kprobe handles. A retried fault
whose second try finds no VMA is seen twice (once per path).

The event is the IDT sensor's ``Fault``: ``cr2`` the address argument, ``user`` from the saved
CS, ``rip`` the faulting instruction (``regs->ip``), ``vcpu`` the one stopped. ``error_code`` is
the CPU's on the two fault.c paths; on ``handle_mm_fault`` (which gets ``flags``, not the code)
it is rebuilt: W from FAULT_FLAG_WRITE, U from the mode, I from FAULT_FLAG_INSTRUCTION, P from
the page tables at the stop (a present PTE: a protection fault); PK and SGX are never set there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from vmwatch.engine.address_spaces import release_tuple
from vmwatch.errors import TranslationError, VmwatchError
from vmwatch.events import Breakpoint, Fault
from vmwatch.live.hook_guards import Guard

if TYPE_CHECKING:
    from vmwatch.engine.dispatch import Handler
    from vmwatch.engine.guest import Guest
    from vmwatch.engine.sensor_host import SensorHost

log = structlog.get_logger()

PAGE_FAULT = 14
TASK_SIZE_MAX = (1 << 47) - 4096
"""x86-64 with 4-level paging: where the kernel's ``fault_in_kernel_space`` starts."""
PT_REGS_IP, PT_REGS_CS = 0x80, 0x88
"""struct pt_regs (the entry code's frame, fixed by its asm): ``ip`` and ``cs``."""
FAULT_FLAGS_6_1 = {"FAULT_FLAG_WRITE": 1 << 0, "FAULT_FLAG_TRIED": 1 << 5, "FAULT_FLAG_USER": 1 << 6,
                   "FAULT_FLAG_INSTRUCTION": 1 << 8}
"""``enum fault_flag`` (include/linux/mm_types.h, 5.17 on) when the kernel's BTF lacks it."""
PF_PROT, PF_WRITE, PF_USER, PF_INSTR = 1, 2, 4, 16
REGS_SINCE = (5, 9)
"""``handle_mm_fault`` has had its ``regs`` argument since 5.9 (RCX is anything before)."""

HANDLE_MM_FAULT, KERNEL_ADDRESS, BAD_AREA = "handle_mm_fault", "do_kern_addr_fault", "__bad_area_nosemaphore"
SPANS = {HANDLE_MM_FAULT: (0, TASK_SIZE_MAX), KERNEL_ADDRESS: (TASK_SIZE_MAX, 1 << 64),
         BAD_AREA: (0, TASK_SIZE_MAX)}
"""The addresses each function sees."""
ARGS = {HANDLE_MM_FAULT: ("rcx", "rsi"), KERNEL_ADDRESS: ("rdi", "rdx"), BAD_AREA: ("rdi", "rdx")}
"""Registers of ``regs`` and of the fault address at each function's entry."""


def fault_flags(linux: Any) -> dict[str, int]:
    try:
        values = linux.types.enum("fault_flag")
        return {name: values[name] for name in FAULT_FLAGS_6_1}
    except (VmwatchError, KeyError, AttributeError):
        return dict(FAULT_FLAGS_6_1)


def guards(modes: frozenset[bool], span: tuple[int, int] | None, pid: tuple[int, int, int] | None,
           flags: dict[str, int]) -> dict[str, Guard]:
    """The guard of each hooked function (a function none of whose addresses is wanted: absent).

    Args:
        modes: the modes listened to (True user, False kernel); both: no mode test.
        span: the hull ``[low, high)`` of the rules' address ranges, None when one has none.
        pid: ``(current_task, tgid offset, pid)`` when every listener names that one pid.
    """
    out = {}
    for name, (low, high) in SPANS.items():
        if span is not None:
            low, high = max(low, span[0]), min(high, span[1])
            if low >= high:
                continue
        regs, address = ARGS[name]
        bounds = None if (low, high) == (0, 1 << 64) else (address, low, high)
        mode = (regs, PT_REGS_CS, True in modes) if len(modes) == 1 else None
        extra: dict[str, Any] = {}
        if name == HANDLE_MM_FAULT:
            extra = {"nonnull": "rcx", "skip_bits": ("rdx", flags["FAULT_FLAG_TRIED"])}
        out[name] = Guard(mode=mode, address=bounds, pid=pid, **extra)
    return out


class PageFaultHookSensor:
    """A stop in a guarded hook of the fault path -> :class:`Fault`."""

    def __init__(self, functions: dict[int, str], flags: dict[str, int]) -> None:
        self.functions = functions
        """Hooked address -> function name."""
        self.flags = flags

    def __call__(self, event: Breakpoint, guest: Guest) -> None:
        name = self.functions.get(event.address)
        regs = guest.registers
        if name is None or regs is None:
            return
        regs_reg, address_reg = ARGS[name]
        frame, cr2 = getattr(regs, regs_reg), getattr(regs, address_reg)
        if frame is None or cr2 is None:
            return
        memory = guest.linux.memory
        data = memory.read(frame + PT_REGS_IP, 16)
        rip, cs = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:10], "little")
        user = cs & 3 == 3
        if name == HANDLE_MM_FAULT:
            flags = regs.rdx or 0
            code = (PF_WRITE if flags & self.flags["FAULT_FLAG_WRITE"] else 0) | (PF_USER if user else 0) \
                | (PF_INSTR if flags & self.flags["FAULT_FLAG_INSTRUCTION"] else 0)
            try:
                memory.translate(cr2, regs.cr3)
                code |= PF_PROT
            except TranslationError:
                pass
        else:
            code = (regs.rsi or 0) & 0xFFFFFFFF
        guest.emit(Fault(seq=event.seq, time_ns=event.time_ns, vcpu=event.vcpu, vector=PAGE_FAULT,
                         name="page_fault", rip=rip, user=user, error_code=code, cr2=cr2))


def _filters(handlers: list[Handler], linux: Any) -> tuple[tuple[int, int] | None, tuple[int, int, int] | None]:
    """The address hull and the one pid every page-fault listener names (None where they don't)."""
    narrows = [h.narrow for h in handlers]
    ranges = [n.address if n is not None else None for n in narrows]
    span = None if None in ranges or not ranges else (min(r[0] for r in ranges), max(r[1] for r in ranges))
    pids = {n.pid if n is not None else None for n in narrows}
    pid = None
    if len(pids) == 1 and None not in pids:
        try:
            current = linux.symbols.get("current_task")
            if current is None:  # 6.2 on: in pcpu_hot
                current = linux.symbols["pcpu_hot"] + linux.types.offset("pcpu_hot", "current_task")
            tgid = linux.types.offset("task_struct", "tgid")
        except (VmwatchError, KeyError, AttributeError):
            current = None
        if current is not None and 0 <= pids.copy().pop() < 1 << 31:
            pid = (int(current), tgid, pids.pop())
    return span, pid


async def plan(engine: SensorHost, modes: frozenset[bool], handlers: list[Handler]) -> bool:
    """Arm the guarded hooks for these page-fault listeners; False (nothing armed) when this guest
    or source cannot take them all (the caller falls back on the IDT breakpoint)."""
    from vmwatch.engine import sources as caps
    from vmwatch.engine.dispatch import Handler as Bound, Trap

    replay = getattr(engine.source, "replays_traps", False)
    add = getattr(engine.source, "add_guarded_hook", None)
    if caps.BREAKPOINTS not in engine.capabilities or (add is None and not replay):
        return False
    try:
        linux = engine.guest.linux
        if linux.memory.pointer_size != 8 or release_tuple(linux.kernel.release) < REGS_SINCE:
            return False
        flags = fault_flags(linux)
        span, pid = _filters(handlers, linux)
        wanted = guards(modes, span, pid, flags)
        addresses = {name: linux.symbols.get(name) for name in wanted}
        if any(a is None or linux.symbols.type_of(name) not in ("t", "T") for name, a in addresses.items()):
            return False
    except (VmwatchError, KeyError, AttributeError):
        return False
    if replay:  # a recording made with the hooks holds their stops; one made without, the IDT's
        run = engine.sensor_run("sensor.page_fault_hooks")
        every = {name: linux.symbols.get(name) for name in SPANS}
        run.func = PageFaultHookSensor({int(a): n for n, a in every.items() if a is not None}, flags)
        for name, address in every.items():
            if address is not None:
                await engine.add_trap(Trap("breakpoint", int(address), 1, name, entry=True), Bound(run, None))
        return False
    placed: list[int] = []
    for name, guard in wanted.items():
        try:
            ok = await add(int(addresses[name]), guard)
        except VmwatchError:
            ok = False
        if not ok:
            for address in placed:
                await engine.source.remove_breakpoint(address)
            return False
        placed.append(int(addresses[name]))
    run = engine.sensor_run("sensor.page_fault_hooks")
    run.func = PageFaultHookSensor({int(addresses[n]): n for n in wanted}, flags)
    for name, guard in wanted.items():
        await engine.add_trap(Trap("breakpoint", int(addresses[name]), 1, name, entry=True, guard=guard),
                              Bound(run, None))
    log.info("page-fault hooks armed", functions=sorted(wanted), span=span, pid=pid)
    return True
