"""The lab guest: QEMU booting the Debian kernel and the busybox initramfs to a root shell on serial.

Synchronous on purpose (usable from session-scoped pytest fixtures and plain scripts). Every
socket (serial, QMP) and the shared RAM file live in a private 0700 runtime directory; nothing
listens on TCP.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import attrs
import structlog

from vmwatch.errors import LabError, LinkError
from vmwatch.lab.cache import cache_dir, new_runtime_dir, runtime_base
from vmwatch.lab.initramfs import READY, build_initramfs
from vmwatch.lab.kernel import ARCHES, KernelPackage, ensure_kernel
from vmwatch.live.qmp._sync import SyncQmp

log = structlog.get_logger()

_SIZE = re.compile(r"^[1-9][0-9]*[KMGT]?$")
_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1
KVM_GRACE = 30.0
"""Seconds a KVM guest gets to reach its shell before the lab falls back to TCG."""


def _check_memory(_: Any, __: Any, value: str) -> None:
    if not _SIZE.match(value):
        raise LabError(f"memory size {value!r} is not like 256M or 1G")


def _check_arch(_: Any, __: Any, value: str) -> None:
    if value not in ARCHES:
        raise LabError(f"unknown lab arch {value!r} (choose from {', '.join(ARCHES)})")


@attrs.frozen(kw_only=True)
class LabConfig:
    arch: str = attrs.field(default="amd64", validator=_check_arch)
    memory: str = attrs.field(default="256M", validator=_check_memory)
    cpus: int = 1
    cpu_model: str | None = None
    """QEMU ``-cpu`` model, e.g. ``qemu64,+la57`` for 5-level paging; QEMU's default if None."""
    accel: str = "tcg"
    """``tcg`` or ``kvm`` (falls back to TCG, with a warning, where KVM does not work)."""
    shared_ram: bool = True
    """Guest RAM in a ``memory-backend-file`` (share=on) that the host can mmap."""
    kaslr: bool = True
    """Boot vmlinuz as Debian does (KASLR on). False boots the uncompressed vmlinux through its PVH
    entry: several seconds faster under TCG, kernel at its link address (no KASLR)."""
    machine: str = "pc"
    append: str = ""
    """Extra kernel command-line words."""
    name: str = "vmwatch-lab"
    """QEMU ``-name``: what a fleet watch calls the guest (QMP ``query-name``)."""

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.cpus <= 64:
            raise LabError(f"cpus must be 1..64, not {self.cpus}")
        if self.accel not in ("tcg", "kvm"):
            raise LabError(f"accel must be tcg or kvm, not {self.accel!r}")

    @property
    def memory_bytes(self) -> int:
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(self.memory[-1], 1)
        return int(self.memory.rstrip("KMGT")) * unit


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def qemu_command(config: LabConfig, kernel: KernelPackage, initrd: Path, runtime: Path,
                 accel: str) -> list[str]:
    """The QEMU command line for a lab guest (pure, for tests and for ``vmwatch lab start --dry-run``)."""
    emulator = ARCHES[config.arch][2]
    machine = config.machine + (",memory-backend=ram" if config.shared_ram else "")
    argv = [emulator, "-name", config.name, "-machine", machine, "-m", config.memory,
            "-smp", str(config.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot"]
    argv += ["-accel", "kvm", "-accel", "tcg"] if accel == "kvm" else ["-accel", "tcg"]
    if config.cpu_model:
        argv += ["-cpu", config.cpu_model]
    if config.shared_ram:
        argv += ["-object", f"memory-backend-file,id=ram,size={config.memory},"
                            f"mem-path={runtime / 'ram'},share=on"]
    append = f"console=ttyS0 quiet loglevel=1 panic=-1 {config.append}".strip()
    image = kernel.vmlinuz if config.kaslr else kernel.vmlinux()
    argv += ["-kernel", str(image), "-initrd", str(initrd), "-append", append,
             "-chardev", f"socket,id=serial0,path={runtime / 'serial.sock'},server=on,wait=off",
             "-serial", "chardev:serial0",
             "-qmp", f"unix:{runtime / 'qmp.sock'},server=on,wait=off",
             # A second monitor for LabGuest itself: a QMP socket serves one client at a time, and
             # qmp.sock must stay free for vmwatch's backends (and users).
             "-chardev", f"socket,id=labqmp,path={runtime / 'lab-qmp.sock'},server=on,wait=off",
             "-mon", "chardev=labqmp,mode=control",
             "-pidfile", str(runtime / "qemu.pid")]
    return argv


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
        self._serial: _Serial | None = None
        self._lock = threading.Lock()
        self._process = process
        self._finalizer = weakref.finalize(self, _kill, pid, runtime_dir, process)

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
            raise LabError(f"{emulator} is missing (install the Debian package qemu-system-x86)")
        kernel = ensure_kernel(config.arch)
        initrd = build_initramfs(kernel, _busybox(config.arch))
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
        _remove_stale_runtime_dirs()
        runtime = new_runtime_dir()
        deadline = time.monotonic() + timeout
        try:
            pid, process = _launch(qemu_command(config, kernel, initrd, runtime, accel), runtime, timeout,
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
                pass  # _kill below makes sure
        self.close()
        self._finalizer.detach()
        _kill(self.pid, self.runtime_dir, self._process)

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
        with self._lock, _FileLock(self.runtime_dir / "serial.lock"):
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

    def _serial_link(self) -> "_Serial":
        if self._serial is None or self._serial.closed:
            self._serial = _Serial.connect(self.serial_path, self.runtime_dir / "serial.log")
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
        return _pid_alive(self.pid) and _is_our_qemu(self.pid, self.runtime_dir)


def _launch(argv: list[str], runtime: Path, timeout: float, *,
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
        _kill_from_pidfile(runtime)
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


def _kill_from_pidfile(runtime: Path) -> None:
    try:
        _kill(int((runtime / "qemu.pid").read_text()), runtime)
    except (OSError, ValueError):
        pass


def default_state_file() -> Path:
    return runtime_base() / "lab.json"


def _busybox(arch: str) -> Path:
    if arch == "amd64":
        path = Path("/bin/busybox")
        if not path.exists():
            raise LabError("/bin/busybox is missing (install the Debian package busybox-static)")
        return path
    from vmwatch.lab.kernel import ensure_foreign_busybox

    return ensure_foreign_busybox(ARCHES[arch][1], cache_dir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_qemu(pid: int, runtime: Path) -> bool:
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


def _remove_stale_runtime_dirs(min_age: float = 120.0) -> None:
    """Runtime directories (with their RAM files) left by runs that were killed before cleaning up."""
    for path in runtime_base().glob("lab-*"):
        try:
            if time.time() - path.stat().st_mtime < min_age:
                continue  # maybe a guest being launched right now
            pid = int((path / "qemu.pid").read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and _is_our_qemu(pid, path):
            continue
        log.info("lab.stale_runtime_removed", path=str(path))
        shutil.rmtree(path, ignore_errors=True)


def _kill(pid: int, runtime: Path, process: subprocess.Popen[bytes] | None = None) -> None:
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
        if not _is_our_qemu(pid, runtime):
            break
        os.kill(pid, sig)
        while _is_our_qemu(pid, runtime) and time.monotonic() < deadline:
            time.sleep(0.02)
        deadline += 5
    shutil.rmtree(runtime, ignore_errors=True)


class _FileLock:
    """One user of the serial console at a time, across processes (CLI and library)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class _Serial:
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
    def connect(cls, path: Path, log_path: Path) -> "_Serial":
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
