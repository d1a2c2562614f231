"""``vmwatch watch qemu:...`` on the live lab guest, end to end through the CLI."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("stealth", [False, True], ids=["inline-hooks", "stealth"])
def test_watch_live_json_and_timeline(lab_guest, tmp_path, stealth):
    """A timed watch prints JSON lines for what happens in the guest and fills the SQLite timeline.
    Its exec sensor is an inline hook (QEMU executes a call there), or with --stealth a gdbstub
    breakpoint (QEMU sees the guest's own NOP)."""
    db = tmp_path / "timeline.db"
    truth: list[str] = []
    lab_guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    sensor = int(lab_guest.shell("grep ' begin_new_exec$' /proc/kallsyms", check=True).split()[0], 16)
    executed: list[int] = []

    def first_byte() -> int:
        text = lab_guest.qmp().execute("human-monitor-command", {"command-line": f"x /1xb {sensor:#x}"})
        return int(text.split(":")[1].split()[0], 16)

    def act() -> None:
        # The watch arms when it arms (later on a loaded host): wait for the inline hook's call
        # (none comes with --stealth), then exec once a second while the watch runs.
        end = time.monotonic() + 10
        time.sleep(2)
        while not stealth and first_byte() != 0xE8 and time.monotonic() < end:
            time.sleep(0.2)
        executed.append(first_byte())
        while time.monotonic() < end:
            truth.append(lab_guest.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])
            time.sleep(1)

    worker = threading.Thread(target=act)
    worker.start()
    result = run_cli("watch", lab_guest.target, "--rules", "timeline", "--duration", "12", "--json", "--db", db,
                     *(["--stealth"] if stealth else []))
    worker.join()
    assert executed == [0x0F if stealth else 0xE8]
    assert result.status == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    seen = {x["pid"] for x in lines if x["event"] == "Exec"}
    pid = next((int(p) for p in truth if int(p) in seen), None)  # the first exec the armed watch saw
    assert pid is not None, (truth, sorted(seen))
    execs = [x for x in lines if x["event"] == "Exec" and x["pid"] == pid]
    assert "/bin/busybox" in [x["details"]["filename"] for x in execs]  # after sh itself (/proc/self/exe)
    rows = sqlite3.connect(db).execute("SELECT kind, time_ns FROM events WHERE pid = ?", (pid,)).fetchall()
    kinds = {kind for kind, _ in rows}
    assert {"Exec", "ProcessExit"} <= kinds
    assert all(abs(t / 1e9 - time.time()) < 600 for _, t in rows)  # wall-clock times
