"""The shared read path: bisect over runs, spans, holes, padding, batching, validation at open."""

from __future__ import annotations

import mmap
import os

import pytest

from vmwatch.errors import ImageFormatError, PhysicalReadError, UnsupportedOperation
from vmwatch.images import Run, open_image
from vmwatch.images.base import Image, validate_runs
from vmwatch.testing import imagebuilders as build


@pytest.fixture
def lime3(tmp_path):
    """Three ranges: 0x1000-0x2fff, 0x3000-0x3fff (adjacent), 0x10000-0x10fff (after a hole)."""
    a, b, c = os.urandom(0x2000), os.urandom(0x1000), os.urandom(0x1000)
    path = tmp_path / "three.lime"
    path.write_bytes(build.lime([(0x1000, a), (0x3000, b), (0x10000, c)]))
    with open_image(path) as img:
        yield img, a, b, c


class TestReads:
    def test_read_inside_one_run(self, lime3):
        """A read inside a run returns exactly the stored bytes."""
        img, a, _, c = lime3
        assert img.read(0x1010, 32) == a[0x10:0x30]
        assert img.read(0x10FFF, 1) == c[-1:]

    def test_read_spanning_adjacent_runs(self, lime3):
        """A read crossing from one run into the next is stitched together."""
        img, a, b, _ = lime3
        assert img.read(0x2FF0, 0x20) == a[-0x10:] + b[:0x10]

    def test_unmapped_raises_with_address(self, lime3):
        """Any unmapped byte raises PhysicalReadError naming the request."""
        img, *_ = lime3
        for paddr, size in ((0, 1), (0x3FF0, 0x20), (0x11000, 8), (0xFFF, 2)):
            with pytest.raises(PhysicalReadError) as exc:
                img.read(paddr, size)
            assert exc.value.paddr == paddr and exc.value.length == size

    def test_pad_fills_holes_with_zeros(self, lime3):
        """pad=True returns zeros for the unmapped parts and data for the rest."""
        img, _, b, c = lime3
        out = img.read(0x3F00, 0xC200, pad=True)
        assert out[:0x100] == b[-0x100:]
        assert out[0x100:0xC100] == bytes(0xC000)
        assert out[0xC100:] == c[:0x100]

    def test_read_into_matches_read(self, lime3):
        """read_into fills a caller buffer with the same bytes read returns."""
        img, *_ = lime3
        buf = bytearray(0x1800)
        img.read_into(0x2800, buf)
        assert bytes(buf) == img.read(0x2800, 0x1800)
        with pytest.raises(PhysicalReadError):
            img.read_into(0x3800, bytearray(0x1000))

    def test_read_many_marks_unmapped_as_none(self, lime3):
        """Batched reads give None exactly where a plain read would raise."""
        img, a, *_ = lime3
        assert img.read_many([(0x1000, 4), (0x5000, 4), (0x2FFE, 4)]) == [a[:4], None, img.read(0x2FFE, 4)]

    def test_size_and_is_mapped(self, lime3):
        """size is the highest backed address + 1; is_mapped agrees with reads."""
        img, *_ = lime3
        assert img.size == 0x11000
        assert img.is_mapped(0x1000, 0x3000) and not img.is_mapped(0x1000, 0x3001)

    def test_write_is_unsupported(self, lime3):
        """Images are read-only."""
        img, *_ = lime3
        assert not img.writable and not img.volatile
        with pytest.raises(UnsupportedOperation):
            img.write(0x1000, b"x")


class TestZeroRuns:
    def test_memsz_tail_reads_as_zeros(self, tmp_path):
        """An ELF PT_LOAD with p_filesz < p_memsz reads its tail as zeros (a run without file offset)."""
        data = os.urandom(0x1000)
        path = tmp_path / "tail.elf"
        path.write_bytes(build.qemu_elf([build.Load(0x100000, data, memsz=0x3000)]))
        with open_image(path) as img:
            assert [(r.start, r.size, r.file_offset is None) for r in img.runs] == [
                (0x100000, 0x1000, False), (0x101000, 0x2000, True)]
            assert img.read(0x100FF0, 0x20) == data[-0x10:] + bytes(0x10)


class TestValidation:
    def _image(self, tmp_path, runs, size=0x4000):
        path = tmp_path / "data.bin"
        path.write_bytes(bytes(size))
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return Image(path, data=mm, runs=runs)  # closes the map itself if the runs are bad

    def test_overlapping_runs_rejected(self, tmp_path):
        """Two runs covering the same physical byte are a corrupt map."""
        with pytest.raises(ImageFormatError, match="overlaps"):
            self._image(tmp_path, [Run(0, 0x2000, 0), Run(0x1FFF, 0x10, 0)])

    def test_run_past_eof_rejected(self, tmp_path):
        """A run whose bytes would lie past the end of the data is rejected at open."""
        with pytest.raises(ImageFormatError, match="past|needs file bytes"):
            self._image(tmp_path, [Run(0, 0x2000, 0x3000)])

    def test_absurd_address_rejected(self, tmp_path):
        """Runs beyond the 52-bit physical space are rejected."""
        with pytest.raises(ImageFormatError, match="52-bit"):
            self._image(tmp_path, [Run(1 << 60, 0x1000, 0)])

    def test_runs_sorted_and_empty_dropped(self, tmp_path):
        """Validation sorts runs and drops empty ones."""
        runs = validate_runs([Run(0x2000, 0x10, 0), Run(0, 0, 0), Run(0, 0x10, 0)], 0x100, "x")
        assert [r.start for r in runs] == [0, 0x2000]


class TestView:
    def test_view_is_zero_copy_and_bounded(self, lime3):
        """view() returns the stored bytes without copying, only inside one file-backed run."""
        img, a, *_ = lime3
        v = img.view(0x1100, 0x100)
        assert isinstance(v, memoryview) and bytes(v) == a[0x100:0x200]
        v.release()
        with pytest.raises(PhysicalReadError):
            img.view(0x2FF0, 0x20)  # crosses into the next run
        with pytest.raises(PhysicalReadError):
            img.view(0x5000, 1)
