"""Shared plumbing of the OS commands: open a target, find the kernel (Linux or Windows), print rows."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Callable, Sequence

from vmwatch.text import shown

MAX_WARNINGS = 10


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="memory image path, or qemu:/path/to/qmp.sock")
    parser.add_argument("--symbols", metavar="FILE",
                        help="System.map, vmlinux (BTF or DWARF), Volatility 3 ISF JSON (.json/.json.xz) "
                             "or libvmi.conf, for kernels without BTF or Windows builds without built-in offsets")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def with_linux(args: argparse.Namespace, work: Callable, *, pause: bool = True) -> object:
    """Run ``work(kernel, registers)`` on the target (a ``Linux`` or ``Windows``, detected); a live
    guest is paused while it runs (unless not ``pause``)."""
    from vmwatch.target import QEMU_PREFIX

    if not args.target.startswith(QEMU_PREFIX):
        # An image needs no event loop: skip importing trio (a cold start is what ps is timed on).
        from vmwatch.images import open_image
        from vmwatch.os import detect

        with open_image(args.target) as image:
            registers = tuple(image.cpus)
            return work(detect.from_memory(image, registers, symbols_file=args.symbols), registers)
    import trio

    from vmwatch.os import detect
    from vmwatch.target import open_target

    async def main():
        async with open_target(args.target) as target:
            live = target.live
            paused_here = False
            if pause and live is not None and await live.status() == "running":
                await live.pause()  # a walk of a running guest's lists races the guest
                paused_here = True
            try:
                registers = await target.cpu_state()
                linux = detect.from_memory(target.memory, registers, symbols_file=args.symbols)
                return work(linux, registers)
            finally:
                if paused_here:
                    await live.resume()

    return trio.run(main)


def emit(env, args: argparse.Namespace, rows: Sequence[dict], columns: Sequence[tuple[str, str, Callable]],
         skipped: Sequence[str] = ()) -> int:
    """Print rows as JSON or as an aligned table; report skipped guest data on stderr (the first
    ``MAX_WARNINGS`` problems, then how many more: a list spliced into garbage has thousands)."""
    for line in skipped[:MAX_WARNINGS]:
        print(f"vmwatch: warning: {shown(line, backslash=False)}", file=env.stderr)
    if len(skipped) > MAX_WARNINGS:
        print(f"vmwatch: warning: and {len(skipped) - MAX_WARNINGS} more problems of the guest's data", file=env.stderr)
    if args.json:
        json.dump(list(rows), env.stdout, indent=1)
        env.stdout.write("\n")
        return 0
    table = [[title for _, title, _ in columns]]
    for row in rows:
        table.append([fmt(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        env.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() + "\n")
    return 0


def hexa(value) -> str:
    return "-" if value is None else f"{value:#x}"


def text(value) -> str:
    """A cell: guest strings (comm, module and symbol names) escaped, so a row stays one row."""
    return "-" if value is None else shown(str(value))


def path(value) -> str:
    """A Windows path cell: controls escaped, its backslashes left as the separators they are."""
    return "-" if value is None else shown(str(value), backslash=False)


def is_windows(kernel) -> bool:
    return getattr(kernel, "os_name", None) == "windows"


def filetime(value) -> str:
    """A Windows FILETIME (100 ns since 1601) as UTC ISO time; the raw number if absurd."""
    if value is None:
        return "-"
    try:
        when = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=value // 10)
    except OverflowError:
        return str(value)
    return when.strftime("%Y-%m-%d %H:%M:%S")
