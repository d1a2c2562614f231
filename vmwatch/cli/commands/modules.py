"""``vmwatch modules TARGET``: loaded kernel modules of a Linux guest."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, hexa, text, with_linux

HELP = "list the loaded kernel modules of a Linux guest"

COLUMNS = (("name", "NAME", text), ("base", "BASE", hexa), ("size", "SIZE", text))


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def run(args: argparse.Namespace, env) -> int:
    modules = with_linux(args, lambda linux, _regs: linux.modules())
    return emit(env, args, [m.as_dict() for m in modules], COLUMNS, modules.skipped)
