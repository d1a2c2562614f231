"""The debugger shell on a synthetic guest: commands, one-line errors, fuzzed input never escapes."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.debug import Debugger
from vmwatch.debug.shell import DebugShell

from .test_session_synthetic import STACK, session  # noqa: F401 - session is a fixture


@pytest.fixture
def shell(session):  # noqa: F811
    dbg = Debugger.open(session.target, linux=False)
    out, err = io.StringIO(), io.StringIO()
    yield DebugShell(dbg, out, err), out, err
    dbg.close()


class TestShell:
    def test_script_transcript(self, shell):
        """A script echoes each command; outputs follow; errors are single lines on stderr."""
        sh, out, err = shell
        sh.run_script(["# comment", "dis $rip 2", "x/2g $rsp", "x/s $rsp", "x/3i 0xffffffff81000000", "xp/s 0x101800",
                       "p $rsp+8", "step", "nonsense", "x/2q 0", "quit", "regs"])
        text = out.getvalue()
        assert "(vmwatch) dis $rip 2" in text and "=> 0xffffffff81000001:  4889e5" in text
        assert "'hello, stack!'" in text
        assert "0x0000000000101800  'hello, stack!'" in text  # the same bytes, by physical address
        assert f"{STACK + 0x808:#x}" in text
        assert "call 0xffffffff81000020" in text
        assert "(vmwatch) regs" not in text  # quit ended the script
        lines = err.getvalue().splitlines()
        assert len(lines) == 3 and sh.errors == 3
        assert "read-only" in lines[0] and "unknown command 'nonsense'" in lines[1] and "'q'" in lines[2]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(line=st.one_of(
        st.text(max_size=40),
        st.builds(lambda c, a: f"{c} {a}", st.sampled_from(["x/8b", "x/4g", "x/4gx", "x/2dw", "x/3a", "p/x", "disas", "b *", "x/s", "x/2i", "xp/8b", "xp/2i", "dis", "p", "b", "bt",
                                                            "watch", "delete", "vcpu", "sym", "info", "step"]),
                  st.text(alphabet="0123456789abcdefx$+-rspi_ /", max_size=24)),
    ))
    def test_fuzzed_lines_never_escape(self, shell, line):
        """Whatever is typed, the shell answers or prints one error line; it never raises."""
        sh, _, err = shell
        before = sh.errors
        sh.onecmd(line)
        assert err.getvalue().count("\n") == sh.errors
        assert sh.errors - before in (0, 1)


class TestGdbSpellings:
    def test_gdb_commands_work_as_in_gdb(self, shell):
        """x/4gx $rsp, x/2i $pc, x/2a, disas, info registers rip, p/x $rip, b *ADDR read as gdb reads them."""
        sh, out, err = shell
        sh.run_script(["x/2gx $rsp", "x/2i $pc", "x/2xg $rsp", "x/2dw $rsp", "x/1a $rsp", "disas $pc 1",
                       "info registers rip eflags", "p/x $rsp", "p/d $rsp", "b *0xffffffff81000000"])
        text = out.getvalue()
        lines = text.splitlines()
        x_gx = lines[lines.index("(vmwatch) x/2gx $rsp") + 1]
        assert x_gx == lines[lines.index("(vmwatch) x/2xg $rsp") + 1]  # size and format in either order
        assert x_gx.startswith(f"{STACK + 0x800:#018x}  0x") and len(x_gx.split()) == 3
        assert lines[lines.index("(vmwatch) x/2i $pc") + 1].startswith("=> 0xffffffff81000001")
        assert lines[lines.index("(vmwatch) x/2dw $rsp") + 2].startswith(f"{STACK + 0x804:#018x}  ")
        assert lines[lines.index("(vmwatch) disas $pc 1") + 1].startswith("=> 0xffffffff81000001")
        regs = lines[lines.index("(vmwatch) info registers rip eflags") + 1:lines.index("(vmwatch) p/x $rsp")]
        assert [r.split()[0] for r in regs] == ["rip", "rflags"]
        assert lines[lines.index("(vmwatch) p/x $rsp") + 1] == f"{STACK + 0x800:#x}"
        assert lines[lines.index("(vmwatch) p/d $rsp") + 1] == str(STACK + 0x800)
        errors = err.getvalue().splitlines()
        assert len(errors) == 1 and "read-only" in errors[0]  # b *ADDR parsed, refused on an image

    def test_bad_format_letters_are_one_error(self, shell):
        """x/4q and p/z are refused with one line each."""
        sh, _, err = shell
        sh.onecmd("x/4q $rsp")
        sh.onecmd("p/z $rsp")
        assert sh.errors == 2 and "unknown format letter 'q'" in err.getvalue()
