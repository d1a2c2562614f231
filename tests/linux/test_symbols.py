"""Symbol files (System.map, ISF, libvmi.conf) and the ISF export, without a guest."""

from __future__ import annotations

import json
import lzma
import os

import pytest

from vmwatch.errors import SymbolError
from vmwatch.os.linux.btf import BtfProfile
from vmwatch.os.linux.isf import IsfProfile, export_isf
from vmwatch.os.linux.kallsyms import Symbols
from vmwatch.os.linux.symbols import load_symbols_file
from vmwatch.testing.cli import run_cli

from .btfgen import BtfBuilder
from .test_btf import HOST_BTF, sample

FAKE_SYMBOLS = Symbols(["_text", "linux_banner", "init_task", "current_task"],
                       [0xFFFFFFFF9A000000, 0xFFFFFFFF9B000100, 0xFFFFFFFF9C000000, 0x1FB80], "TDDA")
SLIDE = 0x19000000


def export(types) -> dict:
    return export_isf(types, FAKE_SYMBOLS, slide=SLIDE, banner=b"Linux version 6.1.0-test\n\0")


class TestIsfExport:
    def test_round_trip_of_offsets(self, tmp_path):
        """Every member vmwatch finds in the BTF is found at the same offset through the exported ISF."""
        btf = BtfProfile(sample())
        path = tmp_path / "k.json"
        path.write_text(json.dumps(export(btf)))
        isf = load_symbols_file(str(path)).types
        for name in ("task_struct", "list_head", "flags"):
            want = btf.struct(name).members
            got = isf.struct(name).members
            assert set(got) == set(want)
            for member, m in want.items():
                assert (got[member].offset, got[member].bit_offset, got[member].bit_size) == (
                    m.offset, m.bit_offset, m.bit_size), (name, member)
        assert isf.enum("pid_type") == btf.enum("pid_type")

    def test_symbols_are_link_time(self, tmp_path):
        """Addresses are unslid except absolute (per-CPU) ones; the banner is embedded for matching."""
        doc = export(BtfProfile(sample()))
        assert doc["symbols"]["_text"]["address"] == 0xFFFFFFFF81000000
        assert doc["symbols"]["current_task"]["address"] == 0x1FB80
        assert doc["symbols"]["linux_banner"]["constant_data"]
        assert doc["symbols"]["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}

    @pytest.mark.skipif(not os.path.exists(HOST_BTF), reason="host kernel has no BTF")
    def test_host_kernel(self, tmp_path):
        """The host kernel's whole BTF exports; task_struct offsets survive the trip through .json.xz."""
        with open(HOST_BTF, "rb") as f:
            btf = BtfProfile(f.read())
        path = tmp_path / "host.json.xz"
        with lzma.open(path, "wt") as out:
            json.dump(export(btf), out)
        isf = load_symbols_file(str(path))
        assert isinstance(isf.types, IsfProfile)
        for member in ("pid", "tgid", "comm", "tasks", "real_parent", "mm", "cred", "start_time"):
            assert isf.types.offset("task_struct", member) == btf.offset("task_struct", member)
        assert isf.symbols["_text"] == 0xFFFFFFFF81000000


class TestSymbolFiles:
    def test_system_map(self, tmp_path):
        """A System.map gives link-time symbols; kallsyms from memory are slid onto them."""
        path = tmp_path / "System.map"
        path.write_text("".join(f"ffffffff81{i:06x} T sym{i}\n" for i in range(20))
                        + "ffffffff81000000 T _text\nffffffff82000000 D only_in_map\n")
        sf = load_symbols_file(str(path))
        merged = sf.merge_symbols(Symbols(["_text"], [0xFFFFFFFF81000000 + SLIDE], "T"), 0xFFFFFFFF81000000 + SLIDE)
        assert merged["only_in_map"] == 0xFFFFFFFF82000000 + SLIDE

    def test_proc_kallsyms_saved_as_a_system_map(self, tmp_path):
        """arm64's /proc/kallsyms starts at _stext and lists modules' symbols after the kernel's:
        slid on _stext, modules' lines left out (their addresses are no link-time ones)."""
        stext = 0xFFFF800008010000
        path = tmp_path / "kallsyms"
        path.write_text(f"{stext:016x} T _stext\n" + "".join(f"{stext + 16 * i:016x} t fn{i}\n" for i in range(1, 30))
                        + "ffff800000f10000 t tcp_vegas_init\t[tcp_vegas]\n")
        sf = load_symbols_file(str(path))
        assert "tcp_vegas_init" not in sf.symbols.names and len(sf.symbols.names) == 30
        runtime = Symbols(["_stext", "fn1"], [stext + SLIDE, stext + 16 + SLIDE], "TT")
        merged = sf.merge_symbols(runtime, stext + SLIDE - 0x10000)
        assert merged["fn29"] == stext + 16 * 29 + SLIDE
        moved = Symbols(["_stext"] + [f"fn{i}" for i in range(1, 30)],
                        [stext + SLIDE] + [stext + 16 * i + SLIDE + 8 for i in range(1, 30)], "T" * 30)
        with pytest.raises(SymbolError, match="not this kernel's"):
            sf.merge_symbols(moved, stext + SLIDE - 0x10000)

    def test_debian_stub_system_map(self, tmp_path):
        """Debian's stub System.map is refused with a pointer to the -dbg package."""
        path = tmp_path / "System.map"
        path.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
        with pytest.raises(SymbolError, match="dbg"):
            load_symbols_file(str(path))

    def test_libvmi_conf(self, tmp_path):
        """A libvmi.conf entry becomes a profile with its hand-written task_struct offsets."""
        (tmp_path / "System.map").write_text("".join(f"ffffffff81{i:06x} T s{i}\n" for i in range(20))
                                             + "ffffffff81000000 T _text\nffffffff82000000 D init_task\n")
        conf = tmp_path / "libvmi.conf"
        conf.write_text('debian { ostype = "Linux"; sysmap = "System.map"; linux_name = 0x758; '
                        "linux_tasks = 0x420; linux_mm = 0x470; linux_pid = 0x4f0; linux_pgd = 0x48; }\n")
        sf = load_symbols_file(str(conf))
        assert sf.types.offset("task_struct", "tasks") == 0x420
        assert sf.types.offset("task_struct", "comm") == 0x758
        assert sf.types.offset("mm_struct", "pgd") == 0x48
        assert sf.symbols["init_task"] == 0xFFFFFFFF82000000

    @pytest.mark.parametrize("content", [b"", b"hello world\n", b"{not json", b"\x7fELF\x02\x01\x01" + bytes(100),
                                         b'{"user_types": 5}', b"\xfd7zXZ\x00garbage"])
    def test_garbage(self, tmp_path, content):
        """Empty, random, truncated and mislabelled files raise SymbolError."""
        path = tmp_path / "f"
        path.write_bytes(content)
        with pytest.raises(SymbolError):
            load_symbols_file(str(path))

    def test_isf_with_odd_entries(self, tmp_path):
        """ISF lookups of missing or malformed entries raise SymbolError, not KeyError/TypeError."""
        path = tmp_path / "odd.json"
        path.write_text(json.dumps({"user_types": {"task_struct": {"kind": "struct", "size": 8, "fields": {
            "x": {"offset": 0, "type": {"kind": "struct", "name": "nowhere"}}}}}}))
        isf = load_symbols_file(str(path)).types
        with pytest.raises(SymbolError):
            isf.size_of(isf.struct("task_struct").members["x"].type_id)
        with pytest.raises(SymbolError):
            isf.member("task_struct", "y")


class TestCli:
    def test_missing_file(self, tmp_path):
        """A target that does not exist is one line and status 2."""
        result = run_cli("ps", str(tmp_path / "nope.elf"))
        assert result.status == 2 and result.stderr.count("\n") == 1

    def test_image_without_kernel(self, tmp_path):
        """Memory with no kernel in it is a clear error, not a traceback."""
        path = tmp_path / "zeros.raw"
        path.write_bytes(bytes(1 << 20))
        result = run_cli("ps", str(path), "--json")
        assert result.status == 2
        assert "kallsyms" in result.stderr and "Traceback" not in result.stderr

    def test_real_lime_slice_without_kernel(self):
        """A real LiME capture slice (low memory only) has no kernel: one line, status 2."""
        sample = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "samples", "lime",
                              "deb-x86_64-slice.lime")
        if not os.path.exists(sample):
            pytest.skip("shared samples not present")
        result = run_cli("ps", sample)
        assert result.status == 2 and "no kallsyms" in result.stderr and result.stderr.count("\n") == 1

    def test_bad_symbols_file(self, tmp_path):
        """A bad --symbols file is reported before anything else goes wrong."""
        bad = tmp_path / "bad.map"
        bad.write_text("nonsense\n")
        zeros = tmp_path / "zeros.raw"
        zeros.write_bytes(bytes(1 << 20))
        result = run_cli("modules", str(zeros), "--symbols", str(bad))
        assert result.status == 2


def test_builder_is_consistent():
    """The hand-built blob helper itself produces a parseable header (guards the other tests)."""
    assert len(BtfProfile(BtfBuilder().blob())) == 1
