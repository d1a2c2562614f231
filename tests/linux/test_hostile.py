"""Corrupted kernel lists in a real dump: walks stop, say what they skipped, and never hang."""

from __future__ import annotations

import struct
import time

import pytest

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux

from .overlay import Overlay

pytestmark = pytest.mark.guest


def corrupt(snap, mutate):
    """Open the dump, let ``mutate(linux, overlay)`` patch it, and return a fresh Linux on the patch."""
    image = open_image(snap.dump)
    overlay = Overlay(image)
    clean = Linux.from_memory(overlay, image.cpus)
    mutate(clean, overlay)
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
