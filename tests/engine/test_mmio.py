"""MMIO sensor: pages of kernel mappings of a device range, and the access decoded from the instruction before RIP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmwatch.cpu import Registers
from vmwatch.engine.mmio import Decoded, Watch, decode_access, register_value, resolve, watched_pages
from vmwatch.memory.paging import Mapping
from vmwatch.os.linux.resources import Resource
from vmwatch.rules import ListenerKind, RuleError, rule

FIXMAP = 0xFFFFFFFFFF5FD000  # a fixmap slot, where Linux maps the local APIC
RIP = 0xFFFFFFFF81000010
PAD = bytes.fromhex("90" * 15)


def _code(hex_bytes: str) -> bytes:
    code = bytes.fromhex(hex_bytes)
    return (PAD + code)[-15:]


class TestDecodeAccess:
    def test_store_through_a_register(self):
        """mov dword [rdx], eax: address from RDX, 4 bytes, a write of EAX."""
        regs = Registers(rax=0xAB00000000, rdx=FIXMAP + 0xB0)
        assert decode_access(_code("8902"), RIP, regs, FIXMAP, FIXMAP + 0x1000) == Decoded(FIXMAP + 0xB0, 4, True, 0)

    def test_store_to_an_absolute_address(self):
        """mov dword [disp32], edi (sign-extended to the fixmap): the value is EDI."""
        regs = Registers(rdi=0x1234)
        got = decode_access(_code("893c2580d35fff"), RIP, regs, FIXMAP, FIXMAP + 0x1000)
        assert got == Decoded(FIXMAP + 0x380, 4, True, 0x1234)

    def test_load_has_no_value(self):
        """mov eax, dword [rdx+0x20]: a read, value unknown (reading the device would be an access)."""
        regs = Registers(rdx=FIXMAP)
        got = decode_access(_code("8b4220"), RIP, regs, FIXMAP, FIXMAP + 0x1000)
        assert got == Decoded(FIXMAP + 0x20, 4, False, None)

    def test_address_outside_the_page_is_no_answer(self):
        """A decoding whose address misses the watched page is not believed."""
        assert decode_access(_code("8902"), RIP, Registers(rdx=0x1000), FIXMAP, FIXMAP + 0x1000) is None

    @given(st.binary(max_size=15), st.integers(0, 2**64 - 1))
    def test_any_code_bytes(self, code, rdx):
        """Hostile code bytes and registers: a decoding inside the page, or None, never an exception."""
        got = decode_access(code, RIP, Registers(rdx=rdx, rax=rdx), FIXMAP, FIXMAP + 0x1000)
        assert got is None or FIXMAP <= got.vaddr < FIXMAP + 0x1000

    def test_register_names(self):
        """Sub-registers read the right bits; unknown names are None."""
        regs = Registers(rax=0x1122334455667788, r9=0xFFFF)
        assert register_value(regs, "eax") == 0x55667788 and register_value(regs, "al") == 0x88
        assert register_value(regs, "r9b") == 0xFF and register_value(regs, "xmm0") is None


class TestWatchedPages:
    def test_pages_mapping_the_range(self):
        """Only the pages of kernel mappings that map part of a range are watched, each once."""
        maps = [Mapping(FIXMAP, 0xFEE00000, 0x1000, True, False, True),
                Mapping(0xFFFF888000000000, 0, 0x200000, True, False, True),
                Mapping(0xFFFFC90000010000, 0xFEC00000, 0x2000, True, False, True)]
        apic, ioapic = ((0xFEE00000, 0x1000), 0xFEE00000, 0x1000, "w"), (("IOAPIC 0", 0), 0xFEC01000, 0x10, "rw")
        assert watched_pages(iter(maps), [apic, ioapic]) == [
            Watch(0xFFFFC90000011000, 0xFEC01000, 0x1000, (ioapic,)),
            Watch(FIXMAP, 0xFEE00000, 0x1000, (apic,)),
        ]

    def test_device_names_resolve_through_the_resource_tree(self):
        """A name gives a range per resource of that name; an address range stays; unknown names give none."""
        devices = [Resource("Local APIC", 0xFEE00000, 0xFEE00FFF, 0), Resource("PCI Bus 0000:00", 0, 0xFFFF, 0),
                   Resource("IOAPIC 0", 0xFEC00000, 0xFEC003FF, 1), Resource("bogus", 10, 5, 0)]
        targets = [("Local APIC", 0, "w"), (0xB8000, 0x8000, "r"), ("bogus", 0, "w"), ("absent", 0, "w")]
        assert resolve(targets, devices) == [(("Local APIC", 0), 0xFEE00000, 0x1000, "w"),
                                             ((0xB8000, 0x8000), 0xB8000, 0x8000, "r")]


class TestOnMmio:
    def test_declaration(self):
        def f(event, guest):
            pass

        rule.on_mmio(0xFEE00000, 0x1000, "rw")(f)
        rule.on_mmio("Local APIC")(f)
        first, second = f.__vmwatch_rule__.listeners
        assert first.kind is ListenerKind.MMIO and first.target == (0xFEE00000, 0x1000, "rw")
        assert second.target == ("Local APIC", 0, "w")

    @pytest.mark.parametrize("start, size, access", [(-1, 4, "w"), (0, 0, "w"), (1 << 52, 4, "w"), (0, 4, "x"),
                                                     (True, 4, "w"), (0, 4.0, "w"), (0, 4, None),
                                                     ("", 0, "w"), ("Local APIC", 4, "w")])
    def test_bad_declarations(self, start, size, access):
        """Negative, empty, beyond-52-bit ranges and unknown access kinds are a RuleError."""
        with pytest.raises(RuleError):
            rule.on_mmio(start, size, access)
