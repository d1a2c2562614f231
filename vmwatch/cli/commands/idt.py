"""``vmwatch idt TARGET``: the interrupt descriptor table of a Linux guest, resolved to symbols."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, hexa, text, with_linux

HELP = "show a Linux guest's interrupt descriptor table (IDT) with handler symbols"

COLUMNS = (("vector", "VEC", lambda v: f"{v:#04x}"), ("present", "P", lambda v: "1" if v else "0"),
           ("dpl", "DPL", text), ("address", "HANDLER", hexa), ("symbol", "SYMBOL", text))


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--cpu", type=int, default=0, help="vCPU whose IDTR to follow (default 0)")
    parser.add_argument("--all", action="store_true", help="include not-present gates")


def run(args: argparse.Namespace, env) -> int:
    def work(linux, registers):
        regs = registers[args.cpu] if args.cpu < len(registers) else None
        return linux.idt(regs)

    entries = with_linux(args, work)
    rows = [e.as_dict() for e in entries if args.all or e.present]
    return emit(env, args, rows, COLUMNS)
