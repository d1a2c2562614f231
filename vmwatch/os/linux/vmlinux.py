"""A vmlinux ELF as a symbol file: ``.symtab`` for addresses, ``.BTF`` or DWARF for types.

Debian's ``linux-image-*-dbg`` vmlinux is some 300 MB, 150 MB of it ``.debug_info``: pyelftools
needs more than ten minutes just to open that DWARF, so types come from ``pahole
--btf_encode_detached`` (Debian package ``dwarves``), which turns it into BTF in seconds, and
the BTF parser does the rest. Without pahole, small DWARF (a test program) is read with
pyelftools (dwarf.py); big DWARF is refused with the name of the package to install.

What was derived (symbols and the BTF blob) is cached under ``~/.cache/vmwatch/linux``, keyed by
the file's identity (path, device, inode, size, mtime): the first load of a -dbg vmlinux takes
some seconds, the next ones milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from array import array

from vmwatch.errors import SymbolError
from vmwatch.os.linux import _cache
from vmwatch.os.linux.kallsyms import Symbols

EM_386, EM_X86_64 = 3, 62
PYELFTOOLS_DWARF_LIMIT = 16 << 20
"""Larger ``.debug_info`` than this needs pahole: pyelftools would take minutes to hours."""
_SYM32 = struct.Struct("<IIIBBH")   # st_name, st_value, st_size, st_info, st_other, st_shndx
_SYM64 = struct.Struct("<IBBHQQ")   # st_name, st_info, st_other, st_shndx, st_value, st_size
_STT_LETTERS = {0: "D", 1: "D", 2: "T"}  # NOTYPE, OBJECT, FUNC


def file_key(path: str) -> str:
    """Cache key of a file's identity (rewriting or replacing it changes the key)."""
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()


def read_vmlinux(path: str):
    """(symbols or None, types or None) of a vmlinux, derived once and cached.

    Raises:
        SymbolError: not an x86 ELF, truncated, corrupt, or without symbols and types.
    """
    from vmwatch.os.linux.btf import load_profile

    key = file_key(path)
    cached = _cache.load("vmlinux", key)
    if isinstance(cached, tuple) and len(cached) == 4:
        names, addresses, types, blob = cached
    else:
        names, addresses, types, blob = _derive(path)
        _cache.store("vmlinux", key, (names, addresses, types, blob))
    symbols = None
    if names:
        table = array("Q")
        table.frombytes(addresses)
        symbols = Symbols(names, table, types)
    profile = None
    if isinstance(blob, bytes):
        profile = load_profile(blob)
    elif blob == "dwarf-pyelftools":
        from vmwatch.os.linux.dwarf import isf_from_dwarf
        from vmwatch.os.linux.isf import IsfProfile

        profile = IsfProfile(isf_from_dwarf(path))
    if symbols is None and profile is None:
        raise SymbolError(f"{path}: vmlinux has neither .symtab nor types (.BTF or DWARF)")
    return symbols, profile


def _derive(path: str) -> tuple[str, bytes, str, bytes | str | None]:
    """(names joined by newlines, addresses as u64 bytes, nm letters, BTF blob | marker | None)."""
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            machine = elf.header["e_machine"]
            if machine not in ("EM_386", "EM_X86_64"):
                raise SymbolError(f"{path}: an ELF file for {machine}, not an x86 kernel")
            names, addresses, types = _symtab(elf, f)
            btf = elf.get_section_by_name(".BTF")
            blob = btf.data() if btf is not None else None
            if btf is not None and len(blob) != btf["sh_size"]:
                raise SymbolError(f"{path}: .BTF section runs past the end of the file")
            debug_info = elf.get_section_by_name(".debug_info")
            dwarf_size = debug_info["sh_size"] if debug_info is not None else 0
            if dwarf_size and debug_info["sh_offset"] + dwarf_size > os.path.getsize(path):
                raise SymbolError(f"{path}: truncated (.debug_info runs past the end of the file)")
    except SymbolError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises anything on a corrupt file
        raise SymbolError(f"{path}: unreadable vmlinux ({type(exc).__name__}: {exc})") from None
    if blob is None and dwarf_size:
        if _pahole() is not None:
            blob = btf_from_dwarf(path)
        elif dwarf_size <= PYELFTOOLS_DWARF_LIMIT:
            blob = "dwarf-pyelftools"
        else:
            raise SymbolError(f"{path}: {dwarf_size >> 20} MB of DWARF needs pahole "
                              "(install the Debian package dwarves)")
    return names, addresses, types, blob


def _symtab(elf, f) -> tuple[str, bytes, str]:
    """Function and object symbols with an address, read straight from the section bytes."""
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return "", b"", ""
    strtab = elf.get_section(symtab["sh_link"])
    raw, strings = symtab.data(), strtab.data()
    if len(raw) != symtab["sh_size"] or len(strings) != strtab["sh_size"]:
        raise SymbolError("the symbol table runs past the end of the file")
    is64 = elf.elfclass == 64
    layout = _SYM64 if is64 else _SYM32
    raw = raw[:len(raw) - len(raw) % layout.size]
    names, addresses, letters = [], array("Q"), []
    for entry in layout.iter_unpack(raw):
        if is64:
            name_off, info, _, _, value, _ = entry
        else:
            name_off, value, _, info, _, _ = entry
        kind = info & 0xF
        if not value or kind not in _STT_LETTERS or not name_off:
            continue
        end = strings.find(b"\0", name_off)
        if end <= name_off:
            continue
        letter = _STT_LETTERS[kind]
        names.append(strings[name_off:end].decode("utf-8", "replace"))
        addresses.append(value)
        letters.append(letter.lower() if info >> 4 == 0 else letter)  # STB_LOCAL
    return "\n".join(names), addresses.tobytes(), "".join(letters)


def _pahole() -> str | None:
    return shutil.which("pahole")


def btf_from_dwarf(path: str) -> bytes:
    """BTF encoded from a file's DWARF by pahole (a -dbg vmlinux: some 15 s of CPU).

    Raises:
        SymbolError: pahole failed, timed out (corrupt input must not hang us), or wrote nothing.
    """
    timeout = 60 + 2 * (os.path.getsize(path) >> 20)
    with tempfile.TemporaryDirectory(prefix="vmwatch-btf-") as tmp:
        out = os.path.join(tmp, "btf")
        try:
            proc = subprocess.run([_pahole() or "pahole", f"--btf_encode_detached={out}", path],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SymbolError(f"{path}: pahole did not turn its DWARF into BTF within {timeout} s") from None
        except OSError as exc:
            raise SymbolError(f"cannot run pahole: {exc}") from None
        if proc.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
            detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise SymbolError(f"{path}: pahole could not read its DWARF ({detail})")
        with open(out, "rb") as f:
            return f.read()
