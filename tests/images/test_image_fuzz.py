"""Fuzz every parser: mutated valid files may open or raise ImageFormatError, nothing else, never hang."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.cli.commands.info import as_json, as_text
from vmwatch.errors import ImageFormatError, PhysicalReadError
from vmwatch.images import open_image

from corpus import valid_files

VALID = valid_files()
_counter = itertools.count()


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Truncations, byte flips, and whole little-endian fields overwritten with edge values."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "field32", "field64"]))
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        else:
            width = 4 if kind == "field32" else 8
            value = draw(st.sampled_from([0, 1, 0x3F, 0xFF, 0x1000, 0xFFFF, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
            out[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")[: len(out) - pos]
    return bytes(out)


def _exercise(img) -> None:
    """Use what was opened: reads at run edges, batched reads, the info renderings."""
    for run in img.runs[:50]:
        img.read(run.start, 1)
        img.read(run.end - 1, 1)
    img.read_many([(0, 8), (img.size, 8)])
    try:
        img.read(0, 64)
    except PhysicalReadError:
        pass
    json.dumps(as_json(img, verbose=True))
    as_text(img, verbose=True)


@pytest.mark.parametrize("name", sorted(VALID))
def test_fuzz_parser(name, tmp_path_factory):
    """Only ImageFormatError (or success) ever escapes open_image for mutated files of this format."""
    directory = tmp_path_factory.mktemp(f"fuzz-{name}")

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(VALID[name]))
    def check(data: bytes) -> None:
        path = directory / f"{next(_counter)}.img"
        path.write_bytes(data)
        try:
            with open_image(path) as img:
                _exercise(img)
        except ImageFormatError:
            pass
        finally:
            path.unlink()

    check()
