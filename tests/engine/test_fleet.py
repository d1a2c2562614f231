"""A fleet watch: several targets in one ``vmwatch watch``, each guest's alerts tagged with it,
a guest gone ending its own watch only. Target lists and images here; two live lab guests below."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vmwatch.errors import TargetListError
from vmwatch.target_list import expand_targets, is_glob
from vmwatch.testing.cli import run_cli
from vmwatch.testing.fakeguest import FakeGuest

ROOT = Path(__file__).resolve().parents[2]


class TestTargetList:
    def _sockets(self, tmp_path, names):
        paths = []
        for name in names:
            (tmp_path / name).mkdir()
            path = tmp_path / name / "qmp.sock"
            path.write_text("")  # the list only expands names; attaching checks what they are
            paths.append(path)
        return paths

    def test_glob_sorted_and_plain_specs_kept(self, tmp_path):
        b, a = self._sockets(tmp_path, ["vm-b", "vm-a"])
        assert is_glob(f"qemu:{tmp_path}/*/qmp.sock") and not is_glob(f"qemu:{a}")
        assert expand_targets([f"qemu:{tmp_path}/*/qmp.sock", "mem.raw"]) == [f"qemu:{a}", f"qemu:{b}", "mem.raw"]

    def test_existing_path_with_glob_characters_is_literal(self, tmp_path):
        odd, = self._sockets(tmp_path, ["vm[1]"])
        assert not is_glob(f"qemu:{odd}") and expand_targets([f"qemu:{odd}"]) == [f"qemu:{odd}"]

    def test_file_with_comments_and_duplicates(self, tmp_path):
        """One target per line; blank lines and # comments skipped; the same guest named twice
        (a path, a glob, a ./relative spelling) is watched once, where first named."""
        a, b = self._sockets(tmp_path, ["a", "b"])
        listing = tmp_path / "targets.txt"
        listing.write_text(f"# fleet\n\nqemu:{b}\n  qemu:{a}  \nqemu:{tmp_path}/a/../a/qmp.sock\n")
        got = expand_targets([f"qemu:{tmp_path}/*/qmp.sock"], files=[str(listing)])
        assert got == [f"qemu:{a}", f"qemu:{b}"]
        assert expand_targets([], files=[str(listing)]) == [f"qemu:{b}", f"qemu:{a}"]

    @pytest.mark.parametrize("case", ["missing file", "directory", "binary file", "empty glob", "empty file",
                                      "nothing"])
    def test_bad_lists(self, tmp_path, case):
        binary = tmp_path / "bin.txt"
        binary.write_bytes(b"qemu:/x\xff\xfe\n")
        empty = tmp_path / "empty.txt"
        empty.write_text("# nobody\n\n")
        specs, files = {
            "missing file": ([], [str(tmp_path / "none.txt")]),
            "directory": ([], [str(tmp_path)]),
            "binary file": ([], [str(binary)]),
            "empty glob": ([f"qemu:{tmp_path}/*/qmp.sock"], []),
            "empty file": ([], [str(empty)]),
            "nothing": ([], []),
        }[case]
        with pytest.raises(TargetListError) as info:
            expand_targets(specs, files=files)
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize("args", [
        ["--targets", "/nonexistent/targets.txt"],
        ["qemu:/nonexistent/*/qmp.sock"],
        [],
        ["qemu:/nonexistent/a.sock", "qemu:/nonexistent/b.sock"],  # no guest reachable at all
        ["qemu:/nonexistent/a.sock", "qemu:/nonexistent/b.sock", "--record", "/tmp/never.rec"],
    ], ids=["missing-file", "empty-glob", "no-target", "none-reachable", "record-many"])
    def test_cli_bad_list_exit_2(self, args, tmp_path):
        result = run_cli("watch", *args, "--rules", "timeline", "--duration", "5", "--json")
        assert result.status == 2, result
        errors = [line for line in result.stderr.splitlines() if line.startswith("vmwatch:")]
        assert errors and "Traceback" not in result.stderr


PACK = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.on_start
    def magic(event, guest):
        if guest.phys.read(0x2000, 4) == b"EVIL":
            guest.alert("critical", "EVIL at 0x2000")
''')


def _image(path, evil):
    fake = FakeGuest(seed=1, memory_size=1 << 20)
    if evil:
        fake.buffer[0x2000:0x2004] = b"EVIL"
    path.write_bytes(bytes(fake.buffer))
    return path


class TestImageFleet:
    def test_alert_tagged_with_its_image_and_host(self, tmp_path):
        evil, clean = _image(tmp_path / "evil.raw", True), _image(tmp_path / "clean.raw", False)
        pack = tmp_path / "mine.py"
        pack.write_text(PACK)
        db = tmp_path / "t.db"
        result = run_cli("watch", evil, clean, "--rules", pack, "--json", "--db", db)
        assert result.status == 0, result.stderr
        alerts = [x for x in map(json.loads, result.stdout.splitlines()) if x["event"] == "alert"]
        assert [(a["vm"], a["host"], a["message"]) for a in alerts] == [(str(evil), socket.gethostname(),
                                                                        "EVIL at 0x2000")]
        rows = sqlite3.connect(db).execute("SELECT vm, host, kind FROM events ORDER BY vm").fetchall()
        assert rows == [(str(clean), socket.gethostname(), "SourceEnded"),
                        (str(evil), socket.gethostname(), "SourceEnded")]
        only = run_cli("timeline", db, "--vm", str(clean), "--json")
        assert [json.loads(line)["vm"] for line in only.stdout.splitlines()] == [str(clean)]

    def test_rule_raising_in_one_guest_is_reported_for_it(self, tmp_path):
        """A rule that raises on one guest's data is that guest's engine alert; the rule still
        runs (and alerts) on the other."""
        evil, odd = _image(tmp_path / "evil.raw", True), _image(tmp_path / "odd.raw", False)
        pack = tmp_path / "mine.py"
        pack.write_text(PACK + textwrap.dedent('''
            @rule.on_start
            def picky(event, guest):
                if guest.phys.read(0x2000, 4) != b"EVIL":
                    raise ValueError("unexpected guest data")
                guest.alert("info", "fine")
        '''))
        result = run_cli("watch", evil, odd, "--rules", pack, "--json")
        assert result.status == 0, result.stderr
        alerts = [(a["vm"], a["rule"], a["message"]) for a in map(json.loads, result.stdout.splitlines())
                  if a["event"] == "alert"]
        assert sorted(alerts) == sorted([
            (str(evil), "mine.magic", "EVIL at 0x2000"), (str(evil), "mine.picky", "fine"),
            (str(odd), "engine", "rule mine.picky raised ValueError: unexpected guest data")])

    def test_unreadable_target_ends_its_watch_only(self, tmp_path):
        """A target that is not an image (hostile file) cannot be attached: exit 3, one line for it,
        the other's alert still raised, the summary one line per guest."""
        evil = _image(tmp_path / "evil.raw", True)
        junk = tmp_path / "junk.raw"
        junk.write_bytes(b"\x7fELF" + b"\xff" * 60)
        pack = tmp_path / "mine.py"
        pack.write_text(PACK)
        result = run_cli("watch", junk, evil, "--rules", pack)
        assert result.status == 3, result
        assert "fleet summary: 2 guests, 1 went away" in result.stdout
        lines = result.stdout.splitlines()
        assert any(line.startswith(f"{junk}: not watched; ended: cannot attach") for line in lines)
        assert any(line.startswith(f"{evil}: ") and "1 critical" in line for line in lines)
        gone = [line for line in result.stderr.splitlines() if line.startswith("vmwatch: guest")]
        assert len(gone) == 1 and str(junk) in gone[0]


async def test_a_guest_whose_watch_crashes_ends_alone(tmp_path, monkeypatch):
    """An unforeseen error inside one guest's engine (a bug, guest data nobody foresaw) ends that
    guest's watch with a SourceEnded record and an alert naming it; the other is watched to its end."""
    from vmwatch.engine import ListSink, fleet
    from vmwatch.rules import RuleSet

    evil, bad = _image(tmp_path / "evil.raw", True), _image(tmp_path / "bad.raw", True)
    pack = tmp_path / "mine.py"
    pack.write_text(PACK)

    class Fragile(fleet.Engine):
        async def _setup(self):
            if self.vm == str(bad):
                raise RuntimeError("boom")
            await super()._setup()

    monkeypatch.setattr(fleet, "Engine", Fragile)
    sink = ListSink()
    runs = await fleet.Fleet([str(evil), str(bad)], RuleSet.load([str(pack)]), [sink]).run()
    assert [(r.vm, r.gone) for r in runs] == [(str(evil), False), (str(bad), True)]
    assert runs[1].failure == "watch failed: internal error RuntimeError: boom"
    assert [(a.vm, a.rule) for a in sink.alerts] == [(str(evil), "mine.magic"), (str(bad), "engine")]
    assert "went away: watch failed: internal error RuntimeError: boom" in sink.alerts[1].message
    assert sorted((r.vm, r.kind) for r in sink.events) == [(str(bad), "SourceEnded"), (str(evil), "SourceEnded")]
    assert sink.closed


@pytest.mark.parametrize("reply", [{"name": "web-1"}, {}, {"name": 5}, {"name": ""}, ["web-1"], "error", "hang"])
async def test_guest_name_from_qmp(reply, autojump_clock):
    """query-name's answer when it is a name; None for no name, a wrong type, an error or silence."""
    import trio

    from vmwatch.engine.fleet import guest_name
    from vmwatch.errors import LinkError

    class Qmp:
        async def execute(self, command):
            assert command == "query-name"
            if reply == "error":
                raise LinkError("QMP closed")
            if reply == "hang":
                await trio.sleep_forever()
            return reply

    class Live:
        qmp = Qmp()

    class Target:
        live = Live()

    assert await guest_name(Target()) == ("web-1" if reply == {"name": "web-1"} else None)


async def test_overhead_governance_is_per_guest():
    """Engines side by side, as a fleet runs them, with one shared sink: a trap hot in one guest
    is demoted there only; the same trap in a calm guest keeps every hit."""
    import trio

    from vmwatch.engine import Budget, Engine, ListSink, SyntheticSource, WatchOptions
    from vmwatch.engine.fleet import SharedSink
    from vmwatch.events import Breakpoint
    from vmwatch.rules import RuleSet, rule, rules_of

    hits: dict[str, int] = {"hot": 0, "calm": 0}

    @rule.on_breakpoint(0x1000)
    def count(event, guest):
        hits[guest.vm] += 1

    ruleset = RuleSet(rules_of({"count": count, "__name__": __name__}, "fleet"))
    sink = ListSink()
    options = WatchOptions(budget=Budget(max_hits=1000, window=3600))
    engines = {vm: Engine(SyntheticSource([Breakpoint(seq=i, address=0x1000) for i in range(n)], name=vm,
                                          honour_traps=False), ruleset, [SharedSink(sink)], options=options)
               for vm, n in (("hot", 50_000), ("calm", 900))}
    async with trio.open_nursery() as nursery:
        for engine in engines.values():
            nursery.start_soon(engine.run)
    hot, calm = engines["hot"].summary, engines["calm"].summary
    assert hot.demotions and hot.sampled_out > 0 and hits["hot"] + hot.sampled_out == 50_000
    assert not calm.demotions and calm.sampled_out == 0 and hits["calm"] == 900
    assert {r.vm for r in sink.events if r.kind == "Demotion"} == {"hot"}
    assert not sink.closed  # a shared sink is the fleet's to close


# -- two live lab guests ------------------------------------------------------------------------

NAMES = ("fleet-a", "fleet-b")


@pytest.fixture(scope="module")
def two_guests():
    """Two lab guests, each its own runtime dir and QMP name, booted once for this module."""
    from vmwatch.lab import LabConfig, LabGuest

    guests = []
    try:
        for name in NAMES:
            guests.append(LabGuest.start(LabConfig(name=name, kaslr=False)))
            guests[-1].shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
        yield guests
    finally:
        for guest in guests:
            guest.stop()


def _kallsyms(guest, *names):
    out = guest.shell("grep -E ' (" + "|".join(names) + ")$' /proc/kallsyms", check=True)
    found = {line.split()[2]: int(line.split()[0], 16) for line in out.splitlines() if len(line.split()) == 3}
    return [found[n] for n in names]


def _syscall_slot(guest, number):
    """Offset of sys_call_table[number] in the guest's RAM file, found from outside: the table's
    first entries (read, write, open) as the guest's own /proc/kallsyms gives them."""
    read, write, open_ = _kallsyms(guest, "__x64_sys_read", "__x64_sys_write", "__x64_sys_open")
    pattern = b"".join(v.to_bytes(8, "little") for v in (read, write, open_))
    with open(guest.ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
        table = ram.find(pattern)
        assert table >= 0 and ram.find(pattern, table + 1) < 0, "sys_call_table not found once in RAM"
    return table + 8 * number


class Watch:
    """``vmwatch watch`` in a subprocess, its JSON lines and log lines collected as they come."""

    def __init__(self, args):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "vmwatch", "--log-level", "info", "watch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lines: list[dict] = []
        self.log: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, is_json):
        for line in stream:
            if is_json:
                self.lines.append(json.loads(line))
            else:
                self.log.append(line.rstrip("\n"))

    def wait_for(self, what, predicate, timeout=240.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [x for x in list(self.lines if what == "json" else self.log) if predicate(x)]
            if found:
                return found
            assert self.proc.poll() is None, f"watch ended early: {self.proc.returncode}\n" + "\n".join(self.log)
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting in {what}\n" + "\n".join(self.log[-30:]))

    def finish(self, timeout=180.0):
        self.proc.send_signal(signal.SIGINT)
        status = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return status


def _started(lines, vm, pid):
    return [x for x in lines if x["vm"] == vm and x.get("pid") == pid and x["event"] in ("ProcessStart", "Exec")]


@pytest.mark.guest
def test_two_guests_one_watch(two_guests, tmp_path):
    """One watch over two live guests: a tamper in A alerts for A only; a process in B is seen
    for B; B's QEMU killed (-9) ends B's watch (SourceEnded, an alert naming it) while A's goes on
    and still sees a process started after the kill; exit 3; both timelines in the database."""
    a, b = two_guests
    db = tmp_path / "fleet.db"
    targets = tmp_path / "targets.txt"
    targets.write_text(f"{b.target}\n")
    watch = Watch([a.target, "--targets", str(targets), "--rules", "security", "--rules", "timeline",
                   "--json", "--db", str(db), "--duration", "900"])
    try:
        for name in NAMES:
            watch.wait_for("log", lambda line, name=name: "watch armed" in line and f"vm={name}" in line)

        # a tamper in A, made from outside (the RAM file), as a rootkit would patch the table
        slot = _syscall_slot(a, 39)
        getppid, = _kallsyms(a, "__x64_sys_getppid")
        with open(a.ram_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
            original = ram[slot:slot + 8]
            ram[slot:slot + 8] = getppid.to_bytes(8, "little")
            try:
                hits = watch.wait_for("json", lambda x: x["event"] == "alert" and x["rule"] == "security.syscall_table")
            finally:
                ram[slot:slot + 8] = original
        assert {h["vm"] for h in hits} == {"fleet-a"} and all(h["host"] == socket.gethostname() for h in hits)
        assert "sys_call_table[39] changed" in hits[0]["message"]

        # B is watched too: a process there is seen, tagged B (truth: B's serial console)
        pid_b = int(b.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])
        watch.wait_for("json", lambda x: bool(_started([x], "fleet-b", pid_b)))

        os.kill(b.pid, signal.SIGKILL)
        killed_ns = time.time_ns()
        gone = watch.wait_for("json", lambda x: x["event"] == "alert" and x["vm"] == "fleet-b"
                              and x["rule"] == "engine" and "went away" in x["message"])
        assert len(gone) == 1

        pid_a = int(a.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])
        seen = watch.wait_for("json", lambda x: bool(_started([x], "fleet-a", pid_a)))
        assert all(x["time_ns"] > killed_ns for x in seen)
        assert watch.proc.poll() is None  # A's watch still runs
    finally:
        status = watch.finish()
    assert status == 3, "\n".join(watch.log[-30:])
    assert any(line.startswith("vmwatch: guest fleet-b") and "went away" in line for line in watch.log)
    assert not [x for x in watch.lines if x["event"] == "alert" and x["vm"] == "fleet-b"
                and x["rule"].startswith("security.syscall")]

    rows = sqlite3.connect(db).execute("SELECT vm, host, kind, pid, time_ns FROM events").fetchall()
    by_vm = {vm: [r for r in rows if r[0] == vm] for vm in NAMES}
    assert {r[1] for r in rows} == {socket.gethostname()}
    assert any(r[3] == pid_b for r in by_vm["fleet-b"]) and any(r[3] == pid_a for r in by_vm["fleet-a"])
    assert [r[2] for r in by_vm["fleet-b"]].count("SourceEnded") == 1
    assert "SourceEnded" not in [r[2] for r in by_vm["fleet-a"]]
    alerts = sqlite3.connect(db).execute("SELECT vm, rule FROM alerts").fetchall()
    assert ("fleet-a", "security.syscall_table") in alerts and ("fleet-b", "security.syscall_table") not in alerts
    only_b = run_cli("timeline", db, "--vm", "fleet-b", "--json")
    assert only_b.status == 0 and {json.loads(line)["vm"] for line in only_b.stdout.splitlines()} == {"fleet-b"}
