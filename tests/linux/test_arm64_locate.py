"""Pieces of the arm64 kernel search without a guest: ADRP/ADD decoding, the banner test, BTF sizes."""

from __future__ import annotations

import struct

import pytest

from vmwatch.errors import SymbolError
from vmwatch.os.linux import btf
from vmwatch.os.linux.arm64 import _is_banner, btf_size, code_references, syscall_count
from vmwatch.os.linux.kallsyms import Symbols

PC = 0xFFFF_B08A_182E_0A30


def adrp(pc: int, target: int, rd: int) -> int:
    pages = ((target & ~0xFFF) - (pc & ~0xFFF)) >> 12
    return 1 << 31 | (pages & 3) << 29 | 0b10000 << 24 | ((pages >> 2) & 0x7FFFF) << 5 | rd


def add_imm(rd: int, rn: int, imm: int) -> int:
    return 0x91000000 | imm << 10 | rn << 5 | rd


def ldr(rt: int, rn: int, offset: int) -> int:
    return 0xF9400000 | (offset // 8) << 10 | rn << 5 | rt


class Code:
    """Kernel memory holding one function's instructions at PC."""

    def __init__(self, words: list[int]) -> None:
        self.code = struct.pack(f"<{len(words)}I", *words)

    def read(self, vaddr: int, size: int, pad: bool = False) -> bytes:
        out = self.code[vaddr - PC:vaddr - PC + size]
        return out + bytes(size - len(out))


class TestCodeReferences:
    def test_adrp_add_and_adrp_ldr(self) -> None:
        """ADRP+ADD gives the object's address; ADRP+LDR the loaded one; loads off the ADD result are fields."""
        init_task = 0xFFFF_B08A_19EC_8DC0
        other = 0xFFFF_B08A_1A00_0010
        words = [adrp(PC, init_task, 22), add_imm(22, 22, init_task & 0xFFF), ldr(21, 22, 0x468),
                 adrp(PC + 12, other, 3), ldr(0, 3, other & 0xFFF)]
        assert code_references(Code(words), PC, 4 * len(words)) == [init_task, other]

    def test_below_the_code_page(self) -> None:
        """A negative ADRP page offset (data below the function) is masked to a 64-bit address."""
        target = PC - 0x5000_0123
        words = [adrp(PC, target, 1), add_imm(1, 1, target & 0xFFF)]
        assert code_references(Code(words), PC, 8) == [target]

    def test_garbage_gives_no_references(self) -> None:
        """Bytes that are no instructions decode to nothing, not an error."""
        assert code_references(Code([0xFFFFFFFF] * 8), PC, 32) == []


def test_syscall_count_from_the_callee_of_do_el0_svc() -> None:
    """do_el0_svc calls el0_svc_common.constprop.0, which passes __NR_syscalls as ``mov w2, #N``."""
    callee = PC + 0x40
    words = [0x94000000 | ((callee - PC) >> 2), 0xD65F03C0] + [0xD503201F] * 14  # bl callee; ret; nops
    words += [0x52800000 | 451 << 5 | 1, 0x52800000 | 451 << 5 | 2, 0xD65F03C0]  # mov w1; mov w2, #451; ret
    symbols = Symbols(["do_el0_svc", "el0_svc_common.constprop.0", "next"], [PC, callee, callee + 12], "ttt")
    assert syscall_count(Code(words), symbols) == 451
    assert syscall_count(Code(words), Symbols(["other"], [PC], "t")) is None


def test_banner_needs_a_build_number() -> None:
    """The real banner has "#1 SMP"; the copy built without the number ("# SMP") is skipped."""
    real = b"xxLinux version 6.1.0-57-arm64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP Debian\n"
    early = b"Linux version 6.1.0-57-arm64 (debian-kernel@lists.debian.org) (gcc-12) # SMP Debian\n"
    assert _is_banner(real, 2) and not _is_banner(early, 0)
    assert not _is_banner(b"Linux version of the day #1\n", 0)


def test_btf_size_from_header() -> None:
    """Header, types and strings add up; an absurd size is a SymbolError."""
    header = btf.HEADER.pack(btf.MAGIC, 1, 0, 24, 0, 0x100, 0x100, 0x40)
    assert btf_size(header) == 24 + 0x140
    with pytest.raises(SymbolError, match="absurd BTF size"):
        btf_size(btf.HEADER.pack(btf.MAGIC, 1, 0, 24, 0, 0xFFFF_FFFF, 0, 0))
