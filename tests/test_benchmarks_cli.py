"""Benchmarks print tables and ratios: vmwatch's logs at WARNING unless ``--verbose`` (benchmarks/_cli.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

LOGS = textwrap.dedent('''
    import argparse, sys
    sys.path.insert(0, sys.argv[1])
    from _cli import parse_args
    args = parse_args(argparse.ArgumentParser(), sys.argv[2:])
    import structlog
    log = structlog.get_logger("vmwatch.engine")
    log.debug("a debug line")
    log.info("engine started", rules=3)
    log.warning("a rule was demoted", rule="security.idt")
    print("table row 1.00x")
''')


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOGS, str(BENCHMARKS), *argv], capture_output=True, text=True,
                          timeout=120, check=True)


class TestBenchmarkLogs:
    def test_warning_unless_verbose(self):
        """Without --verbose only warnings reach stderr; stdout holds the benchmark's own lines alone."""
        result = _run()
        assert result.stdout == "table row 1.00x\n"
        assert "a rule was demoted" in result.stderr
        assert "engine started" not in result.stderr and "a debug line" not in result.stderr

    def test_verbose_shows_info_and_debug(self):
        """--verbose shows info and debug lines, still on stderr, never among the tables."""
        result = _run("--verbose")
        assert result.stdout == "table row 1.00x\n"
        assert all(line in result.stderr for line in ("a debug line", "engine started", "a rule was demoted"))

    @pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("bench_*.py")), ids=lambda p: p.name)
    def test_every_benchmark_parses_through_cli(self, path):
        """Each benchmark parses its arguments with _cli.parse_args, never a parser's own parse_args."""
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "_cli"
                    for a in n.names]
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert "parse_args" in imported
        assert any(isinstance(f, ast.Name) and f.id == "parse_args" for f in calls)
        assert not any(isinstance(f, ast.Attribute) and f.attr in ("parse_args", "parse_known_args") for f in calls)
