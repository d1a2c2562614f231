"""``vmwatch replay FILE --rules PACK...``: run rules over a recording, no hypervisor needed."""

from __future__ import annotations

import argparse
import time

HELP = "run rules over a recorded session (watch --record) with no hypervisor"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", help="recording file written by watch --record")
    parser.add_argument("--rules", nargs="+", action="extend", default=[], metavar="PACK",
                        help="rule packs: paths or shipped pack names")
    parser.add_argument("--json", action="store_true", help="alerts and events as JSON lines, exactly as watch --json prints them")
    parser.add_argument("--info", action="store_true",
                        help="describe the recording (source, events by kind, pages) instead of replaying it")
    parser.add_argument("--db", metavar="PATH", help="also write events and alerts to this SQLite timeline")
    exact = parser.add_mutually_exclusive_group()
    exact.add_argument("--base", metavar="IMAGE",
                        help="memory image of the guest from before the recording: serves pages it never saw")
    exact.add_argument("--strict", action="store_true",
                        help="serve only pages recorded for the very event being replayed")


def run(args: argparse.Namespace, env) -> int:
    import trio

    from vmwatch.engine.pump import watch
    from vmwatch.engine.sinks import JsonLinesSink, SqliteSink
    from vmwatch.errors import RuleError
    from vmwatch.replay.player import open_replay
    from vmwatch.rules import RuleSet

    if args.info:
        return _info(args, env)
    if not args.rules:
        raise RuleError("replay needs --rules PACK... (the rules to run over the recording)")
    with open_replay(args.recording, strict=args.strict, base=args.base) as source:
        ruleset = RuleSet.load(args.rules)
        sinks: list = [JsonLinesSink(env.stdout) if args.json else _TextAlerts(env.stdout)]
        if args.db:
            sinks.append(SqliteSink(args.db))
        # the overhead governor replays the live verdicts (ReplaySource.governed): no budget here
        started = time.perf_counter()
        summary = trio.run(lambda: watch(source, ruleset, sinks))
        seconds = time.perf_counter() - started
        failure = source.first_failure()
        if failure is not None:
            raise failure
        rate = summary.events / seconds if seconds > 0 else 0.0
        env.stderr.write(f"replayed {summary.events} events in {seconds:.2f} s ({rate:,.0f} events/s), "
                         f"{summary.total_alerts} alerts\n")
    return 0


def _info(args: argparse.Namespace, env) -> int:
    import collections
    import json
    import os

    from vmwatch.replay.recording import Recording
    from vmwatch.timeline.timespec import format_time

    with Recording.open(args.recording) as recording:
        meta, end = recording.meta, recording.end or {}
        kinds = collections.Counter(type(e).__name__ for e in recording.events)
        facts = {
            "source": meta.get("source"), "recorded": format_time(int(meta.get("created_unix_ns") or 0)),
            "vmwatch": meta.get("vmwatch_version"), "capabilities": meta.get("capabilities"),
            "events": len(recording.events), "events_by_kind": dict(kinds.most_common()),
            "pages_stored": recording.page_count, "page_reads": end.get("page_reads"),
            "governor_verdicts": dict(collections.Counter(v[0] for v in recording.verdicts.values())),
            "bytes": os.path.getsize(args.recording), "base": meta.get("base"),
        }
    if args.json:
        env.stdout.write(json.dumps(facts) + "\n")
    else:
        from vmwatch.text import shown

        for key, value in facts.items():  # the recording's own strings (source, base) escaped
            env.stdout.write(f"{key:<15} {shown(str(value))}\n")
    return 0


class _TextAlerts:
    """Alerts as readable lines: time, severity, rule, pid/comm, message."""

    name = "text"

    def __init__(self, stream) -> None:
        self._stream = stream

    async def send(self, item) -> None:
        from vmwatch.engine.alerts import Alert
        from vmwatch.text import shown
        from vmwatch.timeline.timespec import format_time

        if isinstance(item, Alert):
            who = f" pid {item.pid}" if item.pid is not None else ""
            who += f" ({shown(item.comm)})" if item.comm else ""
            self._stream.write(f"{format_time(item.time_ns)} {item.severity.name.lower():<8} {shown(item.rule)}{who}: "
                               f"{shown(item.message)}\n")

    async def aclose(self) -> None:
        self._stream.flush()
