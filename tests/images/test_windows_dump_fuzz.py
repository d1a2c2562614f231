"""Hypothesis on the crash-dump header parsers: 64- and 32-bit headers, the bitmap of DumpType 5."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vmwatch.errors import ImageFormatError
from vmwatch.images.base import Reader
from vmwatch.images.windows import PAGE, bitmap_runs, parse_header

_FILLER = {32: 0x45474150, 64: 0x4547415045474150}
# (field, 64-bit offset, 32-bit offset) of the pointer-sized fields parse_header reports
_POINTERS = (("pfn_database", 0x18, 0x14), ("ps_loaded_module_list", 0x20, 0x18),
             ("ps_active_process_head", 0x28, 0x1C), ("kdbg", 0x80, 0x60))


def _header(bits: int) -> bytearray:
    size = 0x2000 if bits == 64 else 0x1000
    out = bytearray(b"PAGE" * (size // 4))
    out[:8] = b"PAGEDU64" if bits == 64 else b"PAGEDUMP"
    struct.pack_into("<I", out, 0x88 if bits == 64 else 0x64, 0)
    return out


class TestHeader:
    @settings(max_examples=200, deadline=None)
    @given(bits=st.sampled_from([32, 64]), values=st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4),
           cpus=st.integers(0, 2**32 - 1), bugcheck=st.integers(0, 2**32 - 1),
           params=st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4))
    @example(bits=64, values=[0x45474150] * 4, cpus=0, bugcheck=0, params=[0x45474150] * 4)  # u32 filler, u64 field
    def test_fields_read_back(self, bits, values, cpus, bugcheck, params):
        """Every field written at its published offset is read back; the PAGE filler reads as None."""
        out = _header(bits)
        width = 8 if bits == 64 else 4
        fmt = "<Q" if bits == 64 else "<I"
        values = [v % 2 ** (8 * width) for v in values]
        params = [p % 2 ** (8 * width) for p in params]
        for (_name, off64, off32), value in zip(_POINTERS, values):
            struct.pack_into(fmt, out, off64 if bits == 64 else off32, value)
        struct.pack_into("<II", out, 0x34 if bits == 64 else 0x24, cpus, bugcheck)
        struct.pack_into(f"<4{fmt[1]}", out, 0x40 if bits == 64 else 0x2C, *params)
        h = parse_header(Reader(out, "h"))
        none = lambda v, w=width: None if v == _FILLER[8 * w] else v  # noqa: E731
        assert [getattr(h, name) for name, _, _ in _POINTERS] == [none(v) for v in values]
        assert (h.processors, h.bugcheck) == (none(cpus, 4), none(bugcheck, 4))
        assert h.bugcheck_parameters == tuple(none(p) for p in params)
        assert h.bits == bits and h.runs == ()

    @settings(max_examples=300, deadline=None)
    @given(bits=st.sampled_from([32, 64]), cut=st.integers(0, 0x2000),
           pokes=st.lists(st.tuples(st.integers(0, 0x1FFF), st.integers(0, 255)), max_size=16))
    def test_mutated_header(self, bits, cut, pokes):
        """A truncated or poked header parses or raises ImageFormatError; runs never exceed the header."""
        out = _header(bits)
        for pos, byte in pokes:
            if pos >= 8 and pos < len(out):
                out[pos] = byte
        out = out[:cut]
        try:
            h = parse_header(Reader(bytes(out), "h"))
        except ImageFormatError:
            return
        entry = 16 if bits == 64 else 8
        assert len(h.runs) * entry <= h.header_size


def _bitmap_dump(bitmap: bytes, bits: int, first_page: int) -> bytes:
    at = 0x2000
    out = bytearray(at + 0x38 + len(bitmap))
    out[at:at + 4] = b"SDMP"
    struct.pack_into("<Q", out, at + 0x20, first_page)
    struct.pack_into("<Q", out, at + 0x30, bits)
    out[at + 0x38:] = bitmap
    return bytes(out)


class TestBitmap:
    @settings(max_examples=300, deadline=None)
    @given(bitmap=st.lists(st.sampled_from([0, 0xFF, 0x01, 0x80, 0x5A, 0xF0, 0x0F]), max_size=64).map(bytes),
           spare=st.integers(0, 7), first_page=st.integers(0, 2**40))
    def test_runs_are_the_set_bits(self, bitmap, spare, first_page):
        """Runs cover exactly the set bits below the bit count, in order, stored back to back."""
        bits = max(0, len(bitmap) * 8 - spare)
        runs = bitmap_runs(Reader(_bitmap_dump(bitmap, bits, first_page), "b"), 0x2000)
        pages = [i for i in range(bits) if bitmap[i // 8] >> (i % 8) & 1]
        assert [r.start // PAGE + k for r in runs for k in range(r.size // PAGE)] == pages
        offset = first_page
        for r in runs:
            assert r.file_offset == offset
            offset += r.size

    @pytest.mark.parametrize("bits", [2**64 - 1, 2**40, 9])
    def test_bit_count_past_the_file(self, bits):
        """A bit count larger than the bitmap in the file is one ImageFormatError."""
        with pytest.raises(ImageFormatError, match="page bitmap"):
            bitmap_runs(Reader(_bitmap_dump(b"\xff", bits, 0x3000), "b"), 0x2000)
