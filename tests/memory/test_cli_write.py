"""`vmwatch write`: what it refuses before anything is attached (the live writes: tests/linux/test_hostile_live.py)."""

from __future__ import annotations

import pytest

from vmwatch.testing.cli import run_cli


@pytest.mark.parametrize(("args", "why"), [
    (["qemu:/nonexistent/qmp.sock", "0x1000", "90"], "add --write to mean it"),
    (["IMAGE", "0x1000", "90", "--write"], "is an image: vmwatch write changes live guests only"),
    (["qemu:/nonexistent/qmp.sock", "0x1000", "9g", "--write"], "not hex bytes: '9g'"),
    (["qemu:/nonexistent/qmp.sock", "0x1000", "", "--write"], "between 1 and 0x100000 bytes, not 0x0"),
])
def test_refused_in_one_line_and_nothing_changes(tmp_path, args, why):
    image = tmp_path / "guest.raw"
    image.write_bytes(b"\x00" * 0x2000)
    result = run_cli("write", *[str(image) if a == "IMAGE" else a for a in args])
    assert result.status == 2 and result.stderr.count("\n") == 1 and why in result.stderr, result.stderr
    assert image.read_bytes() == b"\x00" * 0x2000


def test_a_missing_guest_is_one_line():
    result = run_cli("write", "qemu:/nonexistent/qmp.sock", "0x1000", "90", "--write")
    assert result.status != 0 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
