"""Corrupted kernel lists in a real dump: walks stop, say what they skipped, and never hang."""

from __future__ import annotations

import json
import struct
import time

import pytest

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux
from vmwatch.testing.cli import run_cli

from .overlay import Overlay, corrupt_copy, mutated

pytestmark = pytest.mark.guest


def corrupt(snap, mutate):
    """The dump patched by ``mutate``, and a fresh Linux on the patch."""
    image, overlay = mutated(snap, mutate)
    return image, Linux.from_memory(overlay, image.cpus)


def tasks_link(linux, task_address: int) -> int:
    """Physical address of ``task->tasks.next``."""
    return linux.memory.translate(task_address + linux.types.offset("task_struct", "tasks"))


class TestHostileTaskList:
    def test_cycle_not_through_head(self, default_snap):
        """A tasks.next pointing back into the middle of the list ends the walk with a note."""
        def mutate(linux, overlay):
            tasks = linux.tasks()
            off = linux.types.offset("task_struct", "tasks")
            overlay.patch(tasks_link(linux, tasks[10].address), struct.pack("<Q", tasks[3].address + off))

        image, linux = corrupt(default_snap, mutate)
        with image:
            start = time.monotonic()
            listing = linux.tasks()
        assert time.monotonic() - start < 10
        assert len(listing) == 11
        assert any("cycle" in line for line in listing.skipped)

    def test_pointer_to_nowhere(self, default_snap):
        """A tasks.next into unmapped space stops the walk and is reported."""
        def mutate(linux, overlay):
            overlay.patch(tasks_link(linux, linux.tasks()[5].address), struct.pack("<Q", 0xFFFF_DEAD_0000_0000))

        image, linux = corrupt(default_snap, mutate)
        with image:
            listing = linux.tasks()
        assert len(listing) == 6
        assert any("unreadable" in line for line in listing.skipped)

    def test_bad_cred_and_comm(self, default_snap):
        """A task whose cred pointer is garbage and whose comm has no NUL is still listed."""
        def mutate(linux, overlay):
            task = linux.tasks()[2].address
            t = linux.types
            overlay.patch(linux.memory.translate(task + t.offset("task_struct", "real_cred")), struct.pack("<Q", 8))
            overlay.patch(linux.memory.translate(task + t.offset("task_struct", "comm")), b"\xff" * 16)

        image, linux = corrupt(default_snap, mutate)
        with image:
            listing = linux.tasks()
        bad = listing[2]
        assert bad.uid is None and len(bad.comm) > 0
        assert any("cred" in line for line in listing.skipped)

    def test_self_loop_module_list(self, default_snap):
        """A module whose list.next points to itself is listed once."""
        def mutate(linux, overlay):
            first = linux.modules()[0].address
            link = first + linux.types.offset("module", "list")
            overlay.patch(linux.memory.translate(link), struct.pack("<Q", link))

        image, linux = corrupt(default_snap, mutate)
        with image:
            listing = linux.modules()
        assert len(listing) == 1 and listing.skipped


def test_hooked_syscall_is_flagged(default_snap):
    """A sys_call_table entry redirected outside kernel text is reported as such."""
    def mutate(linux, overlay):
        target = linux.modules()[0].base + 0x40 if linux.modules() else 0xFFFFFFFFC0001000
        overlay.patch(linux.memory.translate(linux.symbols["sys_call_table"] + 8), struct.pack("<Q", target))

    image, linux = corrupt(default_snap, mutate)
    with image:
        table = linux.syscalls()
    assert table[0].in_text and table[0].symbol.endswith("sys_read")
    assert not table[1].in_text and table[1].symbol is None
    assert sum(not e.in_text for e in table) == 1


@pytest.mark.parametrize("target", ["__start_BTF", "kallsyms"])
def test_corrupted_profile_is_a_symbol_error(default_snap, target, tmp_path, monkeypatch):
    """A smashed BTF header or kallsyms token table is a SymbolError, never a crash or a wrong answer."""
    from vmwatch.errors import SymbolError
    from vmwatch.os.linux import kallsyms

    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))  # no cached profile to fall back on
    with open_image(default_snap.dump) as image:
        overlay = Overlay(image)
        linux = Linux.from_memory(overlay, image.cpus)
        if target == "__start_BTF":
            overlay.patch(linux.memory.translate(linux.symbols["__start_BTF"]), b"\x00\x00\x00\x00")
        else:
            text = linux.kernel.text_paddr
            window = image.read(text, 64 << 20, pad=True)
            for start in kallsyms.find_token_tables(window):
                overlay.patch(text + start, b"\x01" * 600)
        with pytest.raises(SymbolError):
            Linux.from_memory(overlay, image.cpus)


def cyclic_tasks(linux, overlay):
    tasks = linux.tasks()
    overlay.patch(tasks_link(linux, tasks[10].address), struct.pack("<Q", tasks[3].address + linux.types.offset("task_struct", "tasks")))


def cyclic_modules(linux, overlay):
    first = linux.modules()[0].address
    link = first + linux.types.offset("module", "list")
    overlay.patch(linux.memory.translate(link), struct.pack("<Q", link))


def unmapped_modules(linux, overlay):
    second = linux.modules()[1].address + linux.types.offset("module", "list")
    overlay.patch(linux.memory.translate(second), struct.pack("<Q", 0xFFFF_DEAD_0000_0000))


@pytest.mark.parametrize("mutate, command, broken", [
    (cyclic_tasks, "ps", "init_task.tasks list broken after 11 entries: cycle at"),
    (cyclic_modules, "modules", "modules list broken after 1 entries: cycle at"),
    (unmapped_modules, "modules", "modules list broken after 2 entries: unreadable pointer at 0xffffdead00000000"),
    (cyclic_tasks, "syscalls", None),
])
def test_cli_on_corrupted_copy(default_snap, tmp_path, mutate, command, broken):
    """The CLI over a corrupted copy of the dump ends in bounded time, exit 0, one warning line naming the list."""
    path = corrupt_copy(default_snap, tmp_path, mutate)
    start = time.monotonic()
    result = run_cli(command, path, "--json")
    assert time.monotonic() - start < 60
    assert result.status == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("vmwatch: warning:")]
    if broken is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and broken in warnings[0], result.stderr


def test_hostile_kworker_name(default_snap):
    """A kworker whose struct kthread pointer is garbage keeps its raw comm; a desc without NUL
    is cut at the 24 bytes of worker.desc."""
    state = {}

    def mutate(linux, overlay):
        workers = [t for t in linux.tasks() if t.name != t.comm and t.comm.startswith("kworker/")]
        t = linux.types
        bad, long = workers[0], workers[1]
        state.update(bad=bad.pid, long=long.pid, comm=long.comm)
        overlay.patch(linux.memory.translate(bad.address + t.offset("task_struct", "worker_private")),
                      struct.pack("<Q", 0xFFFF_DEAD_0000_0000))
        kthread = linux.memory.pointer(long.address + t.offset("task_struct", "worker_private"))
        worker = linux.memory.pointer(kthread + t.offset("kthread", "data"))
        overlay.patch(linux.memory.translate(worker + t.offset("worker", "desc")), b"A" * 24)

    image, linux = corrupt(default_snap, mutate)
    with image:
        tasks = {t.pid: t for t in linux.tasks()}
    assert tasks[state["bad"]].name == tasks[state["bad"]].comm
    assert tasks[state["long"]].name[len(state["comm"]) + 1:] == "A" * 24


@pytest.mark.parametrize("mutate", [cyclic_tasks, cyclic_modules, unmapped_modules])
def test_watch_with_shipped_packs_on_corrupted_copy(default_snap, tmp_path, mutate):
    """The security and timeline packs (which walk tasks and modules) over a corrupted copy end in
    bounded time, exit 0, with their alerts in the timeline; the broken list is named on stderr."""
    path = corrupt_copy(default_snap, tmp_path, mutate)
    db = tmp_path / "t.db"
    start = time.monotonic()
    result = run_cli("watch", path, "--rules", "security", "--rules", "timeline", "--json", "--db", db)
    assert time.monotonic() - start < 120
    assert result.status == 0, result.stderr
    assert "Traceback" not in result.stderr
    broken = [line for line in result.stderr.splitlines() if "list_broken" in line]
    assert broken and all("list=init_task.tasks" in line or "list=modules" in line for line in broken), result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed[-1]["event"] == "SourceEnded"
    stored = [json.loads(line) for line in run_cli("timeline", db, "--json").stdout.splitlines()]
    assert [e.get("rule") for e in stored] == [e.get("rule") for e in printed]
