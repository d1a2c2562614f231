"""Small on-disk cache for parsed kernel profiles (BTF indexes, decoded kallsyms).

Entries are marshal files under ``$VMWATCH_CACHE_DIR`` (default ``~/.cache/vmwatch``)/linux,
keyed by a digest of what they were computed from. A corrupt or unreadable entry is a miss.
"""

from __future__ import annotations

import marshal
import os
import tempfile
from pathlib import Path

_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("VMWATCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vmwatch")
    return Path(root) / "linux"


def load(kind: str, key: str) -> object | None:
    """The cached value, or None on a miss or a damaged entry."""
    try:
        data = (cache_dir() / f"{kind}-{key}.marshal").read_bytes()
        version, value = marshal.loads(data)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return value if version == _VERSION else None


def store(kind: str, key: str, value: object) -> None:
    """Write atomically; a read-only or full disk only costs speed."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{kind}-")
        with os.fdopen(fd, "wb") as out:
            marshal.dump((_VERSION, value), out)
        os.replace(tmp, directory / f"{kind}-{key}.marshal")
    except OSError:
        pass
