"""One live watch of the lab guest (shipped timeline pack, --db and --record), then everything after
it: replay with identical output, timeline queries checked against the guest's own record of what
it ran, and a trend chart of that database."""

from __future__ import annotations

import json

import pytest

from vmwatch.replay import Recording
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

# Each /bin/true runs in the background so the shell learns its pid ($!) and writes it down.
SCENARIO = ("sh -c 'rm -f /tmp/true.pids; for i in $(seq 1 300); do /bin/true & echo $! >> /tmp/true.pids;"
            " wait; sleep 0.05; done' >/dev/null 2>&1 & echo $!")


@pytest.fixture(scope="module")
def watched(lab_guest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("livewatch")
    db, record = tmp / "timeline.db", tmp / "live.vmwr"
    loop = int(lab_guest.shell(SCENARIO).split()[-1])
    try:
        live = run_cli("watch", lab_guest.target, "--rules", "timeline", "--json", "--duration", "8",
                       "--db", db, "--record", record)
    finally:
        lab_guest.shell(f"kill {loop}")
    assert live.status == 0, live.stderr
    pids = {int(p) for p in lab_guest.shell("cat /tmp/true.pids").split() if p.isdigit()}
    return live.stdout, db, record, pids, tmp


def test_replay_prints_the_same_lines(watched):
    """`vmwatch replay` with the same pack prints exactly what the live watch printed."""
    live_out, _, record, _, _ = watched
    alerts = [line for line in live_out.splitlines() if '"event": "alert"' in line]
    assert len(alerts) >= 3
    with Recording.open(record) as recording:
        assert "breakpoints" in recording.meta["capabilities"]
        assert len(recording.events) >= 3
    replay = run_cli("replay", record, "--rules", "timeline", "--json")
    assert replay.status == 0, replay.stderr
    assert replay.stdout == live_out


def test_timeline_matches_what_the_guest_ran(watched):
    """Exec events of /bin/true in the database are processes the guest itself recorded starting."""
    _, db, _, pids, _ = watched
    result = run_cli("timeline", db, "--kind", "Exec", "--json")
    assert result.status == 0, result.stderr
    execs = [json.loads(line) for line in result.stdout.splitlines()]
    trues = [e for e in execs if e["details"].get("filename") == "/bin/true"]
    assert trues, "the watch must see at least one of the /bin/true runs"
    assert {e["pid"] for e in trues} <= pids
    one = trues[0]["pid"]
    rows = [json.loads(line) for line in run_cli("timeline", db, "--pid", str(one), "--json").stdout.splitlines()]
    assert {r["pid"] for r in rows} == {one}
    assert {"Exec", "alert"} <= {r["kind"] for r in rows}
    times = sorted(r["time_ns"] for r in rows)
    bounded = run_cli("timeline", db, "--since", str(times[0] + 1), "--pid", str(one), "--json").stdout
    assert len(bounded.splitlines()) == sum(t > times[0] for t in times)


def test_trend_chart_of_the_live_database(watched):
    """The trend PNG of the live database decodes, has the asked size, and is not blank."""
    from PIL import Image

    _, db, _, _, tmp = watched
    out = tmp / "trend.png"
    result = run_cli("trend", db, "--bucket", "1s", "-o", out, "--size", "900x500")
    assert result.status == 0, result.stderr
    assert "Exec" in result.stdout and "alert:info" in result.stdout
    with Image.open(out) as image:
        assert image.size == (900, 500)
        colours = image.convert("RGB").getcolors(1 << 16)
        assert colours is not None and len(colours) > 20


CLOCK_PACK = """
from vmwatch.rules import rule

@rule.every(0.5)
def uptime(event, guest):
    # jiffies moves while the guest runs: only the value read at that very tick matches live
    guest.alert("info", "jiffies", pid=0, jiffies=guest.linux.memory.u64_symbol("jiffies_64"),
                rip=hex(guest.cpus[0].rip))
"""


def test_periodic_rules_replay_at_the_recorded_ticks(lab_guest, tmp_path):
    """The shipped security pack (periodic hash checks) and a periodic rule reading jiffies, recorded
    live: the replay runs them at the recorded ticks and prints the same lines."""
    from vmwatch.events import Tick

    pack = tmp_path / "clock.py"
    pack.write_text(CLOCK_PACK)
    record = tmp_path / "periodic.vmwr"
    live = run_cli("watch", lab_guest.target, "--rules", "security", pack, "--json", "--duration", "8",
                   "--record", record)
    assert live.status == 0, live.stderr
    jiffies = [json.loads(line)["details"]["jiffies"] for line in live.stdout.splitlines() if "jiffies" in line]
    assert len(set(jiffies)) >= 4 and jiffies == sorted(jiffies)  # the guest ran between the ticks
    with Recording.open(record) as recording:
        ticks = [e for e in recording.events if type(e) is Tick and e.periodic]
    assert {"security.syscall_table", "security.idt", "clock.uptime"} <= {n for t in ticks for n, _ in t.periodic}
    replay = run_cli("replay", record, "--rules", "security", pack, "--json")
    assert replay.status == 0, replay.stderr
    assert replay.stdout == live.stdout


HOT_PACK = """
from vmwatch.events import Demotion
from vmwatch.rules import rule

@rule.on_breakpoint("run_timer_softirq")
def timers(event, guest):
    guest.alert("info", "timer softirq", pid=0, jiffies=guest.linux.memory.u64_symbol("jiffies_64"))

@rule.on(Demotion)
def demoted(event, guest):
    guest.alert("warning", "demoted", pid=0, trap=event.trap, action=event.action, hits=event.hits)
"""


def test_demotions_replay_identically(lab_guest, tmp_path):
    """A trap over a tiny budget on the live guest is unhooked (and re-armed, and unhooked again):
    the replay reports the same demotions at the same events and prints the same lines."""
    import io

    import trio

    from vmwatch.engine.governance import Budget
    from vmwatch.engine.pump import WatchOptions, watch
    from vmwatch.engine.sinks import JsonLinesSink
    from vmwatch.engine.sources import source_for
    from vmwatch.replay import recording_source
    from vmwatch.rules import RuleSet
    from vmwatch.target import open_target

    pack, record, out = tmp_path / "hot.py", tmp_path / "hot.vmwr", io.StringIO()
    pack.write_text(HOT_PACK)

    async def session():
        async with open_target(lab_guest.target) as target:
            with recording_source(source_for(target), record) as source:
                return await watch(source, RuleSet.load([pack]), [JsonLinesSink(out)], duration=4,
                                   options=WatchOptions(budget=Budget(max_hits=2, cooldown=0.5)))

    summary = trio.run(session)
    live = out.getvalue()
    assert summary.demotions, summary  # the timer softirq runs a few times a second even on a loaded host
    assert live.count('"message": "demoted"') == len(summary.demotions) and live.count("timer softirq") >= 3
    replay = run_cli("replay", record, "--rules", pack, "--json")
    assert replay.status == 0, replay.stderr
    assert replay.stdout == live
