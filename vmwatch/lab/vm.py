"""The lab guest: QEMU booting the Debian kernel and the busybox initramfs to a root shell on serial.

Synchronous on purpose (usable from session-scoped pytest fixtures and plain scripts). Every
socket (serial, QMP) and the shared RAM file live in a private 0700 runtime directory; nothing
listens on TCP.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import weakref
from pathlib import Path

import attrs
import structlog

from vmwatch.errors import LabError, LinkError
from vmwatch.lab.busybox import busybox_for
from vmwatch.lab.cache import new_runtime_dir, runtime_base
from vmwatch.lab.initramfs import READY, build_initramfs
from vmwatch.lab.kernel import ARCHES, KernelPackage, ensure_kernel
from vmwatch.lab.process import is_our_qemu, kill_qemu, launch, pid_alive, remove_stale_runtime_dirs
from vmwatch.lab.qemu_command import LabConfig, kvm_usable, qemu_command
from vmwatch.lab.serial import FileLock, SerialConsole
from vmwatch.live.qmp._sync import SyncQmp

__all__ = ["KVM_GRACE", "LabConfig", "LabGuest", "default_state_file", "kvm_usable", "qemu_command"]

log = structlog.get_logger()

KVM_GRACE = 30.0
"""Seconds a KVM guest gets to reach its shell before the lab falls back to TCG."""


class LabGuest:
    """A running lab guest. ``LabGuest.start(config)`` boots one; ``stop()`` ends it."""

    def __init__(self, config: LabConfig, runtime_dir: Path, pid: int, *, kernel: KernelPackage,
                 accel: str = "tcg", process: subprocess.Popen[bytes] | None = None) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.pid = pid
        self.kernel = kernel
        self.accel = accel
        self.boot_seconds: float | None = None
        """Host seconds from ``start()`` to the shell (provisioning included)."""
        self.guest_seconds_to_shell: float | None = None
        """The guest's own uptime when its shell came up (the rest of boot_seconds is firmware,
        kernel decompression and provisioning)."""
        self._qmp: SyncQmp | None = None
        self._serial: SerialConsole | None = None
        self._lock = threading.Lock()
        self._process = process
        self._finalizer = weakref.finalize(self, kill_qemu, pid, runtime_dir, process)

    # -- paths -------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.runtime_dir / "qmp.sock"

    @property
    def lab_qmp_path(self) -> Path:
        """The lab's own monitor (``qmp()`` uses it), so ``qmp_path`` is never taken."""
        return self.runtime_dir / "lab-qmp.sock"

    @property
    def serial_path(self) -> Path:
        return self.runtime_dir / "serial.sock"

    @property
    def ram_path(self) -> Path | None:
        return self.runtime_dir / "ram" if self.config.shared_ram else None

    @property
    def kernel_release(self) -> str:
        return self.kernel.release

    @property
    def kernel_dir(self) -> Path:
        return self.kernel.root

    @property
    def target(self) -> str:
        """What to give vmwatch commands to attach to this guest."""
        return f"qemu:{self.qmp_path}"

    # -- life cycle --------------------------------------------------------------------------
    @classmethod
    def start(cls, config: LabConfig | None = None, *, timeout: float = 120.0,
              detached: bool = False) -> "LabGuest":
        """Provision (cached), boot, and wait for the root shell.

        QEMU dies with the thread that started it (so a killed test run leaks no guest) unless
        ``detached``: then it is daemonized and may outlive this process (see ``detach()``).

        Raises:
            LabError: a package is missing, the kernel cannot be fetched, or the guest did not boot.
        """
        config = config or LabConfig()
        t0 = time.monotonic()
        emulator = ARCHES[config.arch][2]
        if shutil.which(emulator) is None:
            raise LabError(f"{emulator} is missing (install the Debian package {config.board.debian_package})")
        kernel = ensure_kernel(config.arch)
        initrd = build_initramfs(kernel, busybox_for(config.arch))
        accel = config.accel
        if accel == "kvm" and (why := kvm_usable()):
            log.warning("lab.kvm_unavailable", reason=why, fallback="tcg")
            accel = "tcg"
        if accel == "kvm":
            # /dev/kvm can open and still not run a guest (nested hypervisors): a KVM boot takes a
            # second or two, so a guest without a shell after KVM_GRACE seconds means TCG instead.
            try:
                guest = cls._boot(config, kernel, initrd, "kvm", min(timeout, KVM_GRACE), detached)
            except LabError as exc:
                log.warning("lab.kvm_unavailable", reason=f"KVM guest did not boot: {str(exc)[:200]}",
                            fallback="tcg")
                accel = "tcg"
        if accel == "tcg":
            guest = cls._boot(config, kernel, initrd, "tcg", timeout, detached)
        guest.boot_seconds = time.monotonic() - t0
        log.info("lab.ready", seconds=round(guest.boot_seconds, 2), release=kernel.release)
        return guest

    @classmethod
    def _boot(cls, config: LabConfig, kernel: KernelPackage, initrd: Path, accel: str,
              timeout: float, detached: bool) -> "LabGuest":
        remove_stale_runtime_dirs()
        runtime = new_runtime_dir()
        deadline = time.monotonic() + timeout
        try:
            pid, process = launch(qemu_command(config, kernel, initrd, runtime, accel), runtime, timeout,
                                   detached=detached)
        except BaseException:
            shutil.rmtree(runtime, ignore_errors=True)
            raise
        guest = cls(config, runtime, pid, kernel=kernel, accel=accel, process=process)
        try:
            guest._wait_ready(deadline)
            if accel == "kvm" and not guest.qmp().execute("query-kvm").get("enabled"):
                log.warning("lab.kvm_unavailable", reason="QEMU could not enable KVM", fallback="tcg")
                guest.accel = "tcg"
        except BaseException:
            guest.stop()
            raise
        return guest

    def _wait_ready(self, deadline: float) -> None:
        wanted = [self.serial_path, self.qmp_path, self.lab_qmp_path] + ([self.ram_path] if self.ram_path else [])
        while not all(path.exists() for path in wanted):
            self._check_alive()
            if time.monotonic() > deadline:
                raise LabError(f"QEMU created no sockets in {self.runtime_dir}{self._diagnostics()}")
            time.sleep(0.01)
        for path in wanted:
            os.chmod(path, 0o600)  # the daemonized QEMU sets its own umask (027)
        serial = self._serial_link()
        found = serial.wait_for_pattern(re.compile(rb"%s (\S+) ([0-9.]+)\n" % READY.encode()), deadline,
                                        start=0, alive=self._check_alive)
        if found is None:
            raise LabError(f"the guest did not reach its shell in time{self._diagnostics()}")
        self.guest_seconds_to_shell = float(found[1].group(2))

    def _check_alive(self) -> None:
        if not self.alive:
            raise LabError(f"QEMU (pid {self.pid}) is no longer running{self._diagnostics()}")

    def _diagnostics(self) -> str:
        parts = []
        for name in ("qemu.log", "serial.log"):
            try:
                text = (self.runtime_dir / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"{name}: ...{text[-600:]}")
        return (": " + " | ".join(parts)) if parts else ""

    def stop(self) -> None:
        """Quit QEMU (QMP ``quit``, then SIGKILL if needed) and remove the runtime directory."""
        if self.alive:
            try:
                self.qmp().execute("quit", timeout=3)
            except LinkError:
                pass  # kill_qemu below makes sure
        self.close()
        self._finalizer.detach()
        kill_qemu(self.pid, self.runtime_dir, self._process)

    def detach(self) -> None:
        """Leave QEMU running after this object goes away (``vmwatch lab start``)."""
        if self._process is not None:
            raise LabError("only a guest started with detached=True can outlive this process")
        self._finalizer.detach()
        self.close()

    def close(self) -> None:
        """Drop our serial and QMP connections, leaving QEMU as it is (QEMU serves one serial client at a time)."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def __enter__(self) -> "LabGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to it -----------------------------------------------------------------------
    def qmp(self) -> SyncQmp:
        """The lab's own QMP connection (opened once, on its private monitor socket)."""
        if self._qmp is None:
            self._qmp = SyncQmp.connect(str(self.lab_qmp_path))
        return self._qmp

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ...)."""
        return str(self.qmp().execute("query-status")["status"])


    def shell(self, command: str, timeout: float = 30.0, *, check: bool = False) -> str:
        """Run ``command`` in the guest's root shell and return what it printed.

        Raises:
            LabError: no answer in time, QEMU died, or (with ``check``) the command failed.
        """
        status, output = self.shell_status(command, timeout)
        if check and status != 0:
            raise LabError(f"guest command {command!r} exited with {status}: {output.strip()[-300:]}")
        return output

    def shell_status(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """``(exit status, output)`` of ``command`` in the guest's root shell."""
        tag = f"VMW{secrets.token_hex(6)}"
        # Quotes split each marker in the text we send, so even an echoing terminal cannot fake it.
        # A subshell: `exit`, `cd` or a stray `exec` cannot take the console's shell down.
        script = f'echo "{tag[:3]}""{tag[3:]}B"\n(\n{command}\n) </dev/null\necho "{tag[:3]}""{tag[3:]}E$?"\n'
        begin, end = f"{tag}B\n".encode(), re.compile(rb"%sE(\d+)\n" % tag.encode())
        with self._lock, FileLock(self.runtime_dir / "serial.lock"):
            serial = self._serial_link()
            mark = serial.mark()
            serial.send(script.encode())
            deadline = time.monotonic() + timeout
            found = serial.wait_for_pattern(end, deadline, start=mark, alive=self._check_alive)
            if found is None:
                serial.send(b"\x03\n")
                raise LabError(f"guest command {command!r} gave no answer in {timeout:g} s{self._diagnostics()}")
            data, match = found
            start = data.find(begin)
            if start < 0:
                raise LabError(f"guest command {command!r}: begin marker lost on the serial line")
            output = data[start + len(begin):match.start()]
            return int(match.group(1)), output.decode(errors="replace")

    def _serial_link(self) -> "SerialConsole":
        if self._serial is None or self._serial.closed:
            self._serial = SerialConsole.connect(self.serial_path, self.runtime_dir / "serial.log")
        return self._serial

    def dump(self, path: str | os.PathLike[str], *, paging: bool = False, timeout: float = 120.0) -> Path:
        """Write an ELF core of guest memory (QMP ``dump-guest-memory``) to ``path``."""
        path = Path(path).resolve()
        self.qmp().execute("dump-guest-memory", paging=paging, protocol=f"file:{path}", timeout=timeout)
        return path

    # -- detached guests (the CLI) -----------------------------------------------------------
    def save_state(self, path: Path) -> None:
        state = {"pid": self.pid, "runtime_dir": str(self.runtime_dir), "accel": self.accel,
                 "config": attrs.asdict(self.config), "kernel": {
                     "arch": self.kernel.arch, "package": self.kernel.package,
                     "version": self.kernel.version, "release": self.kernel.release,
                     "root": str(self.kernel.root)}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    @classmethod
    def attach(cls, path: Path) -> "LabGuest":
        """The guest a state file describes (not stopped when this object goes away)."""
        try:
            state = json.loads(path.read_text())
            kernel = KernelPackage(**{**state["kernel"], "root": Path(state["kernel"]["root"])})
            guest = cls(LabConfig(**state["config"]), Path(state["runtime_dir"]), int(state["pid"]),
                        kernel=kernel, accel=state["accel"])
        except FileNotFoundError:
            raise LabError(f"no lab guest is running (no state file {path})") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"lab state file {path} is unreadable: {exc}") from exc
        guest._finalizer.detach()
        return guest

    @property
    def alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return pid_alive(self.pid) and is_our_qemu(self.pid, self.runtime_dir)


def default_state_file() -> Path:
    return runtime_base() / "lab.json"

