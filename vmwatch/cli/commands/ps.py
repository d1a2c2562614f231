"""``vmwatch ps TARGET``: processes of a Linux guest, from the kernel's own task list."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, filetime, hexa, is_windows, text, with_linux

HELP = "list the processes of a Linux or Windows guest (image or live QEMU), zero configuration"

COLUMNS = (("pid", "PID", text), ("ppid", "PPID", text), ("uid", "UID", text), ("state", "S", text),
           ("threads", "THR", lambda t: str(len(t) + 1)), ("cr3", "CR3", hexa), ("name", "COMM", text))
WINDOWS_COLUMNS = (("pid", "PID", text), ("ppid", "PPID", text), ("dtb", "DTB", hexa),
                   ("create_time", "CREATED (UTC)", filetime), ("peb", "PEB", hexa), ("name", "NAME", text))


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def run(args: argparse.Namespace, env) -> int:
    tasks, windows = with_linux(args, lambda kernel, _regs: (kernel.tasks(), is_windows(kernel)))
    rows = [t.as_dict() for t in tasks]
    return emit(env, args, rows, WINDOWS_COLUMNS if windows else COLUMNS, tasks.skipped)
