"""``vmwatch modules TARGET``: loaded kernel modules of a Linux guest."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, hexa, is_windows, path, text, with_linux

HELP = "list the loaded kernel modules (Linux) or drivers (Windows) of a guest"

COLUMNS = (("name", "NAME", text), ("base", "BASE", hexa), ("size", "SIZE", text))
WINDOWS_COLUMNS = COLUMNS + (("path", "PATH", path),)


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def run(args: argparse.Namespace, env) -> int:
    modules, windows = with_linux(args, lambda kernel, _regs: (kernel.modules(), is_windows(kernel)))
    return emit(env, args, [m.as_dict() for m in modules], WINDOWS_COLUMNS if windows else COLUMNS, modules.skipped)
