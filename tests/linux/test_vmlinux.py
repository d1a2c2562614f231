"""vmlinux symbol files without a guest: both DWARF engines against gcc, cache, hostile files.

The real Debian -dbg vmlinux is exercised by test_i386_dbg.py; here a C program compiled with
-g stands in (the same one test_dwarf.py checks against offsetof).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import SymbolError
from vmwatch.os.linux import vmlinux
from vmwatch.os.linux.btf import BtfProfile
from vmwatch.os.linux.isf import IsfProfile
from vmwatch.os.linux.symbols import load_symbols_file

from .symfiles import load_or_refused
from .test_dwarf import compiled  # noqa: F401 - the fixture

MEMBERS = ("pid", "tgid", "tasks", "a", "b", "c", "real_cred", "comm", "type", "matrix")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("engine", ["pahole", "pyelftools"])
def test_engines_agree_with_the_compiler(compiled, engine, monkeypatch):  # noqa: F811
    """pahole's BTF and the pyelftools reader both give gcc's offsetof and sizeof."""
    if engine == "pyelftools":
        monkeypatch.setattr(vmlinux, "_pahole", lambda: None)
    elif vmlinux._pahole() is None:
        pytest.skip("pahole (Debian package dwarves) is missing")
    path, truth = compiled
    types = load_symbols_file(str(path)).types
    assert isinstance(types, BtfProfile if engine == "pahole" else IsfProfile)
    for member in MEMBERS:
        assert types.offset("task_struct", member) == truth[member], member
    assert types.struct("task_struct").size == truth["size"]


def test_second_load_comes_from_the_cache(compiled, monkeypatch):  # noqa: F811
    """The derived profile is reused by file identity; rewriting the file derives it again."""
    path, _ = compiled
    first = load_symbols_file(str(path))

    def derive_again(_path):
        raise SymbolError("derived again")

    monkeypatch.setattr(vmlinux, "_derive", derive_again)
    again = load_symbols_file(str(path))
    assert again.symbols["init_task"] == first.symbols["init_task"]
    assert again.types.offset("task_struct", "comm") == first.types.offset("task_struct", "comm")
    path.write_bytes(path.read_bytes())  # same bytes, new identity (mtime)
    with pytest.raises(SymbolError, match="derived again"):
        load_symbols_file(str(path))


def test_symbol_table_matches_nm(compiled):  # noqa: F811
    """Every function and object our .symtab reader finds, nm finds at the same address."""
    import shutil
    import subprocess

    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    path, _ = compiled
    symbols = load_symbols_file(str(path)).symbols
    nm = {}
    for line in subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtDdBbRr":
            nm.setdefault(parts[2], int(parts[0], 16))
    assert {"main", "init_task"} <= set(symbols.names)
    for name in ("main", "init_task"):
        assert symbols[name] == nm[name]
    assert symbols.type_of("main") == "T"


def test_wrong_architecture(compiled, tmp_path):  # noqa: F811
    """An ELF for another machine (AArch64 here) is refused by name, before any DWARF is read."""
    path, _ = compiled
    blob = bytearray(path.read_bytes())
    struct.pack_into("<H", blob, 18, 183)  # e_machine = EM_AARCH64
    other = tmp_path / "vmlinux-arm64"
    other.write_bytes(bytes(blob))
    with pytest.raises(SymbolError, match="EM_AARCH64, not an x86 kernel"):
        load_symbols_file(str(other))


@pytest.mark.parametrize("keep", [16, 64, 0x200, 0.5, 0.9])
def test_truncated(compiled, tmp_path, keep):  # noqa: F811
    """A file cut anywhere: SymbolError, never another exception."""
    path, _ = compiled
    blob = path.read_bytes()
    cut = tmp_path / "vmlinux"
    cut.write_bytes(blob[:int(keep * len(blob)) if isinstance(keep, float) else keep])
    with pytest.raises(SymbolError):
        load_symbols_file(str(cut)).types.struct("task_struct")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_tables(compiled, tmp_path_factory, data):  # noqa: F811
    """Bytes smashed in the ELF and section headers, .symtab and .strtab: a profile or SymbolError."""
    from elftools.elf.elffile import ELFFile

    path, _ = compiled
    blob = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        elf = ELFFile(f)
        regions = [(0, 64), (elf.header["e_shoff"], elf.header["e_shnum"] * elf.header["e_shentsize"])]
        regions += [(s["sh_offset"], s["sh_size"]) for s in elf.iter_sections() if s.name in (".symtab", ".strtab")]
    for _ in range(data.draw(st.integers(1, 12))):
        start, size = data.draw(st.sampled_from(regions))
        blob[start + data.draw(st.integers(0, size - 1))] = data.draw(st.integers(0, 255))
    target = tmp_path_factory.mktemp("fuzz") / "vmlinux"
    target.write_bytes(bytes(blob[:data.draw(st.integers(1, len(blob)))] if data.draw(st.booleans()) else blob))
    def symbols_agree(found) -> None:
        if found.symbols is not None:
            assert len(found.symbols.names) == len(found.symbols.addresses)

    load_or_refused(target, SymbolError, symbols_agree)
