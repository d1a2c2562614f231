"""CLI start-up: a command imports what it needs, structlog without rich and asyncio, and logs as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from vmwatch.testing.cli import run_cli

PROBE = textwrap.dedent("""
    import json, sys
    from vmwatch.cli.app import run
    status = run(sys.argv[1:])
    loaded = sorted(m for m in ("rich", "asyncio", "structlog", "trio", "vmwatch.cli.commands.demo",
                                "vmwatch.cli.commands.ps") if m in sys.modules)
    print(json.dumps({"status": status, "loaded": loaded}))
""")


def _probe(*argv: str, code: str = PROBE) -> tuple[dict, str]:
    """Run a command line in a fresh interpreter: what it left imported, and its stderr."""
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


class TestStartup:
    def test_command_imports_only_its_module(self, tmp_path):
        """`vmwatch ps FILE` loads structlog (it logs) but neither rich, asyncio nor other commands."""
        bad = tmp_path / "garbage.bin"
        bad.write_bytes(b"\x01" * 100)
        facts, stderr = _probe("--log-level", "debug", "ps", str(bad))
        assert facts["status"] == 2 and stderr.splitlines()[-1].startswith("vmwatch: error:")
        assert facts["loaded"] == ["structlog", "vmwatch.cli.commands.ps"]

    def test_help_still_lists_every_command(self):
        """`--help` and an unknown command import every command module to name them all."""
        result = subprocess.run([sys.executable, "-m", "vmwatch", "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0
        for command in ("ps", "watch", "replay", "demo", "symbols", "timeline"):
            assert f"    {command} " in result.stdout
        unknown = run_cli("pss", "x")
        assert unknown.status == 2 and "invalid choice: 'pss'" in unknown.stderr and "'ps'" in unknown.stderr

    def test_command_help(self):
        """A command's own --help, after a global option, parses with that command alone."""
        result = subprocess.run([sys.executable, "-m", "vmwatch", "--log-level", "info", "ps", "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--symbols" in result.stdout

    def test_logging_works_and_deferred_modules_load_on_use(self):
        """After the CLI set up structlog: warnings print as plain lines at the level asked; rich
        imports normally; structlog's async methods reach the real asyncio."""
        code = PROBE + textwrap.dedent("""
            import structlog
            structlog.get_logger().warning("disk nearly full", free=3)
            structlog.get_logger().info("not shown at warning")
            import asyncio, rich.console, structlog.stdlib
            assert structlog.stdlib.asyncio.get_running_loop is asyncio.get_running_loop
            async def main():
                await structlog.get_logger().awarning("async call")
            asyncio.run(main())
            print(json.dumps({"status": 0, "loaded": []}))
        """)
        facts, stderr = _probe("--log-level", "warning", "ps", "/nonexistent/dump", code=code)
        assert facts["status"] == 0
        lines = [line for line in stderr.splitlines() if "disk nearly full" in line]
        assert len(lines) == 1 and "[warning  ]" in lines[0] and "free=3" in lines[0]
        assert "not shown" not in stderr and "Traceback" not in stderr
        assert any("async call" in line for line in stderr.splitlines())
