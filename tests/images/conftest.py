"""Fixtures for the image tests: a tiny blocking QMP client driving a real QEMU started with -S."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


class Qemu:
    """A paused QEMU (no guest code runs) we can ask to dump its memory."""

    def __init__(self, binary: str, tmp: Path, *args: str) -> None:
        self.sock_path = tmp / f"qmp-{len(list(tmp.glob('qmp-*.sock')))}.sock"
        self.sock = None
        self.proc = subprocess.Popen(
            [binary, "-S", "-display", "none", "-nodefaults", "-qmp",
             f"unix:{self.sock_path},server=on,wait=off", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(60)
                sock.connect(str(self.sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError("QEMU's QMP socket never accepted a connection") from None
                time.sleep(0.02)
        self.sock = sock
        self.file = sock.makefile("rwb")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": line})

    def dump(self, path: Path, **extra) -> Path:
        self.execute("dump-guest-memory", paging=False, protocol=f"file:{path}", **extra)
        return path

    def close(self) -> None:
        """Quit QEMU politely, then make sure: the process never outlives the test."""
        if self.sock is not None:
            try:
                self.execute("quit")
            except (OSError, RuntimeError, ValueError):
                pass
            self.file.close()
            self.sock.close()
            self.sock = None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def qemu(tmp_path):
    """Factory: ``qemu(binary, *args)`` starts a paused QEMU; all are stopped after the test."""
    started = []

    def start(binary: str = "qemu-system-x86_64", *args: str) -> Qemu:
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not installed")
        q = Qemu(binary, tmp_path, *args)  # closes itself if it cannot start
        started.append(q)
        return q

    yield start
    for q in started:
        q.close()


# ../shared/samples of the checkout; a worktree one level deeper (/work/wt/NAME) finds it too
SAMPLES = next((p / "shared" / "samples" for p in Path(__file__).resolve().parents[2:5]
                if (p / "shared" / "samples").is_dir()), Path(__file__).resolve().parents[3] / "shared" / "samples")


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip("../shared/samples not present")
    return SAMPLES
