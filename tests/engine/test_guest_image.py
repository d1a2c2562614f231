"""The security pack over a real lab guest's memory dump: clean is quiet, a hooked syscall is caught."""

from __future__ import annotations

import pytest
import trio

from vmwatch.engine import ImageSource, ListSink, watch
from vmwatch.images import open_image
from vmwatch.rules import RuleSet, Severity

pytestmark = pytest.mark.guest


def _watch_image(path):
    async def main():
        with open_image(path) as image:
            sink = ListSink()
            summary = await watch(ImageSource(image, cpus=tuple(image.cpus)), RuleSet.load(["security"]), [sink])
            return summary, sink.alerts

    return trio.run(main)


def _file_offset(path, vaddr: int) -> tuple[int, int]:
    """(file offset of ``vaddr``, its original u64) in the dump, found through vmwatch's own layers."""
    from vmwatch.os.linux import Linux

    with open_image(path) as image:
        linux = Linux.from_memory(image, registers=tuple(image.cpus))
        paddr = linux.memory.translate(vaddr)
        run = next(r for r in image.runs if r.start <= paddr < r.start + r.size)
        return run.file_offset + paddr - run.start, linux.memory.u64(vaddr)


def _symbol(path, name: str) -> int:
    from vmwatch.os.linux import Linux

    with open_image(path) as image:
        return Linux.from_memory(image, registers=tuple(image.cpus)).symbols[name]


def test_clean_dump_is_quiet_and_hooked_syscall_is_caught(lab_guest, tmp_path):
    """No warning on a clean dump; after patching sys_call_table[39] in the file, a critical alert."""
    dump = lab_guest.dump(tmp_path / "guest.elf")
    summary, alerts = _watch_image(dump)
    assert not summary.rule_errors, summary
    assert [a for a in alerts if a.severity >= Severity.WARNING] == []

    slot = _symbol(dump, "sys_call_table") + 8 * 39
    offset, original = _file_offset(dump, slot)
    dump.chmod(0o600)
    with open(dump, "r+b") as f:
        f.seek(offset)
        f.write((0xFFFFC90000001000).to_bytes(8, "little"))  # vmalloc space: where a rootkit's hook lives
    summary, alerts = _watch_image(dump)
    critical = [a for a in alerts if a.severity == Severity.CRITICAL]
    assert [a.message for a in critical] == ["sys_call_table[39] points outside kernel text: 0xffffc90000001000"]
    assert critical[0].rule == "security.syscall_table" and original != 0xFFFFC90000001000
