"""`vmwatch read` on a raw image holding FakeGuest page tables."""

from __future__ import annotations

import json
import re

import pytest

from vmwatch.cpu import PagingMode
from vmwatch.testing.cli import run_cli
from vmwatch.testing.fakeguest import FakeGuest

VADDR = 0xFFFF_FFFF_8100_0000


@pytest.fixture
def image(tmp_path):
    fake = FakeGuest(PagingMode.LEVEL4, seed=21, memory_size=1 << 20)
    fake.map(VADDR, 0x3000, 0x1000)
    fake.map(VADDR + 0x2000, 0x8000, 0x1000)
    fake.buffer[0x3000:0x3010] = b"Linux version 6."
    path = tmp_path / "guest.raw"
    path.write_bytes(fake.buffer)
    return path, fake


class TestReadCommand:
    def test_hexdump_virtual(self, image):
        """A virtual read prints address, hex bytes and ASCII."""
        path, fake = image
        result = run_cli("read", path, hex(VADDR), "--length", "32", "--dtb", hex(fake.cr3))
        assert result.status == 0, result.stderr
        first = result.stdout.splitlines()[0]
        assert first.startswith(f"{VADDR:016x}  4c 69 6e 75")
        assert "|Linux version 6.|" in first
        assert len(result.stdout.splitlines()) == 2

    def test_unaligned_and_hole(self, image):
        """Unreadable bytes show as ?? and the fault is named under the dump."""
        path, fake = image
        result = run_cli("read", path, hex(VADDR + 0xFF8), "-n", "0x10", "--dtb", hex(fake.cr3))
        assert result.status == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"{VADDR + 0xFF0:016x}                           ")
        assert "?? ?? ??" in lines[1]
        assert f"# {VADDR + 0x1000:#x}: page not present" in result.stdout

    def test_physical_json(self, image):
        """--physical --json gives the bytes at the physical address."""
        path, fake = image
        result = run_cli("read", path, "0x3000", "-n", "4", "--physical", "--json")
        assert result.status == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["physical"] and out["chunks"][0]["hex"] == b"Linu".hex()

    def test_json_translation(self, image):
        """JSON output names the physical address each chunk came from."""
        path, fake = image
        result = run_cli("read", path, hex(VADDR + 0x2004), "-n", "4", "--dtb", hex(fake.cr3), "--json")
        out = json.loads(result.stdout)
        assert out["chunks"][0]["physical_address"] == 0x8004
        assert out["chunks"][0]["hex"] == bytes(fake.buffer[0x8004:0x8008]).hex()

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["0xffffffff81001000"], "--dtb"),
            (["0xffffffff81001000", "--dtb", "{cr3}"], "page not present"),
            (["0x1234", "--physical", "-n", "0x100000000"], "--length"),
            (["0x7fffffffffff0000", "--physical"], "not mapped"),
            (["zz", "--physical"], "kallsyms|symbol"),
            (["0x1000", "--pid", "1", "--physical"], "--pid"),
            (["0x1000", "-n", "0"], "--length"),
        ],
    )
    def test_bad_input(self, image, args, message):
        """Bad addresses and lengths give exit status 2 and one line naming the problem."""
        path, fake = image
        args = [a.format(cr3=hex(fake.cr3)) for a in args]
        result = run_cli("read", path, *args)
        assert result.status == 2
        assert re.search(message, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.guest
class TestReadLive:
    def test_banner_by_symbol_matches_proc_version(self, lab_guest):
        """`vmwatch read qemu:SOCK linux_banner` shows the banner the guest itself reports."""
        version = lab_guest.shell("cat /proc/version").strip()
        result = run_cli("read", lab_guest.target, "linux_banner", "-n", "64", "--json")
        assert result.status == 0, result.stderr
        out = json.loads(result.stdout)
        data = b"".join(bytes.fromhex(chunk["hex"]) for chunk in out["chunks"])
        assert data == version.encode()[:64]

    def test_user_memory_of_a_process(self, lab_guest):
        """--pid reads a process's own address space: init's first mapping starts with its ELF header."""
        maps = lab_guest.shell("cat /proc/1/maps").split()
        start = int(maps[0].split("-")[0], 16)
        result = run_cli("read", lab_guest.target, hex(start), "--pid", "1", "-n", "16", "--json")
        assert result.status == 0, result.stderr
        out = json.loads(result.stdout)
        assert bytes.fromhex(out["chunks"][0]["hex"])[:4] == b"\x7fELF"
        assert out["pid"] == 1 and out["cr3"] is not None
