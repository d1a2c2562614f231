"""``vmwatch write TARGET ADDRESS|SYMBOL HEX --write``: change bytes of a live guest's memory.

For tamper tests and for putting things back: it prints the bytes it replaced, so the same command
with them restores the guest. Without ``--write`` nothing is attached for writing and nothing
changes; images are never written (a copy is the way to corrupt a dump).
"""

from __future__ import annotations

import argparse
import json

from vmwatch.cli.commands.read import add_address_arguments, resolve

HELP = "write bytes into a live guest's memory (needs --write; prints the bytes it replaced)"

MAX_LENGTH = 1 << 20


def _hex(text: str) -> bytes:
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex bytes: {text!r}") from None
    if not 0 < len(data) <= MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_LENGTH:#x} bytes, not {len(data):#x}")
    return data


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="qemu:/path/to/qmp.sock (a live guest; images stay read-only)")
    parser.add_argument("address", help="address (0x..., decimal) or kernel symbol name (Linux guests)")
    parser.add_argument("data", type=_hex, metavar="HEX", help="the bytes to write, e.g. 90909090 or '90 90'")
    add_address_arguments(parser)
    parser.add_argument("--write", action="store_true",
                        help="attach with writable memory and write (without it: refuse, change nothing)")
    parser.add_argument("--json", action="store_true", help="print what was replaced as JSON")


def run(args: argparse.Namespace, env) -> int:
    import trio

    return trio.run(_run, args, env)


async def _run(args: argparse.Namespace, env) -> int:
    from vmwatch.errors import UnsupportedOperation
    from vmwatch.target import QEMU_PREFIX, open_target

    if not args.target.startswith(QEMU_PREFIX):
        raise UnsupportedOperation(f"{args.target} is an image: vmwatch write changes live guests only "
                                   "(corrupt a copy of a dump with other tools)")
    if not args.write:
        raise UnsupportedOperation("vmwatch write changes the guest's memory: add --write to mean it")
    async with open_target(args.target, writable=True) as target:
        cpus = tuple(await target.cpu_state())
        memory, address, cr3 = resolve(args, target, cpus)
        # Every page is translated before the first byte is written: all or nothing.
        pieces = list(_pieces(memory, address, len(args.data), args.physical, cr3))
        old = b"".join(target.memory.read(paddr, size) for _, paddr, size in pieces)
        for offset, paddr, size in pieces:
            target.memory.write(paddr, args.data[offset:offset + size])
    if args.json:
        print(json.dumps({"address": address, "physical": bool(args.physical),
                          "physical_addresses": [paddr for _, paddr, _ in pieces],
                          "old": old.hex(), "new": args.data.hex()}), file=env.stdout)
    else:
        where = "" if args.physical else f" (physical {pieces[0][1]:#x})"
        print(f"wrote {len(args.data)} bytes at {address:#x}{where}; they were {old.hex()}", file=env.stdout)
    return 0


def _pieces(memory, address: int, length: int, physical: bool, cr3: int | None):
    """``(offset into the data, physical address, size)`` per page the write touches."""
    pos = 0
    while pos < length:
        step = min(length - pos, 0x1000 - ((address + pos) & 0xFFF))
        yield pos, address + pos if physical else memory.translate(address + pos, cr3), step
        pos += step
