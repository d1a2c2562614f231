"""The one way the fuzz tests load a hostile symbol file."""

from __future__ import annotations

from typing import Any, Callable

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.symbols import load_symbols_file


def load_or_refused(path: Any, error: type[VmwatchError] = VmwatchError,
                    check: Callable[[Any], None] | None = None) -> None:
    """``path`` loads (``check`` passes on it) and answers for task_struct, or is refused with
    ``error`` and a message; any other exception fails the test."""
    try:
        found = load_symbols_file(str(path))
        if check is not None:
            check(found)
        if found.types is not None:
            found.types.struct("task_struct")
    except error as exc:
        assert str(exc)
