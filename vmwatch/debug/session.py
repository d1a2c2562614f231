"""The debugger core: one vCPU of a live guest (or a memory image, read-only) under control.

Theory of operation: a session holds a Target (``open_target``) and, lazily, the Linux layer
for symbols and the current task. Everything that only reads (registers, memory, disassembly,
backtrace, task) works on both live guests and images; an image answers from its saved CPU
state. Controlling execution (step, next, continue, breakpoints, watchpoints) needs
``target.live`` and raises :class:`UnsupportedOperation` otherwise. The API is async (trio);
:class:`vmwatch.debug.sync.Debugger` wraps it for notebooks and the shell. Control of execution
lives in control.py (:class:`vmwatch.debug.control.Control`, a part of the session).

x86-64 kernel backtraces: Debian kernels use the ORC unwinder and no frame pointers, so the stack
is scanned from RSP to the top of the 16 KiB task stack for words that point into kernel text just
after a ``call`` (a return address). Such a scan can show stale frames; it is marked as a scan.
AArch64 guests (registers, disassembly, the frame-record backtrace with PAC bits stripped, the task
in SP_EL0) get what :mod:`vmwatch.debug.aarch64` knows of them; ``$pc`` and ``$sp`` name the program
counter and stack pointer on both.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from vmwatch.cpu import GPR_NAMES, Registers
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.debug import aarch64 as a64
from vmwatch.debug.control import BreakpointInfo, Control, WatchpointInfo
from vmwatch.errors import DebugError, SymbolError, UnsupportedOperation, VmwatchError
from vmwatch.events import Event

THREAD_SIZE = 16 << 10
"""x86-64 kernel stacks (THREAD_SIZE with KASAN off): a backtrace scan stops at their top."""
MAX_CALL_LEN = 7
"""Longest x86 call instruction that matters here: ``call [rip+disp32]`` with a prefix."""
KERNEL_SPACE = 0xFFFF800000000000

REGISTER_ALIASES = {"pc": "rip", "sp": "rsp", "fp": "rbp", "eflags": "rflags"}
_TERM = re.compile(r"\s*([+-])?\s*([^\s+-]+)")


@attrs.frozen
class Frame:
    """One line of a backtrace."""

    index: int
    address: int
    symbol: str | None
    stack_address: int | None
    """Where on the stack the return address was found (``None`` for frame 0, the RIP)."""


@attrs.frozen
class Instruction:
    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes
    target: int | None = None
    """Branch or call target when it is a constant."""


@attrs.frozen
class TaskInfo:
    pid: int
    tgid: int
    comm: str
    address: int
    """Virtual address of the task_struct."""


class DebugSession(Control):
    """Debugger state for one target. Create with :func:`open_debug` (or from a Target).

    Args:
        target: from ``open_target``.
        linux: look for a Linux kernel (symbols, current task); False for other guests, where
            addresses are numbers and registers only.
        observe: a live guest that something else runs (``vmwatch watch --gdb``): the session
            reads its registers and memory but never stops, steps, traps or writes it.
    """

    def __init__(self, target: Any, *, linux: bool = True, observe: bool = False) -> None:
        self.target = target
        self.aarch64 = any(getattr(source, "arch", None) == "aarch64" for source in (target.live, *target.saved_cpus))
        self.live = target.live
        self.observe = observe and self.live is not None
        self.vcpu = 0
        self._regs: Registers | None = None
        self._linux: Any = None
        self._linux_error: Exception | None = None if linux else SymbolError("no OS layer in this session")
        self._memory: Any = None
        self.breakpoints: dict[int, BreakpointInfo] = {}
        self.watchpoints: dict[int, WatchpointInfo] = {}
        self._next_number = 1
        self.last_stop: Event | None = None
        from capstone import CS_ARCH_ARM64, CS_ARCH_X86, CS_MODE_64, CS_MODE_ARM, Cs

        self._cs = Cs(*((CS_ARCH_ARM64, CS_MODE_ARM) if self.aarch64 else (CS_ARCH_X86, CS_MODE_64)))
        self._cs.detail = True

    # -- state ---------------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self.live is None or self.observe

    async def registers(self, refresh: bool = False) -> Registers | Aarch64Registers:
        """The selected vCPU's registers (cached until the guest runs again)."""
        if self._regs is None or refresh:
            if self.live is None:
                cpus = self.target.saved_cpus
                if not cpus:
                    raise UnsupportedOperation("this image holds no saved CPU state")
                if not 0 <= self.vcpu < len(cpus):
                    raise DebugError(f"no vCPU {self.vcpu} (the image has {len(cpus)})")
                self._regs = cpus[self.vcpu]
            else:
                self._regs = await self.live.registers(self.vcpu)
        return self._regs

    def select_vcpu(self, vcpu: int) -> None:
        """Make ``vcpu`` the one registers, reads by CR3, steps and continues are about."""
        if vcpu != self.vcpu:
            self.vcpu = vcpu
            self._regs = None

    def guest_ran(self) -> None:
        """The guest executed (or, observed, may have): registers and cached memory are stale."""
        self._regs = None
        if self._memory is not None:
            self._memory.on_resume()

    @property
    def linux(self) -> Any:
        """The Linux layer (symbols, types), or raise SymbolError once and remember why."""
        if self._linux is None:
            if self._linux_error is not None:
                raise self._linux_error
            from vmwatch.os.linux.kernel import Linux

            regs = (self._regs,) if self._regs is not None else tuple(self.target.saved_cpus)
            try:
                self._linux = Linux.from_memory(self.target.memory, registers=regs)
            except VmwatchError as exc:
                self._linux_error = SymbolError(f"no Linux symbols: {exc}")
                raise self._linux_error from None
        return self._linux

    @property
    def symbols(self) -> Any | None:
        try:
            return self.linux.symbols
        except VmwatchError:
            return None

    async def memory(self) -> Any:
        """GuestMemory: the Linux layer's (kernel page tables, caches) or one on the vCPU's CR3."""
        if self._memory is None:
            try:
                self._memory = self.linux.memory
            except VmwatchError:
                from vmwatch.memory import GuestMemory

                self._memory = GuestMemory(self.target.memory, registers=await self.registers())
        return self._memory

    async def read(self, vaddr: int, size: int) -> bytes:
        """Virtual memory: kernel addresses through the kernel tables, user ones through CR3.

        Raises:
            TranslationError, PhysicalReadError: the address is not mapped.
        """
        if size < 0 or size > 1 << 24:
            raise DebugError(f"bad length {size}")
        memory = await self.memory()
        cr3 = None
        if not self.is_kernel(vaddr):
            regs = await self.registers()
            if self.aarch64:
                cr3 = regs.ttbr0_el1  # the user half's root (GuestMemory takes TTBR0 values)
                if cr3 is None:
                    raise DebugError(f"{vaddr:#x} is a user address and this source has no TTBR0_EL1 "
                                     "(a dump's notes hold none)")
            else:
                cr3 = regs.cr3 & ~0xFFF & ((1 << 52) - 1) if regs.cr3 is not None else None
        return memory.read(vaddr & 0xFFFFFFFFFFFFFFFF, size, cr3=cr3)

    def is_kernel(self, address: int) -> bool:
        """True for an address of the kernel half (x86: above the canonical hole; AArch64: TTBR1's)."""
        return a64.is_kernel(address) if self.aarch64 else address >= KERNEL_SPACE

    async def read_phys(self, paddr: int, size: int) -> bytes:
        """Guest-physical memory (works without registers, e.g. on a raw image).

        Raises:
            PhysicalReadError: the range is not backed.
        """
        if size < 0 or size > 1 << 24:
            raise DebugError(f"bad length {size}")
        return self.target.memory.read(paddr, size)

    # -- symbols and expressions ---------------------------------------------------------------------

    def symbolize(self, address: int) -> str | None:
        """``name+0xoff`` for a kernel address, or ``None``."""
        symbols = self.symbols
        if symbols is None or not self.is_kernel(address):
            return None
        found = symbols.lookup(address)
        if found is None:
            return None
        name, offset = found
        if offset > 0x100000:
            return None
        return f"{name}+{offset:#x}" if offset else name

    async def evaluate(self, expression: str) -> int:
        """An address expression: numbers, ``$reg``, symbols, joined by + and -.

        Examples: ``0xffffffff81000000``, ``commit_creds+0x10``, ``$rsp+8``, ``$rip``, ``$x0``, ``$pc``.

        Raises:
            DebugError: a term is neither a number, a register nor a known symbol.
        """
        text = expression.strip()
        if not text:
            raise DebugError("empty address expression")
        total, pos = 0, 0
        for match in _TERM.finditer(text):
            if match.start() != pos and text[pos:match.start()].strip():
                raise DebugError(f"bad address expression {expression!r}")
            sign = -1 if match.group(1) == "-" else 1
            total += sign * await self._term(match.group(2), expression)
            pos = match.end()
        if text[pos:].strip():
            raise DebugError(f"bad address expression {expression!r}")
        return total & 0xFFFFFFFFFFFFFFFF

    async def _term(self, term: str, expression: str) -> int:
        if term.startswith("$"):
            try:
                value = register_value(await self.registers(), term[1:].lower())
            except KeyError:
                value = None
            if not isinstance(value, int):
                raise DebugError(f"unknown register {term!r} in {expression!r}")
            return value
        try:
            return int(term, 0)
        except ValueError:
            pass
        try:
            return int(term, 16) if re.fullmatch(r"[0-9a-fA-F]{8,16}", term) else self._symbol(term)
        except KeyError:
            raise DebugError(f"unknown symbol {term!r}") from None

    def _symbol(self, name: str) -> int:
        symbols = self.symbols
        if symbols is None:
            raise DebugError(f"cannot resolve {name!r}: {self._linux_error}")
        return int(symbols[name])

    # -- reading ---------------------------------------------------------------------------------------

    async def disassemble(self, address: int, count: int = 10) -> list[Instruction]:
        """Up to ``count`` instructions from ``address`` (stops early at undecodable bytes)."""
        data = await self._read_code(address, count * (4 if self.aarch64 else 15))
        out: list[Instruction] = []
        for insn in self._cs.disasm(data, address):
            out.append(self._instruction(insn))
            if len(out) >= count:
                break
        if not out:
            raise DebugError(f"no valid instruction at {address:#x}")
        return out

    async def _read_code(self, address: int, size: int) -> bytes:
        """Code bytes; stops at the first unreadable page rather than failing the whole read."""
        try:
            return await self.read(address, size)
        except VmwatchError:
            first = min(size, 0x1000 - (address & 0xFFF))
            return await self.read(address, first)

    def _instruction(self, insn: Any) -> Instruction:
        from capstone import CS_GRP_CALL, CS_GRP_JUMP
        from capstone.x86 import X86_OP_IMM

        target = None
        if self.aarch64:
            target = a64.branch_target(insn)
        elif insn.group(CS_GRP_CALL) or insn.group(CS_GRP_JUMP):
            ops = insn.operands
            if len(ops) == 1 and ops[0].type == X86_OP_IMM:
                target = ops[0].imm & 0xFFFFFFFFFFFFFFFF
        return Instruction(insn.address, insn.size, insn.mnemonic, insn.op_str, bytes(insn.bytes), target)

    async def current_instruction(self) -> Instruction:
        regs = await self.registers()
        return (await self.disassemble(regs.pc, 1))[0]

    def is_call(self, insn: Instruction) -> bool:
        """A call (x86 ``call``, AArch64 ``bl``/``blr`` and the authenticating forms): step over runs it."""
        return insn.mnemonic in a64.CALLS if self.aarch64 else insn.mnemonic == "call"

    async def current_task(self) -> TaskInfo:
        """The task on the selected vCPU: x86, the per-CPU ``current_task`` (``pcpu_hot`` on 6.2+);
        AArch64, SP_EL0, where Linux keeps ``current`` while the vCPU runs in EL1.

        Raises:
            SymbolError: no Linux layer, or it lacks the symbols.
            DebugError: an AArch64 vCPU in EL0 (SP_EL0 is then the user stack pointer).
        """
        linux = self.linux
        memory = linux.memory
        symbols, types = linux.symbols, linux.types
        if self.aarch64:
            task = self._aarch64_current(linux, await self.registers())
        else:
            current = symbols.get("current_task")
            if current is None:
                current = symbols["pcpu_hot"] + types.offset("pcpu_hot", "current_task")
            base = memory.u64(symbols["__per_cpu_offset"] + 8 * self.vcpu)
            task = memory.u64((base + current) & 0xFFFFFFFFFFFFFFFF)
        return TaskInfo(
            pid=memory.s32(task + types.offset("task_struct", "pid")),
            tgid=memory.s32(task + types.offset("task_struct", "tgid")),
            comm=memory.cstring(task + types.offset("task_struct", "comm"), 16),
            address=task,
        )

    def _aarch64_current(self, linux: Any, regs: Aarch64Registers) -> int:
        """SP_EL0 in EL1; without it (a dump's notes have no SP_EL0) the task whose kernel stack holds SP."""
        if regs.el != 1:
            raise DebugError(f"vCPU {self.vcpu} runs in EL{regs.el}: no kernel task state there (step into the kernel)")
        if regs.sp_el0 is not None:
            return regs.sp_el0
        stack = linux.types.offset("task_struct", "stack")
        for task in (linux.symbols["init_task"], *(t.address for t in linux.tasks())):
            base = linux.memory.pointer(task + stack)
            if base <= regs.sp < base + a64.THREAD_SIZE:
                return task
        raise DebugError(f"vCPU {self.vcpu}: no SP_EL0 and no task's kernel stack holds sp {regs.sp:#x}")

    async def backtrace(self, limit: int = 32) -> list[Frame]:
        """Frame 0 is the pc; the rest are return addresses found scanning the kernel stack (x86) or
        walking the frame records (AArch64, PAC bits stripped)."""
        regs = await self.registers()
        frames = [Frame(0, regs.pc, self.symbolize(regs.pc), None)]
        if self.aarch64:
            for address, where in await a64.frame_records(regs, self._u64, self._in_text, self._same_function,
                                                          limit - 1):
                frames.append(Frame(len(frames), address, self.symbolize(address), where))
            return frames
        rsp = regs.rsp
        if rsp is None or rsp < KERNEL_SPACE or regs.rip < KERNEL_SPACE:
            return frames  # a user-mode vCPU: no kernel stack to scan
        top = (rsp | (THREAD_SIZE - 1)) + 1
        try:
            stack = await self.read(rsp, top - rsp)
        except VmwatchError:
            stack = await self.read(rsp, 0x1000 - (rsp & 0xFFF))
        for offset in range(0, len(stack) - 7, 8):
            value = int.from_bytes(stack[offset:offset + 8], "little")
            if value < KERNEL_SPACE or not await self._after_call(value):
                continue
            frames.append(Frame(len(frames), value, self.symbolize(value), rsp + offset))
            if len(frames) >= limit:
                break
        return frames

    async def _u64(self, address: int) -> int | None:
        try:
            return int.from_bytes(await self.read(address, 8), "little")
        except VmwatchError:
            return None

    def _in_text(self, address: int) -> bool:
        symbols = self.symbols
        if symbols is None:
            return False
        start, end = symbols.get("_stext"), symbols.get("_etext")
        return start is not None and end is not None and start < address < end

    def _same_function(self, a: int, b: int) -> bool:
        found = self.symbols.lookup(a), self.symbols.lookup(b)
        return None not in found and found[0][0] == found[1][0]

    async def _after_call(self, address: int) -> bool:
        """True if ``address`` is in kernel text and a call instruction ends right before it."""
        if not self._in_text(address):
            return False
        try:
            code = await self.read(address - MAX_CALL_LEN, MAX_CALL_LEN)
        except VmwatchError:
            return False
        for length in (5, 6, 7, 2, 3, 4):  # call rel32 first: by far the most common
            insns = list(self._cs.disasm(code[MAX_CALL_LEN - length:], address - length))
            if len(insns) == 1 and insns[0].size == length and insns[0].mnemonic == "call":
                return True
        return False


def register_value(regs: Registers | Aarch64Registers, name: str) -> int | None:
    """A register by name (gdb's aliases too: ``pc``, ``sp``, ``fp``, ``lr``); None if the source lacks it.

    Raises:
        KeyError: the architecture has no register of that name.
    """
    if regs.arch == "aarch64":
        return a64.register_value(regs, name)
    name = REGISTER_ALIASES.get(name, name)
    value = getattr(regs, name, KeyError)
    if value is KeyError or not (value is None or isinstance(value, int)):
        raise KeyError(name)
    return value


def register_lines(regs: Registers | Aarch64Registers) -> list[str]:
    """``info registers`` text: GPRs, RIP, RFLAGS, control registers, segment bases (AArch64: x0..x30,
    sp, pc, pstate, system registers)."""
    if regs.arch == "aarch64":
        return a64.register_lines(regs)
    lines = []
    names = list(GPR_NAMES) + ["rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer", "fs_base", "gs_base",
                                "kernel_gs_base"]
    for name in names:
        value = getattr(regs, name)
        if value is not None:
            lines.append(f"{name:<15}{value:#018x}")
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        value = getattr(regs, seg)
        if value is not None:
            lines.append(f"{seg:<15}{value.selector:#06x}")
    return lines
