"""Exception sensor: decoding the frame the CPU pushed, and deriving Fault events from handler stops."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmwatch.cpu import ERROR_CODE_VECTORS, Registers
from vmwatch.engine.dispatch import RuleRun
from vmwatch.engine.exceptions import ExceptionSensor, Frame, decode_frame, frame_size, wanted_modes
from vmwatch.engine.guest import Guest
from vmwatch.events import Breakpoint, Fault
from vmwatch.rules import ListenerKind, RuleError, rule

HANDLER_PF, HANDLER_UD = 0xFFFFFFFF81A00B30, 0xFFFFFFFF81A00A10
STACK = 0xFFFFFE0000003F58  # a KPTI entry-stack address, as the lab guest's cpu_entry_area has them


def frame64(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words)


class TestDecodeFrame:
    def test_page_fault_from_user_mode(self):
        """#PF: error code first, then RIP, CS, RFLAGS, RSP, SS; CS 0x33 is user mode."""
        data = frame64(6, 0x52B992, 0x33, 0x10246, 0x7FFF05955000, 0x2B)
        assert decode_frame(14, data) == Frame(rip=0x52B992, cs=0x33, rflags=0x10246, error_code=6,
                                               rsp=0x7FFF05955000)
        assert decode_frame(14, data).user

    def test_invalid_opcode_from_kernel_has_no_error_code(self):
        """#UD pushes no error code: RSP points at RIP; CS 0x10 is kernel mode."""
        data = frame64(0xFFFFFFFF81234567, 0x10, 0x46, 0xFFFFC90000013E88, 0x18)
        frame = decode_frame(6, data)
        assert frame.error_code is None and frame.rip == 0xFFFFFFFF81234567 and not frame.user

    def test_32_bit_kernel_frame_has_no_stack_words(self):
        """32-bit, same privilege: EIP, CS, EFLAGS only; the words after are not the interrupted ESP."""
        data = struct.pack("<6I", 0x2, 0xC1234567, 0x60, 0x246, 0xDEAD, 0xBEEF)
        frame = decode_frame(13, data, width=4)
        assert frame == Frame(rip=0xC1234567, cs=0x60, rflags=0x246, error_code=2, rsp=None)

    @pytest.mark.parametrize("data, width", [(b"\x00" * 47, 8), (b"", 8), (b"\x00" * 48, 2)])
    def test_short_or_bad_width_is_value_error(self, data, width):
        """Too few bytes for the frame, or a width that is not 4 or 8, is a ValueError, never a wrong frame."""
        with pytest.raises(ValueError):
            decode_frame(14, data, width)

    @given(st.integers(0, 31), st.binary(min_size=48, max_size=48))
    def test_any_bytes_decode_within_bounds(self, vector, data):
        """Hostile stack bytes always decode: a 16-bit CS, and a 32-bit error code exactly for its vectors."""
        frame = decode_frame(vector, data)
        assert 0 <= frame.cs <= 0xFFFF
        assert (frame.error_code is not None) == (vector in ERROR_CODE_VECTORS)
        assert frame.error_code is None or frame.error_code <= 0xFFFFFFFF
        assert frame_size(vector, 8) <= len(data)


@attrs.define
class _Memory:
    """Kernel virtual memory holding one stack."""

    base: int
    data: bytes
    pointer_size: int = 8

    def read(self, vaddr: int, size: int) -> bytes:
        off = vaddr - self.base
        assert 0 <= off and off + size <= len(self.data), (hex(vaddr), size)
        return self.data[off : off + size]


@attrs.define
class _Linux:
    memory: _Memory


def _guest(stack: bytes) -> Guest:
    linux = _Linux(_Memory(STACK, stack))
    return Guest(vm="t", phys=None, os_factory=lambda guest: linux)


class TestExceptionSensor:
    def _run(self, sensor, stack: bytes, regs: Registers, address: int) -> list:
        guest = _guest(stack)
        guest.rule = RuleRun("sensor", sensor)
        event = Breakpoint(seq=7, time_ns=99, address=address)
        guest.begin(event, regs)
        sensor(event, guest)
        return guest.take_emitted()

    def test_page_fault_event_has_cr2_and_error_code(self):
        """A stop at the #PF handler gives a Fault with the frame's RIP and error code and CR2 from the registers."""
        sensor = ExceptionSensor({HANDLER_PF: 14}, {14: frozenset({True, False})})
        regs = Registers(rsp=STACK, cr2=0x7FFF05954FF8)
        out = self._run(sensor, frame64(6, 0x52B992, 0x33, 0x246, 0x7FFF05955000, 0x2B), regs, HANDLER_PF)
        assert out == [Fault(seq=7, time_ns=99, vector=14, name="page_fault", rip=0x52B992, user=True,
                             error_code=6, cr2=0x7FFF05954FF8)]
        assert out[0].selector == (14, True)

    def test_mode_nobody_listens_to_emits_nothing(self):
        """user=False listeners only: a user-mode fault ends at the mode check."""
        sensor = ExceptionSensor({HANDLER_PF: 14}, {14: frozenset({False})})
        regs = Registers(rsp=STACK, cr2=0x1000)
        assert self._run(sensor, frame64(4, 0x401000, 0x33, 0x246, 0x7FFF0000, 0x2B), regs, HANDLER_PF) == []

    def test_other_vectors_have_no_cr2(self):
        """Only page faults carry CR2 (it holds the last page fault's address, whatever the vector)."""
        sensor = ExceptionSensor({HANDLER_UD: 6}, {6: frozenset({False})})
        regs = Registers(rsp=STACK, cr2=0x1234)
        out = self._run(sensor, frame64(0xFFFFFFFF81234567, 0x10, 0x46, STACK + 0x100, 0x18), regs, HANDLER_UD)
        assert [(f.name, f.user, f.error_code, f.cr2) for f in out] == [("invalid_opcode", False, None, None)]

    def test_unknown_address_or_no_rsp_is_ignored(self):
        """A stop the sensor did not arm, or without registers, derives nothing."""
        sensor = ExceptionSensor({HANDLER_PF: 14}, {14: frozenset({True})})
        assert self._run(sensor, b"", Registers(rsp=STACK), HANDLER_UD) == []
        assert self._run(sensor, b"", Registers(), HANDLER_PF) == []

    def test_wanted_modes(self):
        """Arming keys become vector -> modes."""
        assert wanted_modes({"exception:14:kernel": [], "exception:14:user": [], "exception:6:kernel": [],
                             "interrupt:236": []}) == {14: frozenset({True, False}), 6: frozenset({False})}


class TestOnException:
    def test_names_and_numbers(self):
        """Names and vectors both work; user= narrows the mode."""
        def f(event, guest):
            pass

        rule.on_exception("page_fault", user=False)(f)
        rule.on_exception(13)(f)
        rule.on_exception("Invalid_Opcode ", comm="sh")(f)
        listeners = f.__vmwatch_rule__.listeners
        assert [lst.kind for lst in listeners] == [ListenerKind.EXCEPTION] * 3
        assert [lst.target for lst in listeners] == [(14, False), (13, None), (6, None)]
        assert listeners[2].narrow.comm == "sh"

    @pytest.mark.parametrize("vector, user", [(32, None), (-1, None), (True, None), ("pagefault", None),
                                              (14.0, None), (None, None), (14, "yes"), (14, 0)])
    def test_bad_declarations(self, vector, user):
        """Interrupt vectors, unknown names, non-ints and a non-bool user are a RuleError at load time."""
        with pytest.raises(RuleError):
            rule.on_exception(vector, user=user)



class TestDispatch:
    async def test_faults_reach_listeners_of_their_vector_and_mode(self):
        """Fault events from a stream: user= picks the mode, None takes both; the sensor reports itself inactive."""
        from vmwatch.engine import Engine, ListSink, SyntheticSource
        from vmwatch.rules import RuleSet, rules_of

        got: dict[str, list] = {"kernel_pf": [], "any_gp": []}

        @rule.on_exception("page_fault", user=False)
        def kernel_pf(event, guest):
            got["kernel_pf"].append(event.seq)

        @rule.on_exception(13)
        def any_gp(event, guest):
            got["any_gp"].append(event.seq)

        events = [Fault(seq=1, vector=14, name="page_fault", rip=1, user=True, cr2=0),
                  Fault(seq=2, vector=14, name="page_fault", rip=2, user=False, cr2=8),
                  Fault(seq=3, vector=13, name="general_protection", rip=3, user=True, error_code=0),
                  Fault(seq=4, vector=13, name="general_protection", rip=4, user=False, error_code=0),
                  Fault(seq=5, vector=6, name="invalid_opcode", rip=5, user=False)]
        ruleset = RuleSet(rules_of({"__name__": __name__, "kernel_pf": kernel_pf, "any_gp": any_gp}, "t"))
        sink = ListSink()
        summary = await Engine(SyntheticSource(events, honour_traps=False), ruleset, [sink]).run()
        assert got == {"kernel_pf": [2], "any_gp": [3, 4]}
        assert [r.seq for r in sink.events if r.kind == "Fault"] == [1, 2, 3, 4, 5]
        assert summary.inactive == ["exception sensor (vectors [13, 14]): the source has no breakpoints"]

    async def test_address_ranges_pick_page_faults_per_listener(self):
        """address=(start, end): each listener gets the faults whose cr2 is in its own range, end excluded."""
        from vmwatch.engine import Engine, ListSink, SyntheticSource
        from vmwatch.rules import RuleSet, rules_of

        got: dict[str, list] = {"low": [], "page": []}

        @rule.on_exception("page_fault", address=(0x10, 0x20))
        def low(event, guest):
            got["low"].append(event.seq)

        @rule.on_exception("page_fault", user=True, address=(0x1000, 0x2000))
        def page(event, guest):
            got["page"].append(event.seq)

        events = [Fault(seq=i, vector=14, name="page_fault", rip=i, user=user, cr2=cr2)
                  for i, (cr2, user) in enumerate([(0x1000, True), (0x1FFF, True), (0x2000, True), (0x1800, False),
                                                   (0x18, False), (0x20, True), (0xF, True)], 1)]
        ruleset = RuleSet(rules_of({"__name__": __name__, "low": low, "page": page}, "t"))
        await Engine(SyntheticSource(events, honour_traps=False), ruleset, [ListSink()]).run()
        assert got == {"low": [5], "page": [1, 2]}
