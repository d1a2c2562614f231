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
        st.builds(lambda c, a: f"{c} {a}", st.sampled_from(["x/8b", "x/4g", "x/s", "x/2i", "xp/8b", "xp/2i", "dis", "p", "b", "bt",
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
