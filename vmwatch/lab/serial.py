"""The lab guest's serial console: a socket drained by a thread, searched for markers, one user at a time."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from vmwatch.errors import LabError


class FileLock:
    """One user of the serial console at a time, across processes (CLI and library)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class SerialConsole:
    """The serial console socket, drained by a thread so the guest never blocks on its console."""

    _KEEP = 1 << 20
    """Bytes kept from before the current command (diagnostics)."""
    _MAX = 64 << 20
    """A command printing more than this loses its begin marker (and fails) rather than eating RAM."""

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._dropped = 0
        self._floor = 0
        self._cond = threading.Condition()
        self.closed = False
        self._log = open(log_path, "ab")
        self._thread = threading.Thread(target=self._reader, name="lab-serial", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: Path, log_path: Path) -> "SerialConsole":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise LabError(f"cannot connect to the guest's serial console {path}: {exc}") from exc
        return cls(sock, log_path)

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self.closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                # Keep everything since the current command's mark, up to _MAX.
                droppable = max(self._floor - self._dropped - self._KEEP, len(self._buf) - self._MAX)
                if droppable > self._KEEP:
                    self._dropped += droppable
                    del self._buf[:droppable]
                self._cond.notify_all()
            try:
                self._log.write(data)
                self._log.flush()
            except (OSError, ValueError):
                pass

    def mark(self) -> int:
        """A position in the stream; later searches start there."""
        with self._cond:
            self._floor = self._dropped + len(self._buf)
            return self._floor

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise LabError(f"serial console write failed: {exc}") from exc

    def wait_for_pattern(self, pattern: re.Pattern[bytes], deadline: float, *, start: int,
                         alive: Any) -> tuple[bytes, re.Match[bytes]] | None:
        with self._cond:
            while True:
                data = bytes(self._buf[max(0, start - self._dropped):])
                match = pattern.search(data)
                if match:
                    return data, match
                if self.closed:
                    alive()
                    raise LabError("the guest's serial console closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))
                alive()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)
        self._log.close()
