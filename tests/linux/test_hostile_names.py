"""Hostile names in a real guest reach the terminal escaped on every command; --json and stored data stay exact.

A copy of the lab dump gets a task comm that clears the screen, retitles the window and forges a row,
a comm that looks like rich markup, a module name with controls and a bidi override (written at
the BTF offsets into the file), and the kallsyms token "res" turned into ESC BEL CR, which renames
every symbol holding it (syscall handlers, IDT entries). The live test has a guest process rename
itself through /proc.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import threading

import pytest

from vmwatch.images import open_image
from vmwatch.os.linux import locate
from vmwatch.os.linux.kernel import Linux
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.guest

COMM = "\x1b[2J\x1b]0;pwn\x07\nx"  # 14 bytes: fits the 16-byte comm with its NUL
COMM_SHOWN = "\\x1b[2J\\x1b]0;pwn\\x07\\nx"
MARKUP = "[bold red]x"
MODULE = "\x1b]0;m\x07\r\nfake\u202eoc"
MODULE_SHOWN = "\\x1b]0;m\\x07\\r\\nfake\\u202eoc"
# a kallsyms token (in __x64_sys_setresuid...) and its stand-in; not LF, which vmwatch's kallsyms
# decoder rejects (it keeps names joined by newlines)
TOKEN, TOKEN_PATCH = b"res", b"\x1b\x07\r"
RAW = ("\x1b", "\x07", "\r", "\u202e")  # never on a terminal; \n is checked by counting rows


def _by_hand(name: str) -> str:
    """The escaped form of the names used here, spelled out (not computed by vmwatch.text)."""
    for raw, escaped in (("\x1b", "\\x1b"), ("\x07", "\\x07"), ("\n", "\\n"), ("\r", "\\r"), ("\u202e", "\\u202e")):
        name = name.replace(raw, escaped)
    return name

RULES = '''
from vmwatch.rules import rule

@rule.on_start
def names(event, guest):
    """Every task and module whose name is not plain: one warning each, quoting it."""
    for task in guest.linux.tasks():
        if not task.comm.isprintable() or "[" in task.comm:
            guest.alert("warning", f"saw task {task.comm}", pid=task.pid, comm=task.comm)
    for module in guest.linux.modules():
        if not module.name.isprintable():
            guest.alert("warning", f"saw module {module.name}", module=module.name)
'''


def _file_offset(image, paddr: int) -> int:
    for run in image.runs:
        if run.start <= paddr < run.start + run.size and run.file_offset is not None:
            return run.file_offset + paddr - run.start
    raise AssertionError(f"{paddr:#x} is not in the dump file")


def _token_paddr(image) -> int:
    """Physical address of the kallsyms token TOKEN (the token table: 256 NUL-terminated strings)."""
    _, _, table = locate.find_kallsyms(image, tuple(image.cpus))
    tokens = image.read(table, 4096).split(b"\0")[:256]
    at = tokens.index(TOKEN)
    return table + sum(len(t) + 1 for t in tokens[:at])


@pytest.fixture(scope="module")
def hostile(default_snap, tmp_path_factory):
    """(dump path, {pid: hostile comm}, comm's virtual address) with the names written in."""
    path = tmp_path_factory.mktemp("hostile") / "hostile.elf"
    shutil.copyfile(default_snap.dump, path)
    with open_image(default_snap.dump) as image:
        linux = Linux.from_memory(image, image.cpus)
        tasks, module = linux.tasks(), linux.modules()[0]
        comm_off = linux.types.offset("task_struct", "comm")
        victims = {tasks[-1].pid: (tasks[-1].address + comm_off, COMM),
                   tasks[-2].pid: (tasks[-2].address + comm_off, MARKUP)}
        writes = [(module.address + linux.types.offset("module", "name"), MODULE)] + list(victims.values())
        patches = [(_file_offset(image, linux.memory.translate(vaddr + i)), byte)
                   for vaddr, name in writes for i, byte in enumerate(name.encode() + b"\0")]
        token = _token_paddr(image)
        patches += [(_file_offset(image, token + i), byte) for i, byte in enumerate(TOKEN_PATCH)]
    with open(path, "r+b") as f:
        for offset, byte in patches:
            f.seek(offset)
            f.write(bytes([byte]))
    return path, {pid: name for pid, (_, name) in victims.items()}, victims[tasks[-1].pid][0]


def _clean(text: str) -> None:
    assert not any(c in text for c in RAW), [c for c in RAW if c in text]


class TestDump:
    def test_ps(self, hostile):
        """ps: one row per task, the hostile comm escaped in its own row, markup shown as text; --json exact."""
        path, victims, _ = hostile
        table, rows = run_cli("ps", path), json.loads(run_cli("ps", path, "--json").stdout)
        assert table.status == 0, table.stderr
        _clean(table.stdout + table.stderr)
        lines = table.stdout.splitlines()
        assert len(lines) == 1 + len(rows)
        by_pid = {int(line.split()[0]): line for line in lines[1:]}
        for pid, name in victims.items():
            assert {r["comm"] for r in rows if r["pid"] == pid} == {name}  # exact in JSON
            assert by_pid[pid].endswith(COMM_SHOWN if name == COMM else MARKUP)

    def test_modules(self, hostile):
        """modules: the control-character name is one escaped row; --json holds the exact name."""
        path, _, _ = hostile
        table, rows = run_cli("modules", path), json.loads(run_cli("modules", path, "--json").stdout)
        _clean(table.stdout + table.stderr)
        assert len(table.stdout.splitlines()) == 1 + len(rows)
        assert MODULE in [r["name"] for r in rows]
        assert sum(line.startswith(MODULE_SHOWN + " ") for line in table.stdout.splitlines()) == 1

    @pytest.mark.parametrize("command", ["syscalls", "idt"])
    def test_symbol_tables(self, hostile, command):
        """syscalls and idt: symbols renamed by the token are escaped in their rows; --json is exact."""
        path, _, _ = hostile
        table, rows = run_cli(command, path), json.loads(run_cli(command, path, "--json").stdout)
        assert table.status == 0, table.stderr
        _clean(table.stdout + table.stderr)
        assert len(table.stdout.splitlines()) == 1 + len(rows)
        hostile_names = [r["symbol"] for r in rows if r["symbol"] and TOKEN_PATCH.decode() in r["symbol"]]
        assert hostile_names, "the patched token renamed no entry"
        cells = [line.split()[-1] for line in table.stdout.splitlines()[1:]]
        assert [_by_hand(name) for name in hostile_names] == [c for c in cells if "\\x1b" in c]

    def test_watch_timeline_and_replay(self, hostile, tmp_path):
        """Alerts on screen, the timeline table and replay's text are escaped; --json, the SQLite
        timeline, timeline --csv and the recording keep the exact names."""
        path, victims, _ = hostile
        pack, db, rec = tmp_path / "names.py", tmp_path / "t.db", tmp_path / "s.vmwr"
        pack.write_text(RULES)
        screen = run_cli("watch", path, "--rules", pack, "--db", db, "--record", rec)
        assert screen.status == 0, screen.stderr
        _clean(screen.stdout + screen.stderr)
        assert sum(f"saw task {COMM_SHOWN}" in line for line in screen.stdout.splitlines()) == 2  # line + table
        assert sum(f"saw module {MODULE_SHOWN}" in line for line in screen.stdout.splitlines()) == 2
        assert f"saw task {MARKUP}" in screen.stdout  # not parsed as rich markup
        alerts = [json.loads(line) for line in run_cli("watch", path, "--rules", pack, "--json").stdout.splitlines()]
        messages = {a["message"] for a in alerts if a.get("rule") == "names.names"}
        assert messages == {f"saw task {COMM}", f"saw task {MARKUP}", f"saw module {MODULE}"}
        stored = set(sqlite3.connect(db).execute("SELECT pid, comm FROM alerts WHERE message LIKE 'saw task %'"))
        assert stored == set(victims.items())

        table = run_cli("timeline", db, "--kind", "alert")
        _clean(table.stdout + table.stderr)
        exact = [json.loads(line) for line in run_cli("timeline", db, "--kind", "alert", "--json").stdout.splitlines()]
        assert len(table.stdout.splitlines()) == len(exact) == 3
        idle = {e["comm"] for e in exact if e["message"].startswith("saw module")}  # the dump's current task
        assert {e["comm"] for e in exact} == {COMM, MARKUP} | idle
        assert any(f"/{COMM_SHOWN} " in line for line in table.stdout.splitlines())
        rows = list(csv.DictReader(io.StringIO(run_cli("timeline", db, "--kind", "alert", "--csv").stdout)))
        assert {r["comm"] for r in rows} == {COMM, MARKUP} | idle  # CSV is data: exact, quoted

        replay = run_cli("replay", rec, "--rules", pack)
        assert replay.status == 0, replay.stderr
        _clean(replay.stdout + replay.stderr)
        assert len(replay.stdout.splitlines()) == 3 and f"({COMM_SHOWN}): saw task {COMM_SHOWN}" in replay.stdout
        replayed = [json.loads(line) for line in run_cli("replay", rec, "--rules", pack, "--json").stdout.splitlines()]
        assert {a["message"] for a in replayed if a.get("rule") == "names.names"} == messages

    def test_debugger(self, hostile, tmp_path):
        """debug --script: x/s of the hostile comm, and sym, dis and p of a renamed handler, print escaped."""
        path, _, comm_address = hostile
        script = tmp_path / "s.txt"
        handler = next(r for r in json.loads(run_cli("syscalls", path, "--json").stdout)
                       if r["symbol"] and TOKEN_PATCH.decode() in r["symbol"])
        script.write_text(f"x/s {comm_address:#x}\nx/16b {comm_address:#x}\nsym {handler['address']:#x}\n"
                          f"dis {handler['address']:#x} 1\np {handler['address']:#x}\n")
        result = run_cli("debug", path, "--script", script)
        assert result.status == 0, result.stderr
        _clean(result.stdout + result.stderr)
        lines = result.stdout.splitlines()
        assert f"{comm_address:#018x}  '{COMM_SHOWN}'" in lines
        shown_symbol = _by_hand(handler["symbol"])
        assert lines[lines.index(f"(vmwatch) sym {handler['address']:#x}") + 1] == shown_symbol
        assert f"{handler['address']:#018x} <{shown_symbol}>:" in result.stdout
        assert f"<{shown_symbol}>" in lines[-1]


def test_live_guest_renames_itself(lab_guest, tmp_path):
    """A guest process writing a hostile name to /proc/self/comm: ps and watch show it escaped;
    ps --json and the timeline hold the bytes the guest's own /proc has."""
    pid = int(lab_guest.shell(
        r"""sh -c 'printf "\033[2J\033]0;pwn\007\nx" > /proc/self/comm; while sleep 1; do :; done' """
        r"""</dev/null >/dev/null 2>&1 & echo $!""", check=True).split()[-1])
    try:
        truth = bytes.fromhex(lab_guest.shell(f"od -An -tx1 /proc/{pid}/comm", check=True).replace(" ", "")
                              .replace("\n", "").replace("\r", ""))
        assert truth == COMM.encode() + b"\n"  # /proc adds the newline
        table = run_cli("ps", lab_guest.target)
        assert table.status == 0, table.stderr
        _clean(table.stdout + table.stderr)
        assert [line for line in table.stdout.splitlines() if line.split()[0] == str(pid)][0].endswith(COMM_SHOWN)
        rows = json.loads(run_cli("ps", lab_guest.target, "--json").stdout)
        assert [r["comm"].encode() for r in rows if r["pid"] == pid] == [truth[:-1]]

        db = tmp_path / "t.db"
        threading.Timer(5, lambda: lab_guest.shell(f"kill {pid}")).start()
        screen = run_cli("watch", lab_guest.target, "--rules", "timeline", "--duration", "14", "--db", db)
        assert screen.status == 0, screen.stderr
        _clean(screen.stdout + screen.stderr)
        assert f"process {pid} ({COMM_SHOWN}) killed by signal 15" in screen.stdout
        stored = sqlite3.connect(db).execute("SELECT comm FROM events WHERE pid = ? AND kind = 'ProcessExit'",
                                             (pid,)).fetchall()
        assert stored == [(COMM,)]
    finally:
        lab_guest.shell(f"kill {pid} 2>/dev/null; true")
