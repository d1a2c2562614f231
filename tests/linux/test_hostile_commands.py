"""Every command and the shipped rules over corrupted copies of a real lab dump: the task and module
lists made cyclic, pointed into unmapped memory or spliced into an endless chain, CPU 0's run
queue cyclic or unmapped, names with no NUL, an absurd nr_cpu_ids, a sys_call_table entry into
unmapped memory. Each ends in bounded time, exit 0, with
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

LIMIT = {"ps": 60, "modules": 60, "syscalls": 60, "watch": 120}
"""Seconds: the endless task list (65,536 garbage tasks) takes 4-8 s for ps on an idle host."""


@pytest.fixture(scope="module")
def clean(default_snap):
    """What the uncorrupted dump lists."""
    with open_image(default_snap.dump) as image:
        return c.clean_facts(Linux.from_memory(image, image.cpus))


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


@pytest.mark.parametrize("name", c.EXPECTED)
@pytest.mark.parametrize("command", ["ps", "modules", "syscalls"])
def test_listing_commands(copies, clean, name, command):
    """ps/modules/syscalls over each corrupted copy: what precedes the break, and a warning naming the list."""
    result = _run(command, copies(name), "--json")
    c.check_listing(command, name, json.loads(result.stdout), result.stderr, clean)


def test_names_without_nul_are_cut_at_their_arrays(copies, clean):
    """A comm with no NUL is its 16 bytes, a module name with no NUL its 56, and nothing past them."""
    ps = json.loads(_run("ps", copies("names_without_nul"), "--json").stdout)
    assert ps[2]["comm"] == "A" * 16 and ps[2]["name"].startswith("A" * 16)
    modules = json.loads(_run("modules", copies("names_without_nul"), "--json").stdout)
    assert modules[0]["name"] == "B" * 56 and [m["name"] for m in modules[1:]] == clean["modules"][1:]


@pytest.mark.parametrize("name", c.EXPECTED)
def test_watch_with_the_shipped_packs(copies, tmp_path, name):
    """watch with the security and timeline packs ends (SourceEnded), exit 0, no rule raises, every
    alert printed is stored, and a broken list is named in a warning with the entries read before it."""
    db = tmp_path / "t.db"
    result = _run("watch", copies(name), "--rules", "security", "--rules", "timeline", "--json", "--db", db)
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed[-1]["event"] == "SourceEnded"
    c.check_watch(name, printed, result.stderr)
    stored = [json.loads(line) for line in run_cli("timeline", db, "--json").stdout.splitlines()]
    assert sorted(str(e.get("rule")) for e in stored) == sorted(str(e.get("rule")) for e in printed)


@pytest.mark.parametrize("command", ["syscalls", "ps"])
def test_unmapped_kernel_page_is_one_error_line(copies, command):
    """With sys_call_table's page (and the kernel's BTF with it) not mapped, the command exits 2
    with one line saying which address and page-table level failed."""
    result = run_cli(command, copies("unmapped_syscall_page"))
    assert result.status == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vmwatch: error: page not present at 0x")
