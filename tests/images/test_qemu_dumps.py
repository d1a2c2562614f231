"""QEMU dump-guest-memory files made by a real QEMU, checked against QEMU's own view of memory."""

from __future__ import annotations

import json
import os
import re

import pytest

from vmwatch.errors import PhysicalReadError
from vmwatch.images import open_image
from vmwatch.testing.cli import run_cli


def _blob(tmp_path, name: str, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data


def _xp(q, paddr: int, count: int) -> bytes:
    """Bytes at paddr as QEMU's monitor reports them (``xp /Nxg``)."""
    out = q.hmp(f"xp /{count}xg {paddr:#x}")
    values = [int(v, 16) for v in re.findall(r"0x([0-9a-f]{16})", out.split(":", 1)[1])]
    return b"".join(v.to_bytes(8, "little") for v in values)


class TestQemuX86_64:
    def test_64m_with_vga_has_the_legacy_hole_and_known_bytes(self, qemu, tmp_path):
        """-m 64M with VGA: RAM 0-0xa0000, the VGA hole, RAM from 0xc0000, BIOS; loaded bytes read back."""
        blob_path, blob = _blob(tmp_path, "blob.bin", 0x3000)
        q = qemu("qemu-system-x86_64", "-m", "64M", "-vga", "std",
                 "-device", f"loader,file={blob_path},addr=0x2345000,force-raw=on")
        dump = q.dump(tmp_path / "d.elf")
        with open_image(dump) as img:
            assert img.format == "qemu-elf"
            starts = {r.start: r for r in img.runs}
            assert starts[0].end == 0xA0000
            assert not img.is_mapped(0xA0000, 0x20000)
            assert 0xC0000 in starts
            assert img.runs[-1].end == 1 << 32  # BIOS ends at 4 GiB
            with pytest.raises(PhysicalReadError):
                img.read(0xA0000, 16)
            assert img.read(0x2345000, len(blob)) == blob
            assert img.read(0x2345000, 64) == _xp(q, 0x2345000, 8)
            pmem = tmp_path / "bios.bin"
            reply = q.hmp(f'pmemsave 0xfffc0000 0x40000 "{pmem}"')
            assert pmem.exists(), reply
            assert img.read(0xFFFC0000, 0x40000) == pmem.read_bytes()
            cpu = img.cpus[0]
            assert cpu.rip == 0xFFF0 and cpu.cs.selector == 0xF000 and cpu.cs.base == 0xFFFF0000
            assert len(img.cpus) == 1
            runs = [{"start": r.start, "size": r.size, "file_offset": r.file_offset} for r in img.runs]
        doc = json.loads(run_cli("info", "--json", dump).stdout)
        assert doc["format"] == "qemu-elf" and doc["runs"] == runs and doc["cpus"] == 1
        assert doc["registers"][0]["rip"] == 0xFFF0
        out = tmp_path / "d.raw"
        assert run_cli("convert", dump, "-o", out).status == 0
        with open_image(out) as raw:
            assert raw.read(0x2345000, len(blob)) == blob and raw.size == 1 << 32

    def test_5g_puts_ram_above_4g(self, qemu, tmp_path):
        """-m 5G: low RAM ends at 3 GiB, the rest starts at 4 GiB; bytes loaded above 4 GiB read back.

        Only a window around the 3-4 GiB gap is dumped (``begin``/``length``), so no 5 GB file is written.
        """
        blob_path, blob = _blob(tmp_path, "high.bin", 0x2000)
        q = qemu("qemu-system-x86_64", "-m", "5G",
                 "-device", f"loader,file={blob_path},addr=0x100001000,force-raw=on")
        assert q.execute("query-memory-size-summary")["base-memory"] == 5 << 30
        begin, end = 0xBFFF0000, 0x100010000
        dump = q.dump(tmp_path / "d5g.elf", begin=begin, length=end - begin)
        with open_image(dump) as img:
            assert [r.start for r in img.runs] == [begin, 0xFFFC0000, 1 << 32]
            assert img.runs[0].end == 0xC0000000 and img.runs[2].end == end
            assert not img.is_mapped(0xC0000000, 0x1000)
            assert img.read(0x100001000, len(blob)) == blob
            assert img.read(0x100001000, 32) == _xp(q, 0x100001000, 4)
            assert img.read(0xBFFFFF00, 0x100) == _xp(q, 0xBFFFFF00, 32)

    def test_smp_gives_one_register_set_per_cpu(self, qemu, tmp_path):
        """-smp 2: two CORE and two QEMU notes, two register sets."""
        q = qemu("qemu-system-x86_64", "-m", "32M", "-smp", "2")
        with open_image(q.dump(tmp_path / "smp.elf")) as img:
            assert [c.vcpu for c in img.cpus] == [0, 1]
            assert img.metadata["notes"].count("QEMU/0") == 2

    def test_paging_dump_merges_repeated_physical_ranges(self, qemu, tmp_path):
        """paging=true: the reader accepts the PT_LOAD list QEMU writes (CPU not paging: guest-physical blocks)."""
        q = qemu("qemu-system-x86_64", "-m", "32M")
        path = tmp_path / "p.elf"
        q.execute("dump-guest-memory", paging=True, protocol=f"file:{path}")
        with open_image(path) as img:
            assert img.read(0xFFFFFFF0, 16) == _xp(q, 0xFFFFFFF0, 2)


class TestQemuI386:
    def test_i386_dump_reads_and_names_the_machine(self, qemu, tmp_path):
        """qemu-system-i386 (QEMU 7.2 writes ELF64 class, EM_386, because the BIOS block ends at 4 GiB)."""
        blob_path, blob = _blob(tmp_path, "b.bin", 0x1000)
        q = qemu("qemu-system-i386", "-m", "32M", "-device", f"loader,file={blob_path},addr=0x100000,force-raw=on")
        with open_image(q.dump(tmp_path / "i386.elf")) as img:
            assert img.metadata["machine"] == "i386"
            assert img.read(0x100000, len(blob)) == blob
            assert img.read(0xFFFFFFF0, 16) == _xp(q, 0xFFFFFFF0, 2)
            assert img.cpus[0].rip == 0xFFF0


class TestQemuOtherFormats:
    def test_kdump_outputs_are_refused_clearly(self, qemu, tmp_path):
        """QEMU's kdump-compressed output is recognised and refused with advice, not read as raw."""
        q = qemu("qemu-system-x86_64", "-m", "16M")
        fmt = "kdump-zlib"  # Debian's QEMU 7.2 has neither lzo nor snappy
        path = tmp_path / f"{fmt}.dump"
        try:
            q.execute("dump-guest-memory", paging=False, protocol=f"file:{path}", format=fmt)
        except RuntimeError as exc:  # this QEMU was built without the compressor
            pytest.skip(str(exc))
        from vmwatch.errors import ImageFormatError

        with pytest.raises(ImageFormatError, match="kdump"):
            open_image(path)
