"""Entry point: parse, dispatch to a command module, map errors to exit statuses in one place."""

from __future__ import annotations

import argparse
import enum
import importlib
import os
import pkgutil
import sys
from typing import IO, Sequence

import attrs

from vmwatch.cli import commands
from vmwatch.errors import VmwatchError


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    BAD_INPUT = 2
    INTERRUPTED = 130


@attrs.define
class Environment:
    """The streams a command writes to; tests replace them."""

    stdout: IO[str] = attrs.field(factory=lambda: sys.stdout)
    stderr: IO[str] = attrs.field(factory=lambda: sys.stderr)
    stdin: IO[str] = attrs.field(factory=lambda: sys.stdin)

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


def command_modules() -> dict[str, object]:
    """Every command module by its command name (``symbols_export`` -> ``symbols-export``)."""
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        found[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return dict(sorted(found.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmwatch", description="Virtual machine introspection from the outside.")
    parser.add_argument("--log-level", default=os.environ.get("VMWATCH_LOG", "warning"),
                        help="structlog level for diagnostics on stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in command_modules().items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def run(argv: Sequence[str], env: Environment | None = None) -> int:
    """Run one command line and return its exit status (what tests call)."""
    env = env or Environment()
    try:
        args = build_parser().parse_args(list(argv))
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
        print(f"vmwatch: error: {exc.strerror}: {exc.filename}", file=env.stderr)
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
