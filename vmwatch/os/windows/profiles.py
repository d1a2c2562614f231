"""Structure offsets of Windows builds: built-in published layouts, libvmi.conf, Volatility ISF.

Built-in tables cover only builds whose layouts are published (sources in docs/windows.md:
Volatility 3's ISF symbol tables generated from Microsoft's public PDBs, and the Vergilius
Project's dumps of the same PDBs). An unknown build without a profile is a SymbolError that
names the build and says how to pass ``--symbols``: offsets are never guessed.
"""

from __future__ import annotations

import os
import re

import attrs

from vmwatch.errors import SymbolError

# _KLDR_DATA_TABLE_ENTRY and _UNICODE_STRING are the same on every x64 build since Vista, and on
# every x86 one (its 32-bit pointers: DllBase 0x18, names 0x24/0x2C, UNICODE_STRING.Buffer at +4).
_LDR_X64 = {"InLoadOrderLinks": 0x0, "DllBase": 0x30, "SizeOfImage": 0x40, "FullDllName": 0x48,
            "BaseDllName": 0x58}
_LDR_X86 = {"InLoadOrderLinks": 0x0, "DllBase": 0x18, "SizeOfImage": 0x20, "FullDllName": 0x24,
            "BaseDllName": 0x2C}


@attrs.frozen
class Profile:
    """Offsets vmwatch needs for one Windows build (x64 or x86)."""

    name: str
    eprocess: dict[str, int]
    """_EPROCESS members: DirectoryTableBase (Pcb), CreateTime, UniqueProcessId,
    ActiveProcessLinks, InheritedFromUniqueProcessId, ImageFileName, Peb, ExitTime (missing ones: None)."""
    ldr: dict[str, int] = attrs.field(factory=lambda: dict(_LDR_X64))
    symbols: dict[str, int] = attrs.field(factory=dict)
    """Kernel symbols as RVAs from the kernel base (ISF), for what the exports lack."""
    kdbg_vaddr: int | None = None
    """libvmi.conf ``win_kdvb``: the KDBG's virtual address."""
    source: str = "built-in"
    bits: int = 64
    """The kernel's pointer size in bits: 32 (x86, PAE or not) or 64."""


_WIN7_SP1 = {"DirectoryTableBase": 0x28, "CreateTime": 0x168, "UniqueProcessId": 0x180,
             "ActiveProcessLinks": 0x188, "InheritedFromUniqueProcessId": 0x290,
             "ImageFileName": 0x2E0, "Peb": 0x338, "ExitTime": 0x170}
_WIN10_19041 = {"DirectoryTableBase": 0x28, "CreateTime": 0x468, "UniqueProcessId": 0x440,
                "ActiveProcessLinks": 0x448, "InheritedFromUniqueProcessId": 0x540,
                "ImageFileName": 0x5A8, "Peb": 0x550, "ExitTime": 0x840}

_WIN7_SP1_X86 = {"DirectoryTableBase": 0x18, "CreateTime": 0xA0, "UniqueProcessId": 0xB4,
                 "ActiveProcessLinks": 0xB8, "InheritedFromUniqueProcessId": 0x140,
                 "ImageFileName": 0x16C, "Peb": 0x1A8, "ExitTime": 0xA8}

BUILTIN: dict[int, Profile] = {
    7601: Profile("Windows 7 SP1 x64 (7601)", _WIN7_SP1),
    **{build: Profile(f"Windows 10 x64 ({build}, 19041 kernel)", _WIN10_19041)
       for build in (19041, 19042, 19043, 19044, 19045)},
}
BUILTIN_X86: dict[int, Profile] = {
    7601: Profile("Windows 7 SP1 x86 (7601)", _WIN7_SP1_X86, dict(_LDR_X86), bits=32),
}
EPROCESS_MEMBERS = tuple(_WIN7_SP1)


def builtin(build: int | None, bits: int = 64) -> Profile:
    """The built-in profile of ``build`` for a ``bits``-bit kernel.

    Raises:
        SymbolError: no published layout is built in for this build.
    """
    table = BUILTIN if bits == 64 else BUILTIN_X86
    if build in table:
        return table[build]
    known = ", ".join(str(b) for b in sorted(table))
    what = f"Windows build {build}" if build is not None else "this Windows build (NtBuildNumber unreadable)"
    what += "" if bits == 64 else " (32-bit)"
    raise SymbolError(f"{what} has no built-in offsets (built in: {known}): pass --symbols with a "
                      "Volatility 3 Windows ISF (.json/.json.xz) for its ntoskrnl PDB, or a libvmi.conf "
                      "entry with win_tasks, win_pdbase, win_pid and win_pname")


def load_profile(path: str, bits: int = 64) -> Profile:
    """A profile from a Volatility 3 Windows ISF or a libvmi.conf Windows entry, for a ``bits``-bit
    kernel (an ISF states its own pointer size; a libvmi.conf entry does not).

    Raises:
        SymbolError: unreadable, or it lacks the _EPROCESS members processes need.
    """
    if path.endswith((".json", ".json.xz")) or path.endswith(".xz"):
        return _isf(path, bits)
    return _libvmi(path, bits)


def _isf(path: str, bits: int) -> Profile:
    from vmwatch.os.linux.isf import read_isf

    doc = read_isf(path)
    types = doc.get("user_types") or {}
    eprocess = _fields(path, types, "_EPROCESS", EPROCESS_MEMBERS[1:])
    kprocess = _fields(path, types, "_KPROCESS", ("DirectoryTableBase",))
    pcb = eprocess.pop("Pcb", 0) or 0
    if kprocess.get("DirectoryTableBase") is not None:
        eprocess["DirectoryTableBase"] = pcb + kprocess["DirectoryTableBase"]
    pointer = (doc.get("base_types") or {}).get("pointer") or {}
    if pointer.get("size") in (4, 8):
        bits = 8 * pointer["size"]
    default = _LDR_X64 if bits == 64 else _LDR_X86
    ldr = _fields(path, types, "_KLDR_DATA_TABLE_ENTRY", tuple(default))
    if not any(v is not None for v in ldr.values()):
        ldr = _fields(path, types, "_LDR_DATA_TABLE_ENTRY", tuple(default))
    ldr = {k: v if v is not None else default[k] for k, v in ldr.items()}
    symbols = {}
    for name, entry in (doc.get("symbols") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("address"), int):
            symbols[name] = entry["address"]
    _require(path, eprocess)
    return Profile(f"ISF {os.path.basename(path)}", eprocess, ldr, symbols, bits=bits, source=path)


def _fields(path: str, types: dict, struct_name: str, members: tuple[str, ...]) -> dict[str, int | None]:
    fields = (types.get(struct_name) or {}).get("fields") or {}
    out: dict[str, int | None] = {}
    for member in members + (("Pcb",) if struct_name == "_EPROCESS" else ()):
        offset = (fields.get(member) or {}).get("offset")
        if offset is not None and not isinstance(offset, int):
            raise SymbolError(f"{path}: {struct_name}.{member} offset {offset!r} is not a number")
        out[member] = offset
    return out


_LIBVMI_KEYS = {"win_pdbase": "DirectoryTableBase", "win_pid": "UniqueProcessId",
                "win_tasks": "ActiveProcessLinks", "win_pname": "ImageFileName"}


def _libvmi(path: str, bits: int) -> Profile:
    """One libvmi.conf entry: ``name { ostype = "Windows"; win_tasks = 0x188; ... }``."""
    try:
        with open(path, encoding="latin-1") as f:
            text = f.read()
    except OSError as exc:
        raise SymbolError(f"{path}: {exc.strerror}") from None
    entry = re.search(r"(\w+)\s*\{([^}]*)\}", text, re.S)
    if entry is None:
        raise SymbolError(f"{path}: not a Volatility ISF (.json/.json.xz) nor a libvmi.conf entry")
    values = dict(re.findall(r"(\w+)\s*=\s*\"?([^\";\s]+)\"?\s*;", entry.group(2)))
    if values.get("ostype", "Windows").lower() != "windows":
        raise SymbolError(f"{path}: entry {entry.group(1)} has ostype {values['ostype']!r}, not Windows")
    numbers = {}
    for key in (*_LIBVMI_KEYS, "win_kdvb"):
        if key in values:
            try:
                numbers[key] = int(values[key], 0)
            except ValueError:
                raise SymbolError(f"{path}: {key} = {values[key]!r} is not a number") from None
    eprocess: dict[str, int | None] = dict.fromkeys(EPROCESS_MEMBERS)
    for key, member in _LIBVMI_KEYS.items():
        eprocess[member] = numbers.get(key)
    _require(path, eprocess)
    return Profile(f"libvmi.conf {entry.group(1)}", eprocess, dict(_LDR_X64 if bits == 64 else _LDR_X86),
                   kdbg_vaddr=numbers.get("win_kdvb"), bits=bits, source=path)


def _require(path: str, eprocess: dict[str, int | None]) -> None:
    missing = [m for m in ("UniqueProcessId", "ActiveProcessLinks", "ImageFileName") if eprocess.get(m) is None]
    if missing:
        raise SymbolError(f"{path}: no _EPROCESS offsets for {', '.join(missing)} (not a Windows profile?)")
