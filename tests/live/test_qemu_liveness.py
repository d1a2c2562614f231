"""A QEMU that dies or freezes: the backend's event stream ends with SourceEnded (a fake silent
QEMU, on trio's autojump clock), and during ``vmwatch watch --db --record`` the watch ends in
bounded time with exit status 3, what it saw before in the timeline and the recording.

Each guest test boots a private lab guest (it is killed or frozen). The watch runs as a real
process so its end is timed from outside; truth about what ran comes from the guest's shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import vmwatch
from vmwatch.errors import LinkClosedError
from vmwatch.events import SourceEnded
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import GdbConnection
from vmwatch.live.qemu import QemuVM
from vmwatch.live.qemu_liveness import PROBE_INTERVAL, PROBE_TIMEOUT
from vmwatch.live.qmp import QmpError
from vmwatch.testing.cli import run_cli

GUEST_GONE = 3
KILL_BOUND = 2.0
"""Seconds from ``kill -9`` of QEMU to the end of the watch process."""
FREEZE_BOUND = PROBE_INTERVAL + PROBE_TIMEOUT + 1.0
"""Seconds from SIGSTOP to the end: one probe interval, one probe timeout, and teardown."""


class FakeQmp:
    """QMP of a QEMU that never answers (``silent``), or answers each probe, every other one an error."""

    def __init__(self, *, silent: bool) -> None:
        self.silent = silent
        self.asked = 0
        self.closed = False

    async def execute(self, command: str, **arguments: object) -> object:
        self.asked += 1
        if self.silent:
            await trio.sleep_forever()
        if self.asked % 2:
            raise QmpError(command, "GenericError", "busy")
        return {"status": "running", "running": True}

    async def aclose(self) -> None:
        self.closed = True


def running_vm(qmp: FakeQmp) -> QemuVM:
    """A QemuVM whose guest runs and whose gdbstub (the other end of a memory stream) never stops."""
    client, _server = trio.testing.memory_stream_pair()
    return QemuVM(qmp, GdbConnection(client, state=p.State.RUNNING), layout=[], threads=[p.ThreadId(1, 1)],
                  gdb_path="fake")


class TestProbe:
    async def test_silent_qemu_ends_the_stream(self, autojump_clock) -> None:
        """No answer to query-status: the event wait ends after one interval plus the timeout with
        one SourceEnded naming it; both links are closed and later calls fail typed."""
        vm = running_vm(FakeQmp(silent=True))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vm._probe_liveness)
                start = trio.current_time()
                events = [event async for event in vm.events()]
        assert trio.current_time() - start == pytest.approx(PROBE_INTERVAL + PROBE_TIMEOUT)
        assert len(events) == 1 and isinstance(events[0], SourceEnded), events
        assert events[0].reason == f"QEMU stopped answering: no reply to QMP query-status in {PROBE_TIMEOUT:g} s"
        assert vm.qmp.closed
        with pytest.raises(LinkClosedError, match="stopped answering"):
            await vm.pause()

    async def test_answering_qemu_keeps_the_stream(self, autojump_clock) -> None:
        """Answers, errors included, keep the link: a minute of probes and the wait goes on."""
        vm = running_vm(FakeQmp(silent=False))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._probe_liveness)
            with trio.move_on_after(60):
                events = [event async for event in vm.events()]
                pytest.fail(f"the stream ended: {events}")
            nursery.cancel_scope.cancel()
        assert vm.qmp.asked >= 55 and not vm.qmp.closed


class Watch:
    """``vmwatch watch TARGET --rules security timeline --json --db --record`` as a process."""

    def __init__(self, target: str, tmp: Path) -> None:
        self.db, self.record = tmp / "timeline.db", tmp / "live.vmwr"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(vmwatch.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmwatch", "watch", target, "--rules", "security", "timeline", "--json",
             "--db", str(self.db), "--record", str(self.record)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def alerts(self) -> list[dict]:
        return [x for x in list(self.lines) if x["event"] == "alert"]

    def wait_for(self, what, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(what(x) for x in list(self.lines)):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, f"not seen in {timeout} s: {self.lines[-5:]}"
            time.sleep(0.1)

    def ended_within(self, seconds: float) -> float:
        """Seconds until the process exited (fails past ``seconds`` plus a margin, killing it)."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"watch still running {seconds + 30} s after QEMU went away")
        took = time.monotonic() - start
        self._reader.join(10)
        self.stderr = self.proc.stderr.read()
        return took

    def close(self) -> None:
        """Kill the process if it still runs and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def watch_until_alerts(guest, tmp: Path) -> tuple[Watch, int]:
    """Start the watch, see it report an exec the guest made, then raise a security alert."""
    watch = Watch(guest.target, tmp)
    try:
        deadline = time.monotonic() + 180
        while True:  # armed once an exec the guest reports is seen
            pid = int(guest.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=60).split()[0])
            time.sleep(1)
            if any(x["event"] == "Exec" and x.get("pid") == pid for x in list(watch.lines)):
                break
            assert watch.proc.poll() is None, watch.proc.stderr.read()
            assert time.monotonic() < deadline, watch.lines[-5:]
        dropper = int(guest.shell("mkdir -p /tmp/.x && cp /bin/busybox /tmp/.x/sh && /tmp/.x/sh -c 'echo $$'",
                                  timeout=60).split()[-1])
        watch.wait_for(lambda x: x["event"] == "alert" and x.get("pid") == dropper and "/tmp/.x/sh" in x["message"],
                       timeout=60)
    except BaseException:
        watch.close()
        raise
    return watch, dropper


def check_stored(watch: Watch, before: list[dict], dropper: int, why: str) -> None:
    """Every alert printed before QEMU went away is in the timeline; the end is recorded; the
    recording replays to the same alerts."""
    db = sqlite3.connect(watch.db)
    stored = {(rule, seq, msg) for rule, seq, msg in db.execute("SELECT rule, seq, message FROM alerts")}
    assert {(a["rule"], a["seq"], a["message"]) for a in before} <= stored
    assert any(pid == dropper for (pid,) in db.execute("SELECT pid FROM alerts"))
    ended = [json.loads(d)["reason"] for (d,) in db.execute("SELECT details FROM events WHERE kind = 'SourceEnded'")]
    assert len(ended) == 1 and why in ended[0], ended
    replay = run_cli("replay", watch.record, "--rules", "security", "timeline", "--json")
    assert replay.status == 0, replay.stderr
    replayed = [json.loads(line) for line in replay.stdout.splitlines()]
    live_alerts = [(a["rule"], a["seq"], a["message"]) for a in watch.alerts()]
    assert [(a["rule"], a["seq"], a["message"]) for a in replayed if a["event"] == "alert"] == live_alerts


def watch_and_signal(guest, tmp: Path, sig: int, bound: float) -> Watch:
    """Watch until alerts came, send ``sig`` to QEMU, and check the watch ended within ``bound``
    seconds with status 3, its last line a SourceEnded, everything before stored and replayable."""
    watch, dropper = watch_until_alerts(guest, tmp)
    try:
        before = watch.alerts()
        os.kill(guest.pid, sig)
        took = watch.ended_within(bound)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a frozen QEMU is not left behind
            os.kill(guest.pid, signal.SIGKILL)
            os.kill(guest.pid, signal.SIGCONT)
        watch.close()
    print(f"signal {sig} -> watch ended in {took:.2f} s")
    assert watch.proc.returncode == GUEST_GONE, watch.stderr
    assert "the guest went away" in watch.stderr and "Traceback" not in watch.stderr
    assert took <= bound, took
    assert watch.lines[-1]["event"] == "SourceEnded"
    check_stored(watch, before, dropper, watch.lines[-1]["details"]["reason"])
    return watch


@pytest.mark.guest
def test_kill_9_ends_the_watch_at_once(lab_guest_factory, tmp_path) -> None:
    """``kill -9`` of QEMU: the watch ends within 2 s with status 3, alerts kept, recording replays."""
    watch = watch_and_signal(lab_guest_factory(), tmp_path, signal.SIGKILL, KILL_BOUND)
    assert "closed" in watch.lines[-1]["details"]["reason"]


@pytest.mark.guest
def test_frozen_qemu_ends_the_watch_in_bounded_time(lab_guest_factory, tmp_path) -> None:
    """A SIGSTOP'd QEMU answers nothing: the liveness probe ends the watch within
    probe interval + timeout, status 3, the reason names QMP, alerts kept, recording replays."""
    watch = watch_and_signal(lab_guest_factory(), tmp_path, signal.SIGSTOP, FREEZE_BOUND)
    assert "QEMU stopped answering: no reply to QMP query-status" in watch.lines[-1]["details"]["reason"]
