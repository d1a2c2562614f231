"""The debugger's command interpreter (gdb-like words), interactive or from a script.

Interactive on a terminal: readline history (``~/.vmwatch_history``) and tab completion of
commands and kernel symbols. From a file or a pipe, each command is echoed after the prompt so
the output reads like a transcript. A bad command or address prints one ``error:`` line and the
session goes on; the shell counts them so scripts can fail at the end. Every line goes out
through :func:`vmwatch.text.shown`: symbol names and strings come from guest memory.
"""

from __future__ import annotations

import cmd
import os
import string
from typing import IO, Iterable

from vmwatch.errors import DebugError, VmwatchError
from vmwatch.events import Access, Breakpoint, MemoryAccess
from vmwatch.text import shown

HISTORY = "~/.vmwatch_history"
_X_FORMATS = {"b": 1, "h": 2, "w": 4, "g": 8}
_X_STYLES = frozenset("xduas i")
"""gdb's output formats that ``x`` accepts: hex, signed, unsigned, address (with its symbol), string, code."""


def parse_format(fmt: str) -> tuple[int | None, int | None, str]:
    """gdb's ``/NFU`` (count, then size and format letters in any order) as (count, size, style).

    ``x/4gx`` is (4, 8, "x"), ``x/8i`` (8, None, "i"), ``x/16b`` (16, 1, "x").

    Raises:
        DebugError: a letter gdb would not take here.
    """
    digits = fmt[:len(fmt) - len(fmt.lstrip(string.digits))]
    size = style = None
    for letter in fmt[len(digits):]:
        if letter in _X_FORMATS and size is None:
            size = _X_FORMATS[letter]
        elif letter in _X_STYLES and letter != " " and style is None:
            style = letter
        else:
            raise DebugError(f"unknown format letter {letter!r} in /{fmt} (sizes b h w g; formats x d u a s i)")
    return int(digits) if digits else None, size, style or "x"


def hexdump(address: int, data: bytes, unit: int = 1) -> list[str]:
    """16 bytes per line: address, units in hex (little-endian), and ASCII for byte dumps."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        if unit == 1:
            cells = " ".join(f"{b:02x}" for b in chunk)
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
            lines.append(f"{address + off:#018x}  {cells:<47}  {text}")
        else:
            cells = " ".join(f"{int.from_bytes(chunk[i:i + unit], 'little'):#0{2 + 2 * unit}x}"
                             for i in range(0, len(chunk) - unit + 1, unit))
            lines.append(f"{address + off:#018x}  {cells}")
    return lines


class DebugShell(cmd.Cmd):
    """gdb-flavoured commands over a :class:`vmwatch.debug.sync.Debugger`."""

    prompt = "(vmwatch) "
    identchars = string.ascii_letters + string.digits + "_"

    def __init__(self, debugger, stdout: IO[str], stderr: IO[str], stdin: IO[str] | None = None) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.dbg = debugger
        self.err = stderr
        self.errors = 0
        self.intro = (f"vmwatch debug on {debugger.spec}"
                      f"{' (memory image: read-only)' if debugger.read_only else ''}; 'help' lists commands")

    # -- plumbing --------------------------------------------------------------------------------------

    def out(self, text: str = "") -> None:
        # backslashes stay: lines hold repr()s and strings escaped already (x/s)
        self.stdout.write(shown(text, backslash=False) + "\n")

    def onecmd(self, line: str) -> bool:
        try:
            return bool(super().onecmd(line))
        except (VmwatchError, ValueError, OverflowError) as exc:
            self._error(str(exc))
        except KeyboardInterrupt:
            self._error("interrupted")
        except Exception as exc:  # noqa: BLE001 - trio.TooSlowError and the like: one line, go on
            self._error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        return False

    def _error(self, message: str) -> None:
        self.errors += 1
        self.err.write(f"error: {shown(message, backslash=False)}\n")
        self.err.flush()

    def default(self, line: str) -> None:
        raise DebugError(f"unknown command {line.split()[0]!r} (try 'help')")

    def emptyline(self) -> bool:
        return False  # unlike cmd's default, never repeat the last command (a surprise 'step')

    def run_script(self, lines: Iterable[str]) -> None:
        """Run commands from a script, echoing each after the prompt; stop at ``quit``."""
        self.out(self.intro)
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            self.out(f"{self.prompt}{line}")
            if self.onecmd(line):
                break

    def interact(self) -> None:
        """The interactive loop, with readline history and completion."""
        try:
            import readline
        except ImportError:  # pragma: no cover - readline is part of CPython on Linux
            readline = None
        path = os.path.expanduser(HISTORY)
        if readline is not None:
            try:
                readline.read_history_file(path)
            except OSError:
                pass
            readline.set_completer_delims(" \t\n")
        try:
            while True:
                try:
                    self.cmdloop()
                    break
                except KeyboardInterrupt:
                    self.stdout.write("^C\n")
                    self.intro = ""
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(path)
                except OSError:
                    pass

    def _complete_symbol(self, text: str, *_: object) -> list[str]:
        symbols = self.dbg.session.symbols
        if symbols is None or len(text) < 2:
            return []
        return sorted(n for n in symbols.names if n.startswith(text))[:200]

    complete_break = complete_b = complete_dis = complete_p = complete_x = complete_xp = _complete_symbol

    def _parse_int(self, text: str, default: int) -> int:
        return int(text, 0) if text else default

    # -- reading ---------------------------------------------------------------------------------------

    def do_regs(self, arg: str) -> None:
        """regs [NAME...]: the selected vCPU's registers, or the ones named (also: info registers)."""
        from vmwatch.debug.aarch64 import ALIASES
        from vmwatch.debug.session import REGISTER_ALIASES, register_lines, register_value

        regs = self.dbg.registers()
        aliases = ALIASES if regs.arch == "aarch64" else REGISTER_ALIASES
        wanted = {aliases.get(name.lstrip("$"), name.lstrip("$")) for name in arg.split()}
        lines = [line for line in register_lines(regs) if not wanted or line.split()[0] in wanted]
        missing = wanted - {line.split()[0] for line in lines}
        unknown = sorted(name for name in missing if not _has_register(regs, name))
        if unknown:
            raise DebugError(f"no register named {' or '.join(unknown)}")
        lines += [f"{name:<15}<unavailable>" for name in sorted(missing)]  # the source does not know it
        for line in lines:
            name = line.split()[0]
            sym = self.dbg.symbolize(register_value(regs, name)) if name in ("rip", "pc", "x30") else None
            self.out(f"{line}  <{sym}>" if sym else line)

    def do_info(self, arg: str) -> None:
        """info registers | info breakpoints | info symbol ADDR | info task"""
        what, _, rest = arg.partition(" ")
        if what in ("registers", "reg", "r"):
            self.do_regs(rest)
        elif what in ("breakpoints", "break", "b", "watchpoints"):
            self.do_breakpoints(rest)
        elif what == "symbol":
            self.do_sym(rest)
        elif what == "task":
            self.do_task(rest)
        else:
            raise DebugError("info what? registers, breakpoints, symbol ADDR, task")

    def do_p(self, arg: str) -> None:
        """p[/x|/d] EXPR: value of an address expression (numbers, $reg, symbol, + and -)."""
        style = ""
        if arg.startswith("/"):
            style, _, arg = arg[1:].partition(" ")
            if style not in ("x", "d", "u", "a"):
                raise DebugError(f"p/{style}: formats are x, d, u and a")
        value = self.dbg.evaluate(arg)
        sym = self.dbg.symbolize(value)
        text = {"x": f"{value:#x}", "d": str(value), "u": str(value)}.get(style, f"{value:#x} ({value})")
        self.out(text + (f" <{sym}>" if sym and style in ("", "a") else ""))

    do_print = do_p

    def do_sym(self, arg: str) -> None:
        """sym ADDR: the kernel symbol at or before an address."""
        value = self.dbg.evaluate(arg)
        self.out(self.dbg.symbolize(value) or f"no symbol matches {value:#x}")

    def do_x(self, arg: str) -> None:
        """x/NF ADDR: examine virtual memory. F: b bytes, h/w/g 2/4/8-byte words, s string, i code."""
        self._examine(arg, self.dbg.read)

    def do_xp(self, arg: str) -> None:
        """xp/NF PADDR: examine physical memory (formats b h w g s; works on raw images too)."""
        self._examine(arg, self.dbg.read_phys, code=False)

    def _examine(self, arg: str, read, *, code: bool = True) -> None:
        count, size, style = None, None, "x"
        if arg.startswith("/"):
            fmt, _, arg = arg[1:].partition(" ")
            count, size, style = parse_format(fmt)
        if style == "a":
            size = 8
        if count is None:
            count = 1 if style == "s" else 64 if style == "x" and size in (None, 1) else 8
        if size is None:
            size = 1
        if not arg.strip():
            raise DebugError("x needs an address (x/16b $rsp)")
        if count < 1 or count > 1 << 16:
            raise DebugError(f"bad count {count}")
        address = self.dbg.evaluate(arg)
        if style == "i":
            if not code:
                raise DebugError("xp shows no code: use x/Ni on a virtual address")
            self._show_code(address, count)
        elif style == "s":
            for _ in range(count):
                data = read(address, 256)
                text = data.split(b"\0", 1)[0]
                self.out(f"{address:#018x}  '{shown(text)}'")  # every byte shown, invalid UTF-8 as \xNN
                address += len(text) + 1
        elif style == "x":
            for line in hexdump(address, read(address, count * size), size):
                self.out(line)
        else:
            self._show_words(address, read(address, count * size), size, style)

    def _show_words(self, address: int, data: bytes, size: int, style: str) -> None:
        """x/d, x/u, x/a: one word a line, signed, unsigned, or as an address with its symbol."""
        for off in range(0, len(data) - size + 1, size):
            value = int.from_bytes(data[off:off + size], "little", signed=style == "d")
            if style == "a":
                sym = self.dbg.symbolize(value)
                text = f"{value:#018x}" + (f" <{sym}>" if sym else "")
            else:
                text = str(value)
            self.out(f"{address + off:#018x}  {text}")

    def do_dis(self, arg: str) -> None:
        """dis [ADDR] [N]: disassemble N instructions (default: 10 at $pc), with symbols."""
        parts = arg.split()
        address = self.dbg.evaluate(parts[0]) if parts else self.dbg.evaluate("$pc")
        self._show_code(address, self._parse_int(parts[1] if len(parts) > 1 else "", 10))

    do_disassemble = do_disas = do_dis

    def _show_code(self, address: int, count: int) -> None:
        rip = None if self.dbg.read_only and not self.dbg.session.target.saved_cpus else self.dbg.registers().pc
        for insn in self.dbg.disassemble(address, count):
            where = self.dbg.symbolize(insn.address)
            marker = "=>" if insn.address == rip else "  "
            target = ""
            if insn.target is not None:
                sym = self.dbg.symbolize(insn.target)
                target = f"  <{sym}>" if sym else ""
            label = f" <{where}>" if where else ""
            self.out(f"{marker} {insn.address:#018x}{label}:  {insn.raw.hex():<20} {insn.mnemonic} {insn.op_str}"
                     f"{target}")

    def do_bt(self, arg: str) -> None:
        """bt: kernel stack backtrace (frame 0 is the pc; then a stack scan on x86, frame records on AArch64)."""
        for frame in self.dbg.backtrace(self._parse_int(arg.strip(), 32)):
            where = f" <{frame.symbol}>" if frame.symbol else ""
            at = f"  (stack {frame.stack_address:#x})" if frame.stack_address is not None else ""
            self.out(f"#{frame.index:<3} {frame.address:#018x}{where}{at}")

    do_backtrace = do_bt

    def do_task(self, arg: str) -> None:
        """task: the task running on the selected vCPU (pid, tgid, comm)."""
        task = self.dbg.current_task()
        self.out(f"pid {task.pid} tgid {task.tgid} comm {task.comm!r} task_struct {task.address:#x}"
                 f" (vCPU {self.dbg.vcpu})")

    def do_vcpu(self, arg: str) -> None:
        """vcpu N: select the vCPU the other commands act on."""
        self.dbg.select_vcpu(int(arg, 0))
        self.out(f"vCPU {self.dbg.vcpu}")

    # -- control ---------------------------------------------------------------------------------------

    def _where(self) -> None:
        regs = self.dbg.registers()
        self._show_code(regs.pc, 1)

    def do_step(self, arg: str) -> None:
        """step [N] (s, si): execute N instructions."""
        self.dbg.step(self._parse_int(arg.strip(), 1))
        self._where()

    do_s = do_si = do_stepi = do_step

    def do_next(self, arg: str) -> None:
        """next (n, ni): step over a call (runs to the instruction after it)."""
        self.dbg.next(timeout=float(arg) if arg.strip() else None)
        self._where()

    do_n = do_ni = do_nexti = do_next

    def do_continue(self, arg: str) -> None:
        """continue [SECONDS] (c): run until a breakpoint or watchpoint (Ctrl-C or SECONDS to give up)."""
        event = self.dbg.cont(timeout=float(arg) if arg.strip() else None)
        if isinstance(event, Breakpoint):
            numbers = [n for n, b in self.dbg.session.breakpoints.items() if b.address == event.address]
            label = f"breakpoint {numbers[0]}" if numbers else "breakpoint"
            self.out(f"{label} hit on vCPU {event.vcpu}")
        elif isinstance(event, MemoryAccess):
            self.out(f"watchpoint on {event.address:#x} ({event.access.name.lower()}) on vCPU {event.vcpu}")
        self._where()

    do_c = do_cont = do_continue

    def do_break(self, arg: str) -> None:
        """break SYMBOL|ADDRESS (b; gdb's b *ADDRESS too): stop when execution reaches it."""
        bp = self.dbg.add_breakpoint(arg.strip().removeprefix("*").strip())
        self.out(f"breakpoint {bp.number} at {bp.address:#x} <{bp.label}>")

    do_b = do_break

    def do_watch(self, arg: str) -> None:
        """watch ADDR [LEN] [r|w|rw]: stop when the guest accesses LEN bytes (default 8, writes)."""
        parts = arg.split()
        if not parts:
            raise DebugError("watch needs an address")
        size = self._parse_int(parts[1] if len(parts) > 1 else "", 8)
        modes = {"r": Access.READ, "w": Access.WRITE, "rw": Access.READ_WRITE}
        mode = parts[2] if len(parts) > 2 else "w"
        if mode not in modes:
            raise DebugError(f"watch mode must be r, w or rw, not {mode!r}")
        wp = self.dbg.add_watchpoint(parts[0], size, modes[mode])
        self.out(f"watchpoint {wp.number} on {wp.address:#x} (+{wp.size:#x}, {mode})")

    def do_delete(self, arg: str) -> None:
        """delete N: remove breakpoint or watchpoint N."""
        self.dbg.delete(int(arg, 0))

    do_d = do_delete

    def do_breakpoints(self, arg: str) -> None:
        """breakpoints: list breakpoints and watchpoints."""
        session = self.dbg.session
        for bp in session.breakpoints.values():
            self.out(f"{bp.number:<4} breakpoint {bp.address:#x} <{bp.label}> hits {bp.hits}")
        for wp in session.watchpoints.values():
            self.out(f"{wp.number:<4} watchpoint {wp.address:#x} +{wp.size:#x} {wp.access.name.lower()}")
        if not session.breakpoints and not session.watchpoints:
            self.out("no breakpoints or watchpoints")

    def do_quit(self, arg: str) -> bool:
        """quit (q): leave; breakpoints are removed and a live guest keeps running."""
        return True

    do_q = do_exit = do_quit

    def do_EOF(self, arg: str) -> bool:  # noqa: N802 - cmd's name for end of input
        self.out()
        return True


def _has_register(regs, name: str) -> bool:
    from vmwatch.debug.session import register_value

    try:
        register_value(regs, name)
    except KeyError:
        return False
    return True
