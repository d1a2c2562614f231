"""``vmwatch symbols export --format elf``: a symbol file a real gdb loads, checked against /proc/kallsyms."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from vmwatch.os.linux.elfsyms import export_elf
from vmwatch.os.linux.kallsyms import Symbols
from vmwatch.testing.cli import run_cli

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (Debian package gdb)")

GUEST_NAMES = ("_text", "schedule", "do_sys_openat2", "__x64_sys_getpid", "jiffies", "init_task",
               "sys_call_table", "linux_banner", "_sinittext")
"""Global symbols of the lab kernel, code and data, inside and outside .init."""


def gdb(symbol_file, *commands: str) -> str:
    argv = ["gdb", "-batch", "-nx", "-ex", f"symbol-file {symbol_file}"]
    for command in commands:
        argv += ["-ex", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout


def synthetic() -> Symbols:
    return Symbols(["_text", "schedule", "helper", "jiffies", "init_task", "fixed_percpu_data", "_sinittext"],
                   [0xFFFFFFFF81000000, 0xFFFFFFFF81001000, 0xFFFFFFFF81001100, 0xFFFFFFFF82000000,
                    0xFFFFFFFF82001000, 0x0, 0xFFFFFFFF83000000],
                   "TTtDDAT")


class TestExport:
    def test_sections_cover_every_placed_symbol(self, tmp_path):
        """Each symbol lies inside the NOBITS section it names; locals precede globals."""
        path = tmp_path / "k.sym"
        path.write_bytes(export_elf(synthetic()))
        with open(path, "rb") as f:
            elf = ELFFile(f)
            assert elf.elfclass == 64 and elf["e_machine"] == "EM_X86_64" and elf["e_type"] == "ET_EXEC"
            symtab = elf.get_section_by_name(".symtab")
            seen_global = False
            for sym in list(symtab.iter_symbols())[1:]:
                seen_global |= sym["st_info"]["bind"] == "STB_GLOBAL"
                assert seen_global == (sym["st_info"]["bind"] == "STB_GLOBAL"), "a local after a global"
                if sym["st_shndx"] == "SHN_ABS":
                    assert sym.name == "fixed_percpu_data"
                    continue
                section = elf.get_section(sym["st_shndx"])
                assert section["sh_type"] == "SHT_NOBITS"
                assert section["sh_addr"] <= sym["st_value"] < section["sh_addr"] + section["sh_size"]
            locals_ = sum(1 for s in list(symtab.iter_symbols())[1:] if s["st_info"]["bind"] == "STB_LOCAL")
            assert locals_ == 1 and symtab["sh_info"] == 1 + locals_

    def test_i386_kernel_is_elf32(self, tmp_path):
        """Addresses below 4 GiB give an ELF32 i386 file."""
        path = tmp_path / "k32.sym"
        path.write_bytes(export_elf(Symbols(["_text", "schedule", "jiffies"], [0xC1000000, 0xC1000100, 0xC2000000], "TTD")))
        with open(path, "rb") as f:
            elf = ELFFile(f)
            assert elf.elfclass == 32 and elf["e_machine"] == "EM_386"

    @needs_gdb
    def test_gdb_resolves_names_and_offsets(self, tmp_path):
        """A real gdb places code, data, a static and .init.text where the table says."""
        path = tmp_path / "k.sym"
        path.write_bytes(export_elf(synthetic()))
        out = gdb(path, "info symbol 0xffffffff81001108", "p/x &jiffies", "info symbol 0xffffffff82001010",
                  "info symbol 0xffffffff83000004")
        assert "helper + 8 in section .text" in out
        assert "= 0xffffffff82000000" in out
        assert "init_task + 16 in section .data" in out
        assert "_sinittext + 4 in section .text" in out


@pytest.mark.guest
@needs_gdb
def test_gdb_on_lab_kernel_agrees_with_proc_kallsyms(default_snap, lab_guest, tmp_path):
    """gdb, given the exported file of a KASLR'd lab dump, puts kernel names where /proc/kallsyms does."""
    listing = lab_guest.shell("grep -w " + " ".join(f"-e {n}" for n in GUEST_NAMES) + " /proc/kallsyms")
    truth = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in GUEST_NAMES:
            truth.setdefault(parts[2], int(parts[0], 16))
    assert set(truth) == set(GUEST_NAMES), listing
    out_file = tmp_path / "kernel.sym"
    result = run_cli("symbols", "export", default_snap.dump, "-o", out_file)
    assert result.status == 0, result.stderr
    assert "symbol-file" in result.stdout
    out = gdb(out_file, *(f"info address {name}" for name in GUEST_NAMES),
              f"info symbol {truth['schedule'] + 5:#x}", f"info symbol {truth['init_task'] + 0x10:#x}")
    found = dict((m.group(1), int(m.group(2), 16)) for m in re.finditer(r'Symbol "(\w+)" is at (0x[0-9a-f]+)', out))
    assert found == truth
    assert "schedule + 5 in section .text" in out
    assert "init_task + 16 in section .data" in out
