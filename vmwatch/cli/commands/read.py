"""``vmwatch read TARGET ADDRESS|SYMBOL``: a hexdump of guest memory, for people."""

from __future__ import annotations

import argparse
import json

HELP = "hexdump guest memory at a virtual or physical address or a kernel symbol"

MAX_LENGTH = 64 << 20


def _number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="memory image path or qemu:/path/to/qmp.sock")
    parser.add_argument("address", help="address (0x..., decimal) or kernel symbol name (Linux guests)")
    parser.add_argument("--length", "-n", type=_number, default=256, help="bytes to show (default 256)")
    parser.add_argument("--dtb", type=_number, help="page-table root (CR3) to translate with (default: vCPU 0's)")
    parser.add_argument("--mode", choices=["32-bit", "pae", "4-level", "5-level"],
                        help="paging mode (default: from vCPU 0's registers, else 4-level)")
    parser.add_argument("--pid", type=_number, help="read process PID's user address space (Linux guests)")
    parser.add_argument("--physical", action="store_true", help="ADDRESS is a guest-physical address")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a hexdump")


def run(args: argparse.Namespace, env) -> int:
    import trio

    return trio.run(_run, args, env)


async def _run(args: argparse.Namespace, env) -> int:
    from vmwatch.target import open_target

    if not 0 < args.length <= MAX_LENGTH:
        from vmwatch.errors import GuestDataError

        raise GuestDataError(f"--length must be between 1 and {MAX_LENGTH:#x}, not {args.length:#x}")
    async with open_target(args.target) as target:
        cpus = tuple(await target.cpu_state())
        memory, address, cr3 = _resolve(args, target, cpus)
        chunks = _read_pages(memory, address, args.length, args.physical, cr3)
    if all(data is None for _, _, data, _ in chunks):
        raise chunks[0][3]
    if args.json:
        _print_json(args, env, memory, address, chunks, cr3)
    else:
        _print_hexdump(env, address, chunks)
    return 0


def _resolve(args, target, cpus):
    """The GuestMemory to read with, the start address (resolving a symbol if given) and the
    page-table root to read with (None: the memory's default)."""
    from vmwatch.cpu import PagingMode
    from vmwatch.cpu_aarch64 import refuse_aarch64
    from vmwatch.errors import UnsupportedOperation
    from vmwatch.memory import GuestMemory

    mode = PagingMode(args.mode) if args.mode else None
    regs = cpus[0] if cpus else None
    try:
        address = int(args.address, 0)
    except ValueError:
        address = None
    if args.pid is not None:
        if args.physical or args.dtb is not None:
            raise UnsupportedOperation("--pid cannot be combined with --physical or --dtb")
        linux = _linux(target, cpus)
        if address is None:
            address = _symbol(linux, args.address)
        return linux.memory, address, linux.memory.pid_dtb.get(args.pid)
    if address is None:
        linux = _linux(target, cpus)
        address = _symbol(linux, args.address)
        if args.dtb is None and not args.physical and mode is None:
            return linux.memory, address, None
    if args.physical:
        return GuestMemory(target.memory), address, None
    refuse_aarch64(cpus, "virtual reads")
    cr3 = args.dtb
    if cr3 is None and (regs is None or regs.cr3 is None):
        raise UnsupportedOperation(f"{args.target} has no saved CPU registers: give the page-table root with --dtb")
    if regs is not None and regs.cr3 is not None and mode is None and cr3 is not None:
        mode = regs.paging_mode
    if mode is None and regs is None:
        mode = PagingMode.LEVEL4
    return GuestMemory(target.memory, cr3=cr3, mode=mode, registers=regs), address, None


def _linux(target, cpus):
    from vmwatch.errors import SymbolError

    try:
        from vmwatch.os.linux import Linux
    except ImportError as exc:
        raise SymbolError(
            f"symbol lookup needs the Linux layer (vmwatch.os.linux), which cannot be imported: {exc}"
        ) from None
    return Linux.from_memory(target.memory, registers=cpus)


def _symbol(linux, name: str) -> int:
    from vmwatch.errors import SymbolError

    try:
        return linux.symbols[name]
    except KeyError:
        raise SymbolError(f"unknown kernel symbol {name!r}", name=name) from None


def _read_pages(memory, address: int, length: int, physical: bool, cr3: int | None):
    """(address, size, bytes or None, error) per page-sized piece; unreadable pieces are None."""
    from vmwatch.errors import PhysicalReadError, TranslationError

    chunks = []
    pos = 0
    while pos < length:
        addr = address + pos
        step = min(length - pos, 0x1000 - (addr & 0xFFF))
        try:
            data = memory.read_phys(addr, step) if physical else memory.read(addr, step, cr3)
            chunks.append((addr, step, data, None))
        except (TranslationError, PhysicalReadError) as exc:
            chunks.append((addr, step, None, exc))
        pos += step
    return chunks


def _print_hexdump(env, address: int, chunks) -> None:
    """16 bytes a line; bytes that cannot be read show as ``??``."""
    cells: list[int | None] = []
    for _, size, data, _ in chunks:
        cells.extend(data if data is not None else [None] * size)
    width = 16 if address + len(cells) > 0xFFFFFFFF else 8
    start = address & ~0xF
    for line in range(start, address + len(cells), 16):
        hexes, text = [], []
        for addr in range(line, line + 16):
            if not address <= addr < address + len(cells):
                hexes.append("  ")
                text.append(" ")
                continue
            value = cells[addr - address]
            if value is None:
                hexes.append("??")
                text.append("?")
            else:
                hexes.append(f"{value:02x}")
                text.append(chr(value) if 0x20 <= value < 0x7F else ".")
        print(f"{line:0{width}x}  {' '.join(hexes[:8])}  {' '.join(hexes[8:])}  |{''.join(text)}|", file=env.stdout)
    for addr, _, data, exc in chunks:
        if data is None:
            print(f"# {addr:#x}: {exc}", file=env.stdout)


def _print_json(args, env, memory, address: int, chunks, cr3: int | None) -> None:
    out = {
        "address": address,
        "physical": bool(args.physical),
        "cr3": None if args.physical else (memory.kernel_cr3 if cr3 is None else cr3),
        "pid": args.pid,
        "mode": memory.mode.value,
        "length": args.length,
        "chunks": [
            {
                "address": addr,
                "size": size,
                "physical_address": None if data is None or args.physical else memory.translate(addr, cr3),
                "hex": None if data is None else data.hex(),
                "error": None if exc is None else str(exc),
            }
            for addr, size, data, exc in chunks
        ],
    }
    print(json.dumps(out), file=env.stdout)
