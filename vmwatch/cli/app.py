"""Entry point: parse, dispatch to a command module, map errors to exit statuses in one place.

Start-up time is paid by every command, so this module imports only the standard library: a
command line naming a command imports that command's module alone (``--help`` imports them all),
and structlog is loaded through :func:`vmwatch.logs.load_structlog` before any command runs.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import os
import pkgutil
import sys
from typing import IO, Sequence

from vmwatch.cli import commands
from vmwatch.errors import VmwatchError


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    BAD_INPUT = 2
    GUEST_GONE = 3
    """A live guest went away during ``watch`` (QEMU exited, was killed or stopped answering);
    what was received until then is stored."""
    INTERRUPTED = 130


class Environment:
    """The streams a command writes to; tests replace them (the process's streams by default)."""

    def __init__(self, stdout: IO[str] | None = None, stderr: IO[str] | None = None,
                 stdin: IO[str] | None = None) -> None:
        self.stdout: IO[str] = sys.stdout if stdout is None else stdout
        self.stderr: IO[str] = sys.stderr if stderr is None else stderr
        self.stdin: IO[str] = sys.stdin if stdin is None else stdin

    @property
    def stdout_isatty(self) -> bool:
        return bool(getattr(self.stdout, "isatty", lambda: False)())

    @property
    def stderr_isatty(self) -> bool:
        return bool(getattr(self.stderr, "isatty", lambda: False)())


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors become one line and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def command_modules(only: str | None = None) -> dict[str, object]:
    """Command modules by command name (``symbols_export`` -> ``symbols-export``): every one, or
    just ``only`` if that names a command."""
    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))
    by_command = {name.replace("_", "-"): name for name in names}
    if only in by_command:
        by_command = {only: by_command[only]}  # type: ignore[index]
    return {command: importlib.import_module(f"{commands.__name__}.{name}") for command, name in by_command.items()}


def _command_named(argv: Sequence[str]) -> str | None:
    """The command word of a command line (the first argument that is no global option)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of ``command`` (enough to parse a line naming it)."""
    parser = _Parser(prog="vmwatch", description="Virtual machine introspection from the outside.")
    parser.add_argument("--log-level", default=os.environ.get("VMWATCH_LOG", "warning"),
                        help="structlog level for diagnostics on stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in command_modules(command).items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def run(argv: Sequence[str], env: Environment | None = None) -> int:
    """Run one command line and return its exit status (what tests call)."""
    env = env or Environment()
    try:
        args = build_parser(_command_named(argv)).parse_args(list(argv))
    except _UsageError as exc:
        print(str(exc), file=env.stderr)
        return ExitStatus.BAD_INPUT
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from vmwatch import logs

    logs.configure_cli(args.log_level, env.stderr)
    try:
        return int(args._run(args, env) or 0)
    except VmwatchError as exc:
        print(f"vmwatch: error: {exc}", file=env.stderr)
        return ExitStatus.BAD_INPUT
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        from vmwatch.text import shown

        print(f"vmwatch: error: {exc.strerror}: {shown(str(exc.filename))}", file=env.stderr)
        return ExitStatus.BAD_INPUT
    except KeyboardInterrupt:
        print("vmwatch: interrupted", file=env.stderr)
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
