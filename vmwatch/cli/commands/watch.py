"""``vmwatch watch TARGET --rules PACK...``: run rule packs over a live VM (or an image), alerts live."""

from __future__ import annotations

import argparse
import json

HELP = "watch live VMs (qemu:/path/qmp.sock, several or a glob) or inspect an image with rule packs; alerts as they arrive"


def configure(parser: argparse.ArgumentParser) -> None:
    from vmwatch.cli.timeline_db import add_db_option

    parser.add_argument("target", nargs="*", help="qemu:/path/to/qmp.sock (live) or a memory image file; several, "
                        "or a quoted glob such as 'qemu:/run/vms/*/qmp.sock', watch every guest at once")
    parser.add_argument("--targets", action="append", default=[], metavar="FILE",
                        help="also watch the targets listed in FILE, one per line (# comments)")
    parser.add_argument("--rules", nargs="+", action="extend", default=[], metavar="PACK", required=True,
                        help="rule packs: .py files, folders, or shipped packs (security, timeline)")
    add_db_option(parser)
    parser.add_argument("--json", action="store_true", help="alerts and events as JSON lines on stdout")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    parser.add_argument("--enable", action="append", default=[], metavar="RULE", help="enable a rule (name or glob)")
    parser.add_argument("--disable", action="append", default=[], metavar="RULE", help="disable a rule (name or glob)")
    parser.add_argument("--set", action="append", default=[], metavar="RULE.KEY=VALUE",
                        help="configure a rule; VALUE is JSON (or a plain string)")
    parser.add_argument("--min-severity", default="info", choices=["info", "warning", "error", "critical"],
                        help="lowest severity shown on screen (all go to --db and --json)")
    parser.add_argument("--record", metavar="FILE", help="also record the session for vmwatch replay")
    parser.add_argument("--stealth", action="store_true",
                        help="live QEMU: gdbstub breakpoints only, never inline hooks in guest code "
                             "(invisible to the guest, but every hit costs a TCG guest a translation flush)")
    parser.add_argument("--gdb", metavar="unix:PATH|tcp:HOST:PORT",
                        help="live QEMU: let gdbs look at the watched guest there (registers, memory, "
                             "symbols; the watch keeps running it: no breakpoints or steps)")


def build_ruleset(args: argparse.Namespace):
    """Load packs and apply --enable/--disable/--set (in that order)."""
    from vmwatch.errors import RuleError
    from vmwatch.rules import RuleSet

    ruleset = RuleSet.load(args.rules)
    for pattern in args.enable:
        ruleset.enable(pattern)
    for pattern in args.disable:
        ruleset.disable(pattern)
    for item in args.set:
        name, sep, raw = item.partition("=")
        rule_name, dot, key = name.rpartition(".")
        if not sep or not dot or not key:
            raise RuleError(f"--set wants RULE.KEY=VALUE, not {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        ruleset.configure(rule_name, **{key: value})
    return ruleset


def run(args: argparse.Namespace, env) -> int:
    import trio

    from vmwatch.errors import VmwatchError

    if args.duration is not None and not args.duration > 0:
        raise VmwatchError(f"--duration must be positive, not {args.duration}")
    if args.gdb:
        from vmwatch.gdbserver.listen import check_spec

        check_spec(args.gdb)
    ruleset = build_ruleset(args)
    from vmwatch.cli.fleet_watch import is_fleet, run_fleet

    if is_fleet(args):
        if args.gdb:
            raise VmwatchError("--gdb looks at one guest: give one target")
        return run_fleet(args, env, ruleset)
    return trio.run(_watch, args, env, ruleset)


async def _watch(args: argparse.Namespace, env, ruleset) -> int:
    import contextlib

    import trio

    from vmwatch.cli.alertview import ScreenSink, make_console, print_summary
    from vmwatch.cli.sigint import stop_on_sigint
    from vmwatch.engine.fleet import guest_name
    from vmwatch.engine.pump import Engine
    from vmwatch.cli.timeline_db import db_label, report_db
    from vmwatch.engine.open_sink import open_timeline_sink
    from vmwatch.engine.sinks import JsonLinesSink
    from vmwatch.engine.sources import source_for
    from vmwatch.rules import Severity
    from vmwatch.target import open_target

    console = make_console(env.stdout)
    async with open_timeline_sink(args.db) as db_sink, open_target(args.target[0]) as target:
        if args.stealth and target.live is not None:
            target.live.inline_hooks = False
        with contextlib.ExitStack() as stack:
            source = source_for(target, name=await guest_name(target))
            if args.record:
                from vmwatch.replay.recorder import recording_source

                source = stack.enter_context(recording_source(source, args.record))
            screen = None
            if args.json:
                sinks: list = [JsonLinesSink(env.stdout)]
            else:
                screen = ScreenSink(console, min_severity=Severity.parse(args.min_severity))
                sinks = [screen]
            if db_sink is not None:
                sinks.append(db_sink)
            engine = Engine(source, ruleset, sinks)
            gdb = await _gdb_beside(target, args.gdb, env) if args.gdb else None
            if screen is not None:
                console.print(f"watching {target.spec} with {len(ruleset.active())} rules "
                              f"({', '.join(args.rules)}); Ctrl-C to stop")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_sigint, engine)
                if gdb is not None:
                    nursery.start_soon(gdb)
                summary = await engine.run(duration=args.duration)
                nursery.cancel_scope.cancel()
    if screen is not None:
        print_summary(console, summary, screen.alerts, db=db_label(args.db))
    report_db(db_sink, console if screen is not None else None, env)
    if summary.source_ended and target.live is not None:
        from vmwatch.cli.app import ExitStatus
        from vmwatch.text import shown

        print(f"vmwatch: the guest went away: {shown(summary.end_reason)}", file=env.stderr)
        return ExitStatus.GUEST_GONE
    return 0


async def _gdb_beside(target, spec: str, env):
    """Listen for gdbs on the watched guest; return the task that serves them look-only."""
    import functools

    from vmwatch.debug.session import DebugSession
    from vmwatch.errors import VmwatchError
    from vmwatch.gdbserver.listen import open_listener, serve_each

    if target.live is None:
        raise VmwatchError("--gdb needs a live qemu: target (for an image, use vmwatch gdbserver)")
    listener = await open_listener(spec)
    print(f"vmwatch: gdb can look at this guest: target remote {spec.partition(':')[2]}", file=env.stderr, flush=True)
    session = DebugSession(target, observe=True)
    return functools.partial(serve_each, listener, session, target.live.vcpu_count, survive=True)
