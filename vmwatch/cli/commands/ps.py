"""``vmwatch ps TARGET``: processes of a Linux guest, from the kernel's own task list."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import add_target_arguments, emit, hexa, text, with_linux

HELP = "list the processes of a Linux guest (image or live QEMU), zero configuration"

COLUMNS = (("pid", "PID", text), ("ppid", "PPID", text), ("uid", "UID", text), ("state", "S", text),
           ("threads", "THR", lambda t: str(len(t) + 1)), ("cr3", "CR3", hexa), ("name", "COMM", text))


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def run(args: argparse.Namespace, env) -> int:
    tasks = with_linux(args, lambda linux, _regs: linux.tasks())
    rows = [t.as_dict() for t in tasks]
    return emit(env, args, rows, COLUMNS, tasks.skipped)
