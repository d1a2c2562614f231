"""Triage (DumpType 4) and kernel-bitmap (6) dumps of guests built around the real ntoskrnl: ps,
modules and info give what the dump holds and say what it cannot; hostile headers are one line."""

from __future__ import annotations

import json
import struct

import pytest
import trio

from vmwatch.engine import Engine, ImageSource, ListSink
from vmwatch.images import open_image
from vmwatch.rules import RuleSet
from vmwatch.testing.cli import run_cli
from vmwatch.testing.windowsguest import WindowsGuest


@pytest.fixture(scope="module")
def guest(ntoskrnl, wine_pe) -> WindowsGuest:
    g = WindowsGuest(ntoskrnl, hal=wine_pe["hal.dll"])
    g.build_objects()
    return g


@pytest.fixture
def dump(guest, tmp_path):
    def make(name: str = "tri.dmp", **options):
        path = tmp_path / name
        path.write_bytes(guest.triage_dump(**options))
        return path

    return make


def _drivers(guest):
    return [[path.rsplit("\\", 1)[-1], base, size, path] for _name, base, size, path in guest.drivers]


class TestTriage:
    def test_ps_gives_the_current_process_and_says_why_only_it(self, guest, dump):
        """ps: the copied EPROCESS (explorer.exe) decoded at the 7601 offsets, and one warning line."""
        r = run_cli("ps", dump(), "--json")
        assert r.status == 0, r.stderr
        p = guest.processes[-1]
        assert [(x["pid"], x["ppid"], x["name"], x["dtb"], x["create_time"], x["peb"]) for x in json.loads(r.stdout)] == \
            [(p.pid, p.ppid, p.name.decode(), p.dtb, p.create_time, p.peb)]
        assert "a triage dump holds one process" in r.stderr

    def test_modules_are_the_dumps_driver_list(self, guest, dump):
        """modules --json: every saved driver, name from the saved path; stride 0xa8 and 0x98 alike."""
        for stride in (0xA8, 0x98):
            r = run_cli("modules", dump(f"s{stride:x}.dmp", stride=stride), "--json")
            assert r.status == 0, r.stderr
            assert [[m["name"], m["base"], m["size"], m["path"]] for m in json.loads(r.stdout)] == _drivers(guest)

    def test_what_is_not_in_it_is_one_line(self, dump):
        """syscalls and idt on a triage dump: exit 2 and one line saying what the dump lacks."""
        path = dump()
        for command, words in (("syscalls", "service table"), ("idt", "no IDT")):
            r = run_cli(command, path)
            assert r.status == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    def test_info_lists_what_it_holds(self, guest, dump):
        """info: the Triage row and the KDBG copy's list heads, each with how it was found."""
        r = run_cli("info", dump(blocks=[(guest.kdbg_vaddr, b"\x01" * 0x40), (guest.process_head, b"\x02" * 16)]),
                    "--json")
        assert r.status == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["metadata"]["dump_type"] == "triage" and doc["metadata"]["triage_drivers"] == len(guest.drivers)
        assert doc["metadata"]["triage_memory_blocks"] == 2
        assert doc["summary"]["Triage"].startswith(f"{len(guest.drivers)} drivers, 2 memory blocks, current process")
        how = {f["what"]: (f["value"], f["how"]) for f in doc["kernel"]["found"]}
        assert how["PsActiveProcessHead"][0] == guest.process_head and how["kernel base"][1] == "KDBG KernBase"

    def test_cut_list_and_32_bit(self, guest, dump):
        """A 32-bit triage dump's driver list (TRIAGE_DUMP32 entries); a cut list is flagged.
        (The x86 guest's own triage dump, process copy decoded: tests/windows/test_windows32.py.)"""
        small = [(path, base & 0xFFFFFFFF, size) for _name, base, size, path in guest.drivers]
        r = run_cli("modules", dump("x86.dmp", bits=32, drivers=small, overflowed=True), "--json")
        assert r.status == 0, r.stderr
        assert [(m["name"], m["base"]) for m in json.loads(r.stdout)] == [(d[0].rsplit("\\", 1)[-1], d[1]) for d in small]
        assert "cut short" in r.stderr

    def test_watch_sets_windows_rules_aside(self, dump):
        """The security pack on a triage dump: no rule error; SSDT/IDT/psscan rules inactive, saying why."""
        async def main():
            with open_image(dump()) as image:
                engine = Engine(ImageSource(image, cpus=tuple(image.cpus)), RuleSet.load(["security"]), [ListSink()])
                return await engine.run()

        summary = trio.run(main)
        assert not summary.rule_errors, summary
        inactive = "\n".join(summary.inactive)
        assert "security.ssdt: a triage dump holds no kernel image" in inactive
        assert "security.unlinked_process: a triage dump holds no physical memory" in inactive


class TestHostile:
    def _patched(self, path, offset: int, fmt: str, value: int):
        data = bytearray(path.read_bytes())
        struct.pack_into(fmt, data, offset, value)
        path.write_bytes(data)
        return path

    @pytest.mark.parametrize(("field", "value", "words"), [
        (0x34, 1 << 20, "absurd DriverCount"),       # DriverCount
        (0x30, 0x7FFFFFF0, "no entry names a string in the string pool"),  # DriverListOffset
        (0x7C, 1 << 20, "absurd DataBlocksCount"),   # DataBlocksCount (with a blocks offset)
        (0x20, 0x7FFFFFF0, "past the end of the file"),  # ProcessOffset
    ])
    def test_bad_triage_fields_are_one_line(self, dump, field, value, words):
        """Each absurd TRIAGE_DUMP64 field: exit 2, one line naming it."""
        path = dump()
        if field == 0x7C:
            self._patched(path, 0x2000 + 0x78, "<I", 0x2100)
        r = run_cli("modules", self._patched(path, 0x2000 + field, "<I", value))
        assert r.status == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    def test_names_outside_the_pool(self, dump):
        """Driver name offsets that all miss the string pool: one line, not garbage names."""
        path = dump()
        self._patched(path, 0x2000 + 0x38, "<I", 0x7FFFFF00)  # StringPoolOffset
        r = run_cli("modules", path)
        assert r.status == 2 and "string pool" in r.stderr, r.stderr

    def test_truncated(self, dump):
        """A triage dump cut in its driver list: exit 2, one line."""
        path = dump()
        data = path.read_bytes()
        path.write_bytes(data[:0x2000 + 0x140])
        r = run_cli("modules", path)
        assert r.status == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_kernel_bitmap_dump(guest, tmp_path):
    """DumpType 6 (kernel memory, Windows 8+ bitmap): read like a bitmap dump; ps gives every process."""
    from vmwatch.testing.imagebuilders import windows_crashdump

    path = tmp_path / "kernel.dmp"
    path.write_bytes(windows_crashdump([(0, guest.raw())], dtb=guest.fake.cr3, dump_type=6))
    r = run_cli("ps", path, "--json")
    assert r.status == 0, r.stderr
    assert [p["pid"] for p in json.loads(r.stdout)] == [p.pid for p in guest.processes]
