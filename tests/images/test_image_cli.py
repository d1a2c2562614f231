"""`vmwatch info` and `vmwatch convert` on built images."""

from __future__ import annotations

import json
import os

import pytest

from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

PAGE = 4096
REGS = dict(rax=0x1111, rip=0xFFFFFFFF81000000, cr3=0x1AD000, cr0=0x80050033, cr4=0x3606F0, rflags=0x246,
            idtr_base=0xFFFFFE0000000000, idtr_limit=0xFFF)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def vbox(tmp_path):
    loads = [build.Load(0, os.urandom(0xA0000)), build.Load(0xE0000000, b"", memsz=0x3000000),
             build.Load(0x100000000, os.urandom(PAGE))]
    return _write(tmp_path, "win.core", build.vbox_core(loads, [REGS], fmt=0x10006, version=(7, 0, 12), revision=159484))


@pytest.fixture
def vmss(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    data = build.vmware_checkpoint(os.urandom(2 * PAGE), regions=[(0, 0, 1), (0x100000, 1, 1)], cpus=[REGS],
                                   config='.encoding = "UTF-8"\nconfig.version = "8"\n', png=png, magic=0xBAD1BAD1)
    return _write(tmp_path, "Win7.vmss", data), png


class TestInfo:
    def test_vbox_text_like_vboxinfo(self, vbox):
        """VirtualBox: Magic, Format, 'VirtualBox X.Y.Z (revision N)', CPUs, the runs table, registers."""
        result = run_cli("info", vbox)
        assert result.status == 0, result.stderr
        out = result.stdout
        for line in ("Magic: 0xc01ac0de", "Format: 0x10006", "VirtualBox 7.0.12 (revision 159484)", "CPUs: 1"):
            assert line in out.splitlines()
        assert "File Offset" in out and "PhysMem Offset" in out
        assert "0x0000000100000000" in out and "0x0000000003000000" in out
        assert "0xffffffff81000000" in out and "CR3" in out

    def test_vmware_text_like_vmwareinfo(self, vmss):
        """VMware: magic and version, group count, runs, the tag table with numbers; hexdump with --verbose."""
        path, _ = vmss
        out = run_cli("info", path).stdout
        assert "Magic: 0xbad1bad1 (Version 1)" in out
        assert "Group count: 0x5" in out
        assert "DataOffset" in out and "cpu/CR64[0][3]" in out and "0x1ad000" in out
        assert "cpu/cpu:numVCPUs" in out
        assert "56 4d 77 61 72 65" not in out  # no hexdump without --verbose
        verbose = run_cli("info", "--verbose", path).stdout
        assert "56 4d 77 61 72 65 20 57" in verbose and "VMware.Workstati" in verbose
        assert "Snapshot/cfgFile" in verbose and ".encoding.=" in verbose

    def test_dump_dir_writes_screenshot_and_config(self, vmss, tmp_path):
        """--dump-dir writes the PNG screenshot byte for byte and the saved .vmx."""
        path, png = vmss
        out_dir = tmp_path / "shots"
        result = run_cli("info", path, "--dump-dir", out_dir)
        assert result.status == 0
        assert (out_dir / "Win7.png").read_bytes() == png
        assert 'config.version = "8"' in (out_dir / "Win7.vmx").read_text()

    @pytest.mark.parametrize("fixture", ["vbox", "vmss", "lime"])
    def test_json_shape(self, request, tmp_path, fixture):
        """--json: one object with format, runs (ints; file_offset null for zero-filled runs), cpus (int), metadata."""
        if fixture == "lime":
            path = _write(tmp_path, "l.lime", build.lime([(0x1000, bytes(PAGE))]))
        else:
            path = request.getfixturevalue(fixture)
            path = path[0] if isinstance(path, tuple) else path
        result = run_cli("info", "--json", "--verbose", path)
        assert result.status == 0
        doc = json.loads(result.stdout)
        assert isinstance(doc["format"], str) and isinstance(doc["cpus"], int)
        assert doc["runs"] and all(isinstance(r[k], int) for r in doc["runs"] for k in ("start", "size"))
        assert all(isinstance(r["file_offset"], int) or r["file_offset"] is None for r in doc["runs"])
        assert isinstance(doc["metadata"], dict)
        with open_image(path) as img:
            assert doc["runs"] == [{"start": r.start, "size": r.size, "file_offset": r.file_offset} for r in img.runs]
            assert doc["cpus"] == len(img.cpus)

    def test_json_vmware_tags(self, vmss):
        """VMware --json lists tags with numeric values."""
        doc = json.loads(run_cli("info", "--json", vmss[0]).stdout)
        tags = {t["name"]: t for t in doc["tags"]}
        assert tags["cpu/CR64[0][3]"]["value"] == 0x1AD000
        assert doc["metadata"]["magic"] == 0xBAD1BAD1


class TestConvert:
    def test_convert_is_sparse_and_exact(self, tmp_path):
        """Output: offset == paddr, holes and zero chunks left sparse, verified, size = highest address."""
        a, b = os.urandom(PAGE), os.urandom(PAGE)
        zero_tail = bytes(4 << 20)
        src = _write(tmp_path, "g.elf", build.qemu_elf([
            build.Load(0x1000, a), build.Load(0x100000, zero_tail), build.Load(0x40000000, b, memsz=2 * PAGE)]))
        out = tmp_path / "g.raw"
        result = run_cli("convert", src, "-o", out)
        assert result.status == 0, result.stderr
        assert "verified" in result.stdout
        assert out.stat().st_size == 0x40000000 + 2 * PAGE
        assert out.stat().st_blocks * 512 < 1 << 20  # 1 GiB of address space, a few pages on disk
        with open(out, "rb") as f:
            f.seek(0x1000)
            assert f.read(PAGE) == a
            f.seek(0x40000000)
            assert f.read(2 * PAGE) == b + bytes(PAGE)
        with open_image(out) as raw:
            assert raw.format == "raw" and raw.read(0x1000, PAGE) == a

    def test_convert_vmware_regions(self, vmss, tmp_path):
        """A VMware checkpoint with a region above 4 GiB converts to a raw image with that page at 4 GiB."""
        path, _ = vmss
        out = tmp_path / "v.raw"
        assert run_cli("convert", path, "-o", out).status == 0
        with open_image(path) as img, open_image(out) as raw:
            assert raw.read(1 << 32, PAGE) == img.read(1 << 32, PAGE)
            assert raw.size == img.size

    def test_refuses_to_overwrite(self, tmp_path):
        """An existing output needs --force; the error is one line, exit 2."""
        src = _write(tmp_path, "l.lime", build.lime([(0, os.urandom(PAGE))]))
        out = _write(tmp_path, "exists.raw", b"x")
        result = run_cli("convert", src, "-o", out)
        assert result.status == 2 and "--force" in result.stderr
        assert run_cli("convert", src, "-o", out, "--force").status == 0
        assert out.read_bytes()[:16] == src.read_bytes()[32:48]

    def test_verification_catches_a_bad_write(self, tmp_path, monkeypatch):
        """If the written file differs from the API read, convert fails with one line."""
        src = _write(tmp_path, "l.lime", build.lime([(0, os.urandom(PAGE))]))
        _scribble_after_convert(monkeypatch, 0, b"\0\1\2\3")
        result = run_cli("convert", src, "-o", tmp_path / "o.raw")
        assert result.status == 2 and "verification failed" in result.stderr


def _scribble_after_convert(monkeypatch, offset, data):
    """Make ``convert`` write ``data`` at ``offset`` of its output after copying, as a bad disk would."""
    from vmwatch.cli.commands import convert

    original = convert.convert

    def scribbling(image, output, advance=lambda n: None):
        written = original(image, output, advance)
        with open(output, "r+b") as f:
            f.seek(offset)
            f.write(data)
        return written

    monkeypatch.setattr(convert, "convert", scribbling)


class TestConvertSparseSource:
    @pytest.fixture
    def sparse(self, tmp_path):
        """A 1 GiB sparse raw source with two data pages."""
        a, b = os.urandom(PAGE), os.urandom(PAGE)
        path = tmp_path / "sparse.raw"
        with open(path, "wb") as f:
            f.truncate(1 << 30)
            f.seek(0x12345000)
            f.write(a)
            f.seek((1 << 30) - PAGE)
            f.write(b)
        return path, a, b

    def test_source_holes_are_skipped_and_output_is_sparse(self, sparse, tmp_path):
        """Holes in the source file stay holes; the data pages land at their addresses."""
        path, a, b = sparse
        out = tmp_path / "o.raw"
        result = run_cli("convert", path, "-o", out)
        assert result.status == 0, result.stderr
        assert out.stat().st_size == 1 << 30 and out.stat().st_blocks * 512 <= 1 << 20
        with open_image(out) as raw:
            assert raw.read(0x12345000, PAGE) == a and raw.read((1 << 30) - PAGE, PAGE) == b

    def test_verification_checks_holes_too(self, sparse, tmp_path, monkeypatch):
        """Stray data written where the source has a hole is caught by the verification."""
        path, _, _ = sparse
        _scribble_after_convert(monkeypatch, 0x20000000, b"junk")
        result = run_cli("convert", path, "-o", tmp_path / "o.raw")
        assert result.status == 2 and "differs from the image at 0x20000000" in result.stderr


class TestInfoVerbose:
    def test_verbose_shows_metadata_such_as_vmcoreinfo(self, tmp_path):
        """--verbose prints the format's metadata, multi-line text (VMCOREINFO) indented."""
        data = build.qemu_elf([build.Load(0, bytes(PAGE))], [REGS], vmcoreinfo="OSRELEASE=6.1.0-13-amd64\nPAGESIZE=4096\n")
        path = _write(tmp_path, "k.elf", data)
        out = run_cli("info", "--verbose", path).stdout
        assert "Metadata:" in out and "    OSRELEASE=6.1.0-13-amd64" in out and "notes: CORE/1, QEMU/0, VMCOREINFO/0" in out
        assert "Metadata:" not in run_cli("info", path).stdout


class TestConvertProgress:
    def test_progress_bar_on_a_terminal(self, tmp_path):
        """With a terminal stderr the rich progress bar runs and the conversion still verifies."""
        import io

        from vmwatch.cli.app import Environment, run

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        src = _write(tmp_path, "p.lime", build.lime([(0, os.urandom(4 * PAGE)), (1 << 30, os.urandom(PAGE))]))
        out, err = io.StringIO(), Tty()
        status = run(["convert", str(src), "-o", str(tmp_path / "p.raw")], Environment(stdout=out, stderr=err))
        assert status == 0 and "verified" in out.getvalue()
        with open_image(tmp_path / "p.raw") as raw:
            assert raw.read(1 << 30, PAGE) == src.read_bytes()[-PAGE:]
