"""``vmwatch syscalls TARGET``: the system call table, each entry resolved to a symbol."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, hexa, text, with_linux

HELP = "show a Linux guest's system call table; flag entries outside kernel text"

COLUMNS = (("index", "NR", text), ("address", "ADDRESS", hexa), ("in_text", "TEXT", lambda v: "yes" if v else "NO"),
           ("symbol", "SYMBOL", text))


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--suspicious", action="store_true", help="only entries outside kernel text")


def run(args: argparse.Namespace, env) -> int:
    entries = with_linux(args, lambda linux, _regs: linux.syscalls())
    rows = [e.as_dict() for e in entries if not args.suspicious or not e.in_text]
    return emit(env, args, rows, COLUMNS)
