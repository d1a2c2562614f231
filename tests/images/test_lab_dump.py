"""A dump of the booted lab guest: its runs cover what the guest kernel calls System RAM, and
every byte equals the guest's RAM file (memory-backend-file, offset == paddr below 3 GiB)."""

from __future__ import annotations

import mmap
import re

import pytest

from vmwatch.images import open_image

pytestmark = pytest.mark.guest


def _system_ram(iomem: str) -> list[tuple[int, int]]:
    """Top-level 'System RAM' ranges of /proc/iomem as (start, end exclusive)."""
    out = []
    for line in iomem.splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) : System RAM\s*$", line.strip("\r"))
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    return out


def test_lab_guest_dump_matches_guest_view_and_ram_file(lab_guest, tmp_path):
    """Runs cover the guest's System RAM; reads equal the RAM file byte for byte (guest paused)."""
    ram = _system_ram(lab_guest.shell("cat /proc/iomem"))
    assert ram, "the guest reported no System RAM"
    qmp = lab_guest.qmp()
    qmp.execute("stop")
    try:
        dump = lab_guest.dump(tmp_path / "lab.elf")
        with open_image(dump) as img, open(lab_guest.ram_path, "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram_file:
            assert img.format == "qemu-elf" and img.cpus and img.cpus[0].cr3
            for start, end in ram:
                assert img.is_mapped(start, end - start), f"System RAM {start:#x}-{end:#x} not in the dump"
            compared = 0
            for run in img.runs:
                if run.file_offset is None or run.end > min(len(ram_file), 0xC0000000):
                    continue
                for pos in range(run.start, run.end, 1 << 20):
                    n = min(1 << 20, run.end - pos)
                    assert img.read(pos, n) == ram_file[pos:pos + n], f"differs at {pos:#x}"
                    compared += n
            assert compared >= ram[-1][1] - ram[0][0] - (1 << 20)
    finally:
        qmp.execute("cont")


def test_lab_guest_paging_dump_with_pn_xnum(lab_guest, tmp_path):
    """paging=true: >= 0xFFFF PT_LOADs (e_phnum = PN_XNUM), repeated physical ranges merged;
    every byte equals the plain dump taken while the guest is paused."""
    qmp = lab_guest.qmp()
    qmp.execute("stop")
    try:
        paged = lab_guest.dump(tmp_path / "paged.elf", paging=True)
        plain = lab_guest.dump(tmp_path / "plain.elf")
    finally:
        qmp.execute("cont")
    with open(paged, "rb") as f:
        header = f.read(64)
    with open_image(paged) as img, open_image(plain) as ref:
        if int.from_bytes(header[56:58], "little") != 0xFFFF:
            pytest.skip(f"only {img.metadata['segments']} segments: no PN_XNUM in this guest")
        assert img.metadata["segments"] >= 0xFFFF
        assert img.runs and len(img.runs) < 100
        for run in img.runs:
            for pos in range(run.start, run.end, 1 << 20):
                n = min(1 << 20, run.end - pos)
                assert img.read(pos, n) == ref.read(pos, n), f"differs at {pos:#x}"
