"""``vmwatch watch A B...`` / ``--targets FILE`` / a socket glob: every guest at once, one line each at the end."""

from __future__ import annotations

import argparse


def is_fleet(args: argparse.Namespace) -> bool:
    """More than one target, a target list file, or a socket glob (which may match any number)."""
    from vmwatch.target_list import is_glob

    return bool(args.targets) or len(args.target) != 1 or is_glob(args.target[0])


def run_fleet(args: argparse.Namespace, env, ruleset) -> int:
    """Expand the target list (exit 2 if it is bad), watch every guest, print one line per guest.

    Exit status: 0 when every watch ended normally, 3 when any guest went away or could not be
    watched, 2 when none could be attached (the list names no reachable guest).
    """
    import trio

    from vmwatch.errors import TargetListError
    from vmwatch.target_list import expand_targets

    if args.record:
        raise TargetListError("--record records one guest: name a single target")
    specs = expand_targets(args.target, files=args.targets)
    return trio.run(_watch_fleet, args, env, ruleset, specs)


async def _watch_fleet(args: argparse.Namespace, env, ruleset, specs: list[str]) -> int:
    import trio

    from vmwatch.cli.alertview import ScreenSink, make_console
    from vmwatch.cli.app import ExitStatus
    from vmwatch.cli.sigint import stop_on_sigint
    from vmwatch.engine.fleet import Fleet
    from vmwatch.cli.timeline_db import db_label, report_db
    from vmwatch.engine.open_sink import open_timeline_sink
    from vmwatch.engine.sinks import JsonLinesSink
    from vmwatch.rules import Severity
    from vmwatch.text import shown

    console = make_console(env.stdout)
    screen = None
    if args.json:
        sinks: list = [JsonLinesSink(env.stdout)]
    else:
        screen = ScreenSink(console, min_severity=Severity.parse(args.min_severity), show_vm=True)
        sinks = [screen]
    async with open_timeline_sink(args.db) as db_sink:
        if db_sink is not None:
            sinks.append(db_sink)
        fleet = Fleet(specs, ruleset, sinks, stealth=args.stealth)
        if screen is not None:
            console.print(f"watching {len(specs)} guests with {len(ruleset.active())} rules "
                          f"({', '.join(args.rules)}); Ctrl-C to stop")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_sigint, fleet)
            runs = await fleet.run(duration=args.duration)
            nursery.cancel_scope.cancel()
    if screen is not None:
        from vmwatch.cli.fleetview import print_fleet_summary

        print_fleet_summary(console, runs, screen.alerts, db=db_label(args.db))
    report_db(db_sink, console if screen is not None else None, env)
    gone = [run for run in runs if run.gone]
    for run in gone:
        print(f"vmwatch: guest {shown(run.vm)} ({shown(run.spec)}) went away: {shown(run.end_reason)}",
              file=env.stderr)
    if not any(run.attached for run in runs):
        return ExitStatus.BAD_INPUT
    return ExitStatus.GUEST_GONE if gone else 0
