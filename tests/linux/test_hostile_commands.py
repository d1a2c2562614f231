"""Every command and the shipped rules over corrupted copies of a real lab dump: lists made cyclic,
pointed into unmapped memory or spliced into an endless chain, names with no NUL, an absurd
nr_cpu_ids, a sys_call_table entry into unmapped memory. Each ends in bounded time, exit 0, with
a warning naming the broken list and how many entries were read before it."""

from __future__ import annotations

import json
import time

import pytest

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux
from vmwatch.testing.cli import run_cli

from . import corruptions as c
from .overlay import corrupt_copy

pytestmark = pytest.mark.guest

# corruption -> (the broken list's warning, entries listed, how many of them the clean dump lists
# first): None where no list breaks
CASES = {
    "cyclic_tasks": ("init_task.tasks list broken after 11 entries: cycle at", 11, 11),
    "unmapped_tasks": ("init_task.tasks list broken after 6 entries: unreadable pointer at 0xffffdead00000000", 6, 6),
    "endless_tasks": ("init_task.tasks list broken after 65536 entries: more than 65536 entries", 65536, 6),
    "cyclic_modules": ("modules list broken after 1 entries: cycle at", 1, 1),
    "unmapped_modules": ("modules list broken after 2 entries: unreadable pointer at 0xffffdead00000000", 2, 2),
    "endless_modules": ("modules list broken after 8192 entries: more than 8192 entries", 8192, 2),
    "names_without_nul": (None, None, None),
    "syscall_unmapped": (None, None, None),
    "absurd_cpus": (None, None, None),
}
LIMIT = {"ps": 60, "modules": 60, "syscalls": 60, "watch": 120}
"""Seconds: the endless task list (65,536 garbage tasks) takes 4-8 s for ps on an idle host."""


@pytest.fixture(scope="module")
def clean(default_snap):
    """What the uncorrupted dump lists: pids, module names, system call table."""
    with open_image(default_snap.dump) as image:
        linux = Linux.from_memory(image, image.cpus)
        return {"pids": [t.pid for t in linux.tasks()], "modules": [m.name for m in linux.modules()],
                "bases": [m.base for m in linux.modules()],
                "syscalls": [(s.address, s.symbol) for s in linux.syscalls()]}


@pytest.fixture(scope="module")
def copies(default_snap, tmp_path_factory):
    """One corrupted copy of the dump per case, made when first asked for."""
    made = {}

    def get(name):
        if name not in made:
            def mutate(linux, overlay):
                for paddr, data in c.overlay_patches(linux, getattr(c, name)(linux)):
                    overlay.patch(paddr, data)
            made[name] = corrupt_copy(default_snap, tmp_path_factory.mktemp(name), mutate)
        return made[name]
    return get


def _run(*argv):
    start = time.monotonic()
    result = run_cli(*argv)
    took = time.monotonic() - start
    assert result.status == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert took < LIMIT[argv[0]], took
    return result


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("vmwatch: warning:")]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("command", ["ps", "modules", "syscalls"])
def test_listing_commands(copies, clean, name, command):
    """ps/modules/syscalls list what precedes the break, warn once about the list they walk (at
    most ten problem lines in all), and are untouched by corruptions of what they do not read."""
    broken, kept, real = CASES[name]
    result = _run(command, copies(name), "--json")
    rows = json.loads(result.stdout)
    warnings = _warnings(result.stderr)
    walks = {"ps": "init_task.tasks", "modules": "modules"}.get(command)
    if broken is not None and broken.startswith(f"{walks} "):
        assert broken in warnings[0] and len(warnings) <= 11, result.stderr
        assert len(rows) == kept
        listed = [r["pid" if command == "ps" else "base"] for r in rows]
        assert listed[:real] == clean["pids" if command == "ps" else "bases"][:real]
    else:
        assert not warnings, result.stderr
        if command == "ps":
            assert [r["pid"] for r in rows] == clean["pids"]
        elif command == "modules":
            assert [r["base"] for r in rows] == clean["bases"]
    if command == "syscalls":
        table = [(r["address"], r["symbol"]) for r in rows]
        expected = list(clean["syscalls"])
        if name == "syscall_unmapped":
            expected[1] = (c.UNMAPPED, None)
            assert [r["in_text"] for r in rows].count(False) == 1 and not rows[1]["in_text"]
        assert table == expected


def test_names_without_nul_are_cut_at_their_arrays(copies, clean):
    """A comm with no NUL is its 16 bytes, a module name with no NUL its 56, and nothing past them."""
    ps = json.loads(_run("ps", copies("names_without_nul"), "--json").stdout)
    assert ps[2]["comm"] == "A" * 16 and ps[2]["name"].startswith("A" * 16)
    modules = json.loads(_run("modules", copies("names_without_nul"), "--json").stdout)
    assert modules[0]["name"] == "B" * 56 and [m["name"] for m in modules[1:]] == clean["modules"][1:]


@pytest.mark.parametrize("name", CASES)
def test_watch_with_the_shipped_packs(copies, tmp_path, name):
    """watch with the security and timeline packs ends (SourceEnded), exit 0, no rule raises, every
    alert printed is stored, and a broken list is named in a warning with the entries read before it."""
    broken = CASES[name][0]
    db = tmp_path / "t.db"
    result = _run("watch", copies(name), "--rules", "security", "--rules", "timeline", "--json", "--db", db)
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed[-1]["event"] == "SourceEnded"
    alerts = [e for e in printed if "rule" in e]
    assert not [a for a in alerts if a["rule"] == "engine"], alerts  # no rule raised or was isolated
    logged = [line for line in result.stderr.splitlines() if "list_broken" in line]
    if broken is None:
        assert not logged, result.stderr
    else:
        walked, _, entries = broken.partition(" list broken after ")
        assert any(f"list={walked}" in line and f"entries={entries.split()[0]}" in line for line in logged), \
            result.stderr
    if name == "syscall_unmapped":
        hooked = [a["message"] for a in alerts if a["rule"] == "security.syscall_table"]
        assert hooked == [f"sys_call_table[1] points outside kernel text: {c.UNMAPPED:#x}"]
    stored = [json.loads(line) for line in run_cli("timeline", db, "--json").stdout.splitlines()]
    assert sorted(str(e.get("rule")) for e in stored) == sorted(str(e.get("rule")) for e in printed)
