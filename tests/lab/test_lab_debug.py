"""The -dbg fetch keeps one member of a .deb: checked on a package built here (no network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmwatch.errors import LabError
from vmwatch.lab.kernel import _extract_member, build_id

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is missing")

MEMBER = "./usr/lib/debug/boot/vmlinux-6.1.0-test"


@pytest.fixture
def deb(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: linux-image-test-dbg\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    boot = root / "usr" / "lib" / "debug" / "boot"
    boot.mkdir(parents=True)
    (boot / "System.map-6.1.0-test").write_text("c1000000 T _text\n")
    (boot / "vmlinux-6.1.0-test").write_bytes(Path(sys.executable).resolve().read_bytes())  # an ELF with a build id
    modules = root / "usr" / "lib" / "debug" / "lib" / "modules"
    modules.mkdir(parents=True)
    (modules / "big.ko").write_bytes(b"\0" * (1 << 20))
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(root), str(tmp_path / "t.deb")], check=True, capture_output=True)
    return tmp_path / "t.deb", boot / "vmlinux-6.1.0-test"


def test_only_the_member_is_extracted(deb, tmp_path):
    path, original = deb
    into = tmp_path / "out"
    into.mkdir()
    _extract_member(path, MEMBER, into)
    extracted = [p for p in into.rglob("*") if p.is_file()]
    assert extracted == [into / MEMBER]
    assert extracted[0].read_bytes() == original.read_bytes()
    assert build_id(extracted[0]) == build_id(original) is not None


def test_missing_member_is_a_lab_error(deb, tmp_path):
    path, _ = deb
    with pytest.raises(LabError, match="vmlinux-6.1.0-other"):
        _extract_member(path, "./usr/lib/debug/boot/vmlinux-6.1.0-other", tmp_path)


def test_build_id_of_a_non_elf_is_a_lab_error(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF" + b"\xff" * 60)
    with pytest.raises(LabError):
        build_id(bad)
