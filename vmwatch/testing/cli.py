"""Run the CLI in-process and capture what it prints."""

from __future__ import annotations

import io

import attrs

from vmwatch.cli.app import Environment, run


@attrs.frozen
class CliResult:
    status: int
    stdout: str
    stderr: str


def run_cli(*args: str, stdin: str = "") -> CliResult:
    """Run ``vmwatch ARGS...`` in this process; return exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    status = run([str(a) for a in args], Environment(stdout=out, stderr=err, stdin=io.StringIO(stdin)))
    return CliResult(status, out.getvalue(), err.getvalue())
