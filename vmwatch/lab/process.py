"""QEMU as a process: launching it (attached or daemonized), telling it from a recycled pid, killing it,
and removing the runtime directories of guests whose owner was killed."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import structlog

from vmwatch.errors import LabError
from vmwatch.lab.cache import runtime_base

log = structlog.get_logger()

_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1


def launch(argv: list[str], runtime: Path, timeout: float, *,
            detached: bool) -> tuple[int, subprocess.Popen[bytes] | None]:
    """Start QEMU; returns its pid and, unless detached, its Popen.

    Attached: a child that gets SIGTERM when the starting thread dies (PR_SET_PDEATHSIG), so a
    killed test run leaves no guest behind. Detached: -daemonize, QEMU detaches once its sockets
    are up and outlives `vmwatch lab start`. umask 077: sockets and RAM file private from birth.
    """
    if len(str(runtime / "lab-qmp.sock")) > _SUN_PATH_MAX:
        raise LabError(f"runtime directory {runtime} is too long for unix socket paths")
    log.info("lab.start", argv=" ".join(argv))
    if not detached:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: nothing to load after

        def spawn() -> subprocess.Popen[bytes]:
            with open(runtime / "qemu.log", "wb") as qemu_log:
                return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                        stderr=subprocess.STDOUT, umask=0o077, start_new_session=True,
                                        preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM))

        try:
            process = _forker().submit(spawn).result()
        except OSError as exc:
            raise LabError(f"cannot run {argv[0]}: {exc}") from exc
        return process.pid, process
    try:
        with open(runtime / "qemu.log", "wb") as qemu_log:
            launcher = subprocess.run([*argv, "-daemonize"], stdin=subprocess.DEVNULL, stdout=qemu_log,
                                      stderr=subprocess.STDOUT, timeout=timeout, umask=0o077)
    except subprocess.TimeoutExpired:
        kill_from_pidfile(runtime)
        raise LabError(f"QEMU did not finish starting in {timeout:g} s") from None
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc}") from exc
    if launcher.returncode != 0:
        log_text = (runtime / "qemu.log").read_text(errors="replace").strip()
        raise LabError(f"QEMU failed to start (status {launcher.returncode}): {log_text[-600:]}")
    try:
        return int((runtime / "qemu.pid").read_text()), None
    except (OSError, ValueError) as exc:
        raise LabError(f"QEMU started but wrote no pid file: {exc}") from exc


def kill_from_pidfile(runtime: Path) -> None:
    try:
        kill_qemu(int((runtime / "qemu.pid").read_text()), runtime)
    except (OSError, ValueError):
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_our_qemu(pid: int, runtime: Path) -> bool:
    """Guards against signalling a recycled pid: QEMU's command line names our runtime dir."""
    try:
        return str(runtime).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


_FORKER: concurrent.futures.ThreadPoolExecutor | None = None
_FORKER_LOCK = threading.Lock()


def _forker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that forks attached QEMUs. PR_SET_PDEATHSIG fires when the *thread* that
    forked exits, so it must not be a short-lived worker (e.g. trio.to_thread); this one lives
    until the interpreter shuts down."""
    global _FORKER
    with _FORKER_LOCK:
        if _FORKER is None:
            _FORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lab-qemu-parent")
        return _FORKER


def remove_stale_runtime_dirs(min_age: float = 120.0) -> None:
    """Runtime directories (with their RAM files) left by runs that were killed before cleaning up."""
    for path in runtime_base().glob("lab-*"):
        try:
            if time.time() - path.stat().st_mtime < min_age:
                continue  # maybe a guest being launched right now
            pid = int((path / "qemu.pid").read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and is_our_qemu(pid, path):
            continue
        log.info("lab.stale_runtime_removed", path=str(path))
        shutil.rmtree(path, ignore_errors=True)


def kill_qemu(pid: int, runtime: Path, process: subprocess.Popen[bytes] | None = None) -> None:
    """Make sure QEMU is gone (SIGTERM, then SIGKILL) and its runtime directory (with the RAM file) removed."""
    if process is not None:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 5
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not is_our_qemu(pid, runtime):
            break
        os.kill(pid, sig)
        while is_our_qemu(pid, runtime) and time.monotonic() < deadline:
            time.sleep(0.02)
        deadline += 5
    shutil.rmtree(runtime, ignore_errors=True)
