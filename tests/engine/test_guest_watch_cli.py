"""``vmwatch watch qemu:...`` on the live lab guest, end to end through the CLI."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest


def test_watch_live_json_and_timeline(lab_guest, tmp_path):
    """A timed watch prints JSON lines for what happens in the guest and fills the SQLite timeline."""
    db = tmp_path / "timeline.db"
    truth: list[str] = []

    def act() -> None:
        time.sleep(4)
        truth.append(lab_guest.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])

    worker = threading.Thread(target=act)
    worker.start()
    result = run_cli("watch", lab_guest.target, "--rules", "timeline", "--duration", "12", "--json", "--db", db)
    worker.join()
    assert result.status == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    pid = int(truth[0])
    execs = [x for x in lines if x["event"] == "Exec" and x["pid"] == pid]
    assert "/bin/busybox" in [x["details"]["filename"] for x in execs]  # after sh itself (/proc/self/exe)
    rows = sqlite3.connect(db).execute("SELECT kind, time_ns FROM events WHERE pid = ?", (pid,)).fetchall()
    kinds = {kind for kind, _ in rows}
    assert {"Exec", "ProcessExit"} <= kinds
    assert all(abs(t / 1e9 - time.time()) < 600 for _, t in rows)  # wall-clock times
