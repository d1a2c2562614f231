"""Per-user directories: a persistent cache (kernels, initramfs) and a private runtime area (sockets, RAM)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from vmwatch.errors import LabError


def cache_dir() -> Path:
    """``$VMWATCH_CACHE``, else ``$XDG_CACHE_HOME/vmwatch``, else ``~/.cache/vmwatch`` (created)."""
    if explicit := os.environ.get("VMWATCH_CACHE"):
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "vmwatch"
    base.mkdir(parents=True, exist_ok=True)
    return base


def runtime_base() -> Path:
    """The per-user runtime directory (mode 0700): ``$XDG_RUNTIME_DIR/vmwatch`` or ``/tmp/vmwatch-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "vmwatch" if xdg and Path(xdg).is_dir() else Path(tempfile.gettempdir()) / f"vmwatch-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    info = base.lstat()
    # Someone else's directory (or a symlink planted in /tmp) must not receive our sockets.
    if not base.is_dir() or base.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise LabError(f"runtime directory {base} is not a private directory owned by uid {os.getuid()}")
    return base


def new_runtime_dir(prefix: str = "lab-") -> Path:
    """A fresh private directory (0700) for one guest's sockets and RAM file."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_base()))
    os.chmod(path, 0o700)
    return path


def install_dir(unpacked: Path, final: Path) -> None:
    """Move a finished directory into place; another process that got there first wins."""
    if final.exists() and not (final / ".complete").exists() and not (final / "bin").exists():
        shutil.rmtree(final, ignore_errors=True)  # a crashed earlier attempt
    try:
        os.replace(unpacked, final)
    except OSError:
        if not final.exists():
            raise

