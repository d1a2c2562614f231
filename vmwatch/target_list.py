"""The targets of a fleet watch: specs from the command line and ``--targets FILE``, socket globs expanded.

``qemu:/run/vms/*/qmp.sock`` names every QMP socket it matches (sorted); a file holds one
target per line (blank lines and ``#`` comments skipped). The same guest named twice, by two
globs or a glob and a path, is watched once (first mention wins): one QMP socket serves one
client, so a second watch of it could not attach anyway.
"""

from __future__ import annotations

import glob
import os
from typing import Iterable

from vmwatch.errors import TargetListError
from vmwatch.target import QEMU_PREFIX

_GLOB_CHARS = frozenset("*?[")


def read_targets_file(path: str) -> list[str]:
    """The targets listed in ``path``, one per line.

    Raises:
        TargetListError: the file cannot be read or is not text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TargetListError(f"cannot read the target list {path}: {exc.strerror or exc}", spec=path) from None
    except UnicodeDecodeError as exc:
        raise TargetListError(f"the target list {path} is not UTF-8 text (byte {exc.start:#x})", spec=path) from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def expand_targets(specs: Iterable[str], *, files: Iterable[str] = ()) -> list[str]:
    """Every target to watch, in the order named, globs expanded, duplicates dropped.

    Raises:
        TargetListError: a file cannot be read, a glob matches no socket, or nothing is named.
    """
    named = list(specs)
    for path in files:
        named += read_targets_file(path)
    out: list[str] = []
    seen: set[str] = set()
    for spec in named:
        for target in _expand(spec):
            key = _identity(target)
            if key not in seen:
                seen.add(key)
                out.append(target)
    if not out:
        raise TargetListError("no targets to watch (name qemu:/path/qmp.sock, a glob of them, or --targets FILE)")
    return out


def is_glob(spec: str) -> bool:
    """``qemu:`` with a pattern for its socket path (``*``, ``?``, ``[...]``) that is not itself
    an existing path (a socket may well be called ``vm[1].sock``)."""
    if not spec.startswith(QEMU_PREFIX) or not _GLOB_CHARS & set(spec):
        return False
    return not os.path.lexists(spec[len(QEMU_PREFIX):])


def _expand(spec: str) -> list[str]:
    if not is_glob(spec):
        return [spec]
    pattern = spec[len(QEMU_PREFIX):]
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise TargetListError(f"no QMP socket matches {spec!r}", spec=spec)
    return [QEMU_PREFIX + path for path in matches]


def _identity(spec: str) -> str:
    """One key per guest however it is spelled (``./a`` and ``/x/a``, a symlinked directory)."""
    if spec.startswith(QEMU_PREFIX):
        return QEMU_PREFIX + os.path.realpath(spec[len(QEMU_PREFIX):])
    return os.path.realpath(spec)
