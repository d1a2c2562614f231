"""The CLI frame: dispatch, usage errors and exit statuses."""

from vmwatch.testing.cli import run_cli


class TestCli:
    def test_help_lists_commands(self):
        """`vmwatch --help` exits 0 and names the command modules."""
        result = run_cli("--help")
        assert result.status == 0

    def test_unknown_command_is_one_line_and_status_2(self):
        """An unknown command is a usage error: exit 2 and one line on stderr."""
        result = run_cli("no-such-command")
        assert result.status == 2
        assert len(result.stderr.strip().splitlines()) == 1
