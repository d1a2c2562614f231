"""The rule API: decorators, packs from paths, per-run enable/disable/configure."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from vmwatch.engine.registers import canonical_register
from vmwatch.errors import RuleError
from vmwatch.events import Exec
from vmwatch.rules import (SHIPPED_PACKS, ListenerKind, RuleSet, Severity, load_pack, rule, rules_of,
                           shipped_pack_names)

PACK = textwrap.dedent('''
    from vmwatch.events import Exec
    from vmwatch.rules import rule

    @rule.on_breakpoint("do_sys_openat2", comm="sh")
    @rule.on(Exec)
    def opens(event, guest):
        """Opens by sh."""

    @rule.disabled
    @rule.every(2)
    @rule.configure(limit=3, names=["a"])
    def ticking(event, guest):
        pass

    def helper():  # not a rule
        pass
''')


class TestDecorators:
    def test_listeners_in_declaration_order(self, tmp_path):
        """Stacked decorators give listeners top to bottom; narrowing and defaults are kept."""
        path = tmp_path / "mine.py"
        path.write_text(PACK)
        opens, ticking = load_pack(path)
        assert opens.name == "mine.opens" and opens.doc == "Opens by sh."
        assert [lst.kind for lst in opens.listeners] == [ListenerKind.BREAKPOINT, ListenerKind.EVENT]
        assert opens.listeners[0].narrow.comm == "sh" and opens.listeners[1].target is Exec
        assert ticking.enabled is False and ticking.defaults == {"limit": 3, "names": ["a"]}
        assert ticking.listeners[0].target == 2.0

    @pytest.mark.parametrize("make", [
        lambda: rule.on_breakpoint(-1),
        lambda: rule.on_breakpoint(1.5),
        lambda: rule.on_write("x", size=0),
        lambda: rule.on_interrupt(256),
        lambda: rule.every(0),
        lambda: rule.on(int),
        lambda: rule.on(),
        lambda: rule.on_register("cr9"),
        lambda: rule.on_register("msr:bogus"),
        lambda: rule.on_register_write(),
        lambda: rule.on_register_write("cr0", "cr9"),
    ])
    def test_bad_declarations_raise_rule_error(self, make):
        """Wrong arguments to a decorator are a RuleError at load time, not at run time."""
        with pytest.raises(RuleError):
            make()

    def test_register_write_takes_several_names(self):
        """``on_register_write("cr0", "cr4")`` is one listener per register, normalised like ``on_register``."""
        @rule.on_register_write("CR0", "cr4", "msr:0xC0000082")
        def watched(event, guest):
            pass

        (found,) = rules_of({"__name__": __name__, "watched": watched}, "p")
        assert [(l.kind, l.target) for l in found.listeners] == [
            (ListenerKind.REGISTER, "cr0"), (ListenerKind.REGISTER, "cr4"), (ListenerKind.REGISTER, "msr:lstar")]

    def test_register_names(self):
        """Registers are normalised: case, MSR numbers to names, unknown MSRs by number."""
        assert canonical_register("CR4") == "cr4"
        assert canonical_register("msr:0xC0000082") == "msr:lstar"
        assert canonical_register("msr:0x123") == "msr:0x123"

    def test_severity_parse(self):
        assert Severity.parse("Warning") is Severity.WARNING
        with pytest.raises(ValueError, match="'loud'"):
            Severity.parse("loud")


class TestRuleSet:
    def test_shipped_packs_load(self):
        """The shipped packs load by name and declare what they listen to."""
        assert {"security", "timeline"} <= set(shipped_pack_names())
        rules = RuleSet.load(["security", "timeline"]).rules
        assert len(rules) >= 12 and all(r.listeners for r in rules)

    def test_enable_disable_configure(self, tmp_path):
        """Per-run switches by name, glob or pack; unknown settings and names are errors."""
        (tmp_path / "mine.py").write_text(PACK)
        rs = RuleSet.load([tmp_path / "mine.py"])
        assert [r.name for r in rs.active()] == ["mine.opens"]
        rs.enable("mine.tick*")
        rs.disable("mine.opens")
        assert [r.name for r in rs.active()] == ["mine.ticking"]
        rs.configure("mine.ticking", limit=9)
        assert rs.config_of(rs.rules[1]) == {"limit": 9, "names": ["a"]}
        with pytest.raises(RuleError, match="no setting 'limt'"):
            rs.configure("mine.ticking", limt=1)
        with pytest.raises(RuleError, match="no rule matches"):
            rs.disable("other.*")
        rs.disable("mine")
        assert rs.active() == []

    @pytest.mark.parametrize("text, message", [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('at import')\n", "RuntimeError: at import"),
        ("x = 1\n", "no rules"),
        ("from vmwatch.rules import rule\n@rule.configure(a=1)\ndef f(e, g): pass\n", "listens to nothing"),
    ])
    def test_bad_pack_is_one_rule_error(self, tmp_path, text, message):
        """A pack that does not import or declares nothing is a RuleError naming the file."""
        path = tmp_path / "bad.py"
        path.write_text(text)
        with pytest.raises(RuleError, match=message) as info:
            RuleSet.load([path])
        assert "bad.py" in str(info.value)

    def test_missing_pack_and_duplicates(self, tmp_path):
        with pytest.raises(RuleError, match="not found"):
            RuleSet.load([tmp_path / "nope.py"])
        (tmp_path / "mine.py").write_text(PACK)
        with pytest.raises(RuleError, match="defined twice"):
            RuleSet.load([tmp_path / "mine.py", tmp_path])


PART = textwrap.dedent('''
    from vmwatch.rules import rule

    @rule.every(1)
    def other_job(event, guest):
        """A rule kept in a part."""
''')


class TestPackParts:
    def test_security_pack_joins_its_windows_part(self):
        """`security` loads its Linux rules from security.py and its Windows rules from the part, one pack name."""
        rules = RuleSet.load(["security"]).rules
        files = {r.name: Path(r.func.__code__.co_filename).name for r in rules}
        windows = ["security.ssdt", "security.windows_idt", "security.driver_allowlist", "security.unlinked_process"]
        assert [name for name, file in files.items() if file == "_security_windows.py"] == windows
        assert "security.syscall_table" in files and "security.hidden_process" in files
        assert set(files.values()) == {"security.py", "_security_windows.py"}
        assert [r.name for r in rules][-4:] == windows  # the part's rules come after the pack's own
        assert "_security_windows" not in shipped_pack_names()

    def test_shipped_pack_without_or_with_a_broken_part(self, tmp_path):
        """A copy of the shipped pack missing its Windows part, or with the part broken, is one RuleError naming it."""
        pack = tmp_path / "security.py"
        shutil.copy(SHIPPED_PACKS / "security.py", pack)
        with pytest.raises(RuleError, match=r"part _security_windows\.py of pack security not found") as info:
            RuleSet.load([pack])
        assert "\n" not in str(info.value)
        part = tmp_path / "_security_windows.py"
        part.write_text((SHIPPED_PACKS / "_security_windows.py").read_text() + "\ndef broken(:\n")
        with pytest.raises(RuleError, match="SyntaxError") as info:
            RuleSet.load([pack])
        assert "_security_windows.py" in str(info.value) and "part of rule pack security" in str(info.value)
        shutil.copy(SHIPPED_PACKS / "_security_windows.py", part)
        assert [r.name for r in RuleSet.load([pack]).rules] == [r.name for r in RuleSet.load(["security"]).rules]

    @pytest.mark.parametrize("parts, part_text, message", [
        ('"_part.py"', PART, "PARTS must be a tuple"),
        ('("part.py",)', PART, "a part is a file '_name.py'"),
        ('("../_part.py",)', PART, "a part is a file '_name.py'"),
        ('(3,)', PART, "a part is a file '_name.py'"),
        ('("_part.py",)', "x = 1\n", "_part.py: no rules"),
        ('("_part.py",)', "raise OSError('gone')\n", "OSError: gone"),
        ('("_part.py",)', 'PARTS = ("_part.py",)\n' + PART, "cannot have parts of its own"),
        ('("_part.py",)', PART.replace("other_job", "opens"), "rule mine.opens defined twice"),
    ])
    def test_bad_parts_are_one_rule_error(self, tmp_path, parts, part_text, message):
        """A wrong PARTS, or a part that is not a clean rule file, is a RuleError that says which."""
        (tmp_path / "mine.py").write_text(f"PARTS = {parts}\n" + PACK)
        (tmp_path / "_part.py").write_text(part_text)
        with pytest.raises(RuleError, match=message):
            RuleSet.load([tmp_path / "mine.py"])

    def test_part_rules_take_the_pack_name(self, tmp_path):
        """A part's rules are named, enabled and configured as the pack's; a folder does not load a part alone."""
        (tmp_path / "mine.py").write_text('PARTS = ("_part.py",)\n' + PACK)
        (tmp_path / "_part.py").write_text(PART)
        rs = RuleSet.load([tmp_path])
        assert [r.name for r in rs.rules] == ["mine.opens", "mine.ticking", "mine.other_job"]
        rs.disable("mine")
        assert rs.active() == []
