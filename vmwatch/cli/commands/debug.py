"""``vmwatch debug TARGET``: step, break, watch, examine a live guest (or an image, read-only)."""

from __future__ import annotations

import argparse

HELP = "interactive or scripted debugger: break, step, examine, disassemble, backtrace"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="qemu:/path/qmp.sock for a live guest, or a memory image (read-only)")
    parser.add_argument("--break", dest="breaks", action="append", default=[], metavar="SYMBOL|ADDRESS",
                        help="set a breakpoint before the first command; repeatable")
    parser.add_argument("--script", metavar="FILE", help="run commands from FILE ('-' for stdin) instead of a prompt")
    parser.add_argument("--vcpu", type=int, default=0, help="the vCPU to start on (default 0)")


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.debug.shell import DebugShell
    from vmwatch.debug.sync import Debugger

    with Debugger.open(args.target) as debugger:
        debugger.select_vcpu(args.vcpu)
        shell = DebugShell(debugger, env.stdout, env.stderr, stdin=env.stdin)
        for where in args.breaks:
            shell.onecmd(f"break {where}")
        if args.script and args.script != "-":
            with open(args.script, encoding="utf-8") as script:
                shell.run_script(script)
        elif args.script == "-" or not getattr(env.stdin, "isatty", lambda: False)():
            shell.run_script(env.stdin)
        else:
            shell.interact()
    return 1 if shell.errors else 0
