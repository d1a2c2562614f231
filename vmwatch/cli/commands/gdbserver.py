"""``vmwatch gdbserver TARGET --stdio | --listen unix:PATH|tcp:HOST:PORT``: gdb as a client.

``gdb -ex 'target remote | vmwatch gdbserver --stdio dump.elf'`` reads a dump (read-only);
on a live ``qemu:`` guest gdb can also continue, step, break and watch, vmwatch staying the one
owner of QEMU's gdbstub. With ``--listen`` gdbs are served one after another until Ctrl-C.
"""

from __future__ import annotations

import argparse

HELP = "serve the gdb remote protocol over vmwatch's view of a guest (registers, virtual memory, control)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="memory image path, or qemu:/path/to/qmp.sock")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stdio", action="store_true",
                       help="talk on stdin/stdout (gdb: target remote | vmwatch gdbserver --stdio TARGET)")
    where.add_argument("--listen", metavar="unix:PATH|tcp:HOST:PORT",
                       help="accept gdb connections there (gdb: target remote PATH or HOST:PORT)")


def run(args: argparse.Namespace, env) -> int:
    import trio

    from vmwatch.gdbserver.listen import check_spec

    if args.listen:
        check_spec(args.listen)
    trio.run(_main, args, env)
    return 0


async def _main(args: argparse.Namespace, env) -> None:
    import os

    import trio

    from vmwatch.debug.session import DebugSession
    from vmwatch.gdbserver.listen import open_listener, serve_each
    from vmwatch.gdbserver.serve import serve
    from vmwatch.target import open_target

    async with open_target(args.target) as target:
        vcpus = len(await target.cpu_state()) if target.live is None else target.live.vcpu_count
        session = DebugSession(target)
        if args.stdio:
            stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
            await session.attach()
            async with stream:
                await serve(stream, session, vcpus)
            return
        listener = await open_listener(args.listen)
        print(f"vmwatch gdbserver: listening on {args.listen} (gdb: target remote "
              f"{args.listen.partition(':')[2]})", file=env.stderr, flush=True)
        await serve_each(listener, session, vcpus)
