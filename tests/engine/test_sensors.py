"""Register-write sensor: finding writer instructions in code bytes and deriving events."""

from __future__ import annotations

import attrs

from hypothesis import given, settings
from hypothesis import strategies as st

from vmwatch.cpu import Registers
from vmwatch.engine.dispatch import RuleRun
from vmwatch.engine.guest import Guest
from vmwatch.engine.registers import RegisterSensor, WriteSite, find_write_sites
from vmwatch.events import Breakpoint, RegisterWrite

TEXT = 0xFFFFFFFF81000000
CODE = bytes.fromhex(
    "55"                      # 0  push rbp
    "4889e5"                  # 1  mov rbp, rsp
    "0f22e7"                  # 4  mov cr4, rdi
    "48b80f22c00f30000000"    # 7  movabs rax, imm64 holding 0f 22 c0 and 0f 30 (not instructions)
    "440f22c0"                # 17 mov cr8, rax
    "0f30"                    # 21 wrmsr            (ECX unknown: rax/rdi above are not ECX)
    "b948000000"              # 23 mov ecx, 0x48
    "31c0"                    # 28 xor eax, eax
    "0f30"                    # 30 wrmsr            (SPEC_CTRL, known statically)
    "e800000000"              # 32 call .+5
    "0f30"                    # 37 wrmsr            (after a call: unknown again)
    "5d"                      # 39 pop rbp
    "c3"                      # 40 ret
    "cccc"
)


class TestWriteSites:
    def test_real_writers_only(self):
        """mov crN and wrmsr are found at instruction boundaries; the same bytes inside an immediate are not."""
        sites = list(find_write_sites(CODE, TEXT, lambda vaddr: TEXT))
        assert sites == [
            WriteSite(TEXT + 4, TEXT + 7, "cr4", "rdi"),
            WriteSite(TEXT + 17, TEXT + 21, "cr8", "rax"),
            WriteSite(TEXT + 21, TEXT + 23, "msr"),
            WriteSite(TEXT + 30, TEXT + 32, "msr", msr=0x48),
            WriteSite(TEXT + 37, TEXT + 39, "msr"),
        ]

    def test_unknown_function_start_is_skipped(self):
        """Without a containing function the boundary cannot be checked: no site."""
        assert list(find_write_sites(CODE, TEXT, lambda vaddr: None)) == []


class TestRegisterSensor:
    def test_on_the_mov_itself(self):
        """A stop on the mov (an inline hook there): new from its source register, old from CRn."""
        site = WriteSite(TEXT + 2, TEXT + 5, "cr0", "rdi")
        sensor = RegisterSensor({TEXT + 2: site}, {"cr0": 0x80050033})
        guest = Guest(vm="t", phys=None)
        guest.rule = RuleRun("sensor", sensor)
        out = []
        for regs in (Registers(cr0=0x80050033, rdi=0x80040033), Registers(rdi=0x80050033)):
            event = Breakpoint(seq=len(out), address=TEXT + 2)
            guest.begin(event, regs)
            sensor(event, guest)
            out += guest.take_emitted()
        assert out == [RegisterWrite(seq=0, register="cr0", old=0x80050033, new=0x80040033, rip=TEXT + 2),
                       # no CR0 reported: the last value written on that vCPU
                       RegisterWrite(seq=1, register="cr0", old=0x80040033, new=0x80050033, rip=TEXT + 2)]

    def test_hookable_only_where_no_branch_lands_inside(self):
        """native_write_cr0's retry jumps to the mov itself: hookable; a jump to the NOP after it is not."""
        from vmwatch.engine.registers import hookable
        from vmwatch.os.linux.kallsyms import Symbols

        code = bytes.fromhex("31c0 0f22c7 6690 4881cf00000100 ebf2 c3")  # xor; mov cr0; nop2; or; jmp mov; ret
        symbols = Symbols(["native_write_cr0", "_etext"], [TEXT, TEXT + len(code)], "TT")
        site = WriteSite(TEXT + 2, TEXT + 5, "cr0", "rdi")
        assert hookable(site, code, TEXT, symbols)
        into_nop = code[:15] + bytes([0xF5]) + code[16:]  # jmp TEXT + 5: into the hook's 5 bytes
        assert not hookable(site, into_nop, TEXT, symbols)
        assert not hookable(attrs.evolve(site, register="cr4"), code, TEXT, symbols)  # not native_write_cr4

    def test_old_and_new_values(self):
        """The breakpoint after a writer becomes RegisterWrite with the last value seen as old."""
        sites = {TEXT + 7: WriteSite(TEXT + 4, TEXT + 7, "cr4", "rdi"), TEXT + 23: WriteSite(TEXT + 21, TEXT + 23, "msr")}
        sensor = RegisterSensor(sites, {"cr4": 0x3006F0})
        guest = Guest(vm="t", phys=None)
        guest.rule = RuleRun("sensor", sensor)
        out = []
        for regs, address in ((Registers(cr4=0x2006F0), TEXT + 7), (Registers(cr4=0x3006F0), TEXT + 7),
                              (Registers(rcx=0x176, rdx=0xFFFFFFFF, rax=0x81000000), TEXT + 23)):
            event = Breakpoint(seq=len(out), address=address)
            guest.begin(event, regs)
            sensor(event, guest)
            out += guest.take_emitted()
        assert out == [
            RegisterWrite(seq=0, register="cr4", old=0x3006F0, new=0x2006F0, rip=TEXT + 4),
            RegisterWrite(seq=1, register="cr4", old=0x2006F0, new=0x3006F0, rip=TEXT + 4),
            RegisterWrite(seq=2, register="msr:sysenter_eip", old=None, new=0xFFFFFFFF81000000, rip=TEXT + 21),
        ]


class TestHostileText:
    @given(st.binary(max_size=512), st.integers(min_value=0, max_value=64))
    @settings(max_examples=150, deadline=None)
    def test_random_bytes_never_raise(self, noise, func_offset):
        """Any bytes: sites found are real writer instructions inside the text, never an exception."""
        text = noise + bytes.fromhex("0f22e00f30") + noise
        start = lambda vaddr: TEXT + min(func_offset, vaddr - TEXT)  # noqa: E731
        for site in find_write_sites(text, TEXT, start):
            offset = site.address - TEXT
            assert 0 <= offset < len(text) and site.next_address > site.address
            opcode = text[offset:site.next_address - TEXT]
            assert b"\x0f\x22" in opcode or b"\x0f\x30" in opcode


class TestRuntimeSites:
    def test_cr0_cr4_only_in_the_runtime_writers(self):
        """Boot and resume code's mov cr0/cr4 are dropped when native_write_cr0/4 hold writers; others stay."""
        from vmwatch.engine.registers import runtime_sites
        from vmwatch.os.linux.kallsyms import Symbols

        symbols = Symbols(["secondary_startup_64", "native_write_cr0", "native_write_cr4", "_etext"],
                          [TEXT, TEXT + 0x100, TEXT + 0x200, TEXT + 0x1000], "TTTT")
        boot_cr0, boot_cr4 = WriteSite(TEXT + 4, TEXT + 7, "cr0", "rax"), WriteSite(TEXT + 8, TEXT + 11, "cr4", "rax")
        cr0 = WriteSite(TEXT + 0x102, TEXT + 0x105, "cr0", "rdi")
        cr3, msr = WriteSite(TEXT + 12, TEXT + 15, "cr3", "rax"), WriteSite(TEXT + 16, TEXT + 18, "msr")
        kept = runtime_sites([boot_cr0, boot_cr4, cr0, cr3, msr], symbols)
        # no writer in native_write_cr4: every cr4 site stays (a kernel that writes CR4 elsewhere)
        assert sorted(kept, key=lambda s: s.address) == [boot_cr4, cr3, msr, cr0]
