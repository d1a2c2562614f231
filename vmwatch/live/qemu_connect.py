"""Reaching a QEMU's parts from its QMP socket: shared RAM file, gdbstub socket, registers, vCPUs.

The steps of :func:`vmwatch.live.qemu.attach_qemu`, each on its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
import time
from typing import Callable, Iterator

import structlog
import trio

from vmwatch.errors import LinkClosedError, LinkError, ProtocolError
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import GdbConnection
from vmwatch.live.qemu_events import SIGINT
from vmwatch.live.qemu_ram import GdbMemory, SharedRam, ram_runs

log = structlog.get_logger()

STALE_SOCKET_AGE = 60.0
"""Seconds an unbound gdbstub socket file must be old before it counts as left by a QEMU gone."""
ATTACH_DEADLINE = 10.0
"""Seconds QMP or the gdbstub may take over one step of attaching (each answers in milliseconds)."""


@contextlib.contextmanager
def answered_within(what: str, seconds: float = ATTACH_DEADLINE) -> Iterator[None]:
    """Turn a peer's silence past ``seconds`` into LinkClosedError naming ``what``."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise LinkClosedError(f"{what} gave no answer in {seconds:g} s (is QEMU stopped?)") from None


async def find_ram(qmp: object) -> list[tuple[str, str]]:
    """``(region name, file path)`` of every shared memory-backend-file."""
    found = []
    for child in await qmp.execute("qom-list", path="/objects"):
        if child.get("type") != "child<memory-backend-file>":
            continue
        obj = f"/objects/{child['name']}"
        if not await qmp.execute("qom-get", path=obj, property="share"):
            continue  # a private mapping: the file does not show the guest's writes
        path = await qmp.execute("qom-get", path=obj, property="mem-path")
        found.append((child["name"], path))
        found.append((obj, path))  # x-use-canonical-path-for-ramblock-id names the region by path
    return found


def _private_dir() -> str:
    """``$TMPDIR/vmwatch-<uid>``, mode 0700 and ours, for gdbstub sockets we ask QEMU to open.

    The sockets outlive an attach: QEMU 7.2 cannot start a second gdbstub ("duplicate yank
    instance"), so the next attach finds and reuses the first one. Sockets of QEMUs that are
    gone are removed here.
    """
    path = os.path.join(tempfile.gettempdir(), f"vmwatch-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path) or os.path.islink(path):
        raise LinkError(f"{path} is not a private directory of ours (mode {st.st_mode & 0o777:o})")
    # A socket file nobody listens on any more (its QEMU exited) is removed. Never probe by
    # connecting: a gdbstub stops its guest when a client connects.
    try:
        with open("/proc/net/unix") as f:
            bound = {line.split()[-1] for line in f if len(line.split()) >= 8}
    except OSError:
        bound = None
    # A socket bound after /proc/net/unix was read is young: another attach (a fleet's next guest,
    # another vmwatch) is starting it, so only sockets older than STALE_SOCKET_AGE go.
    now = time.time()
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if bound is not None and name.startswith("gdb-") and name.endswith(".sock") and full not in bound:
            with contextlib.suppress(OSError):
                if now - os.lstat(full).st_mtime > STALE_SOCKET_AGE:
                    os.unlink(full)
    return path


async def gdb_socket(qmp: object) -> str:
    """Path of a gdbstub unix socket: QEMU's existing one or a new one we start."""
    for chardev in await qmp.execute("query-chardev"):
        name = chardev.get("filename", "")
        if chardev.get("label") == "gdb":
            name = name.removeprefix("disconnected:")
            path = name[len("unix:"):].split(",")[0] if name.startswith("unix:") else ""
            if path and os.path.exists(path):
                return path
            raise LinkError(f"QEMU's gdbstub listens on {name!r}, which vmwatch cannot reach "
                            "(and QEMU cannot start a second one)")
    path = os.path.join(await trio.to_thread.run_sync(_private_dir), f"gdb-{secrets.token_hex(6)}.sock")
    reply = await qmp.execute("human-monitor-command", command_line=f"gdbserver unix:{path},server=on,wait=off")
    if not os.path.exists(path):
        raise LinkError(f"QEMU did not start a gdbstub at {path}: {str(reply).strip()}")
    return path


async def connect_gdb(path: str) -> GdbConnection:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise LinkClosedError(f"cannot connect to gdbstub at {path}: {exc.strerror or exc}") from exc
    return GdbConnection(stream)


async def fetch_layout(gdb: GdbConnection) -> tuple[str | None, list[p.RegisterInfo]]:
    """The target's ``<architecture>`` and its registers, from target.xml and what it includes."""
    docs: dict[str, bytes] = {}

    async def fetch(name: str, depth: int) -> None:
        if name in docs or depth > 8:
            return
        docs[name] = await gdb.read_features(name)
        for inc in p.parse_target_xml(docs[name])[0]:
            await fetch(inc, depth + 1)

    await fetch("target.xml", 0)
    return p.target_architecture(docs["target.xml"]), p.register_layout(docs.__getitem__)


async def thread_list(gdb: GdbConnection) -> list[p.ThreadId]:
    threads: list[p.ThreadId] = []
    chunk = p.parse_thread_list(await gdb.request(p.query_threads(True)))
    while chunk:
        threads.extend(chunk)
        if len(threads) > 4096:
            raise ProtocolError("gdbstub lists more than 4096 threads")
        chunk = p.parse_thread_list(await gdb.request(p.query_threads(False)))
    if not threads:
        raise ProtocolError("gdbstub lists no threads")
    return threads


_WARNED: list[bool] = []
"""Say once per process that memory goes through the gdbstub."""


def open_memory(gdb: GdbConnection, ram: list[tuple[str, str]], mtree: str, writable: bool, *,
                link_idle: Callable[[], bool], keep_stop: Callable[[p.StopReply | p.Exited], None],
                set_phys_mode: Callable[[bool], None]) -> SharedRam | GdbMemory:
    """Guest RAM: the shared memory-backend-file when QEMU has one, else reads over the gdbstub
    (``link_idle``, ``keep_stop`` and ``set_phys_mode`` let those share the link with the event loop)."""
    if ram:
        paths = {path for _, path in ram}
        if len(paths) == 1:
            runs = ram_runs(mtree, [name for name, _ in ram])
            if runs:
                return SharedRam(paths.pop(), runs, writable=writable)
    if not _WARNED:
        _WARNED.append(True)
        log.warning("qemu.slow_memory", reason="no shared memory-backend-file: reading guest RAM through the gdbstub",
                    hint="start QEMU with -object memory-backend-file,share=on,... -machine memory-backend=...")

    def on_stop(stop: p.StopReply | p.Exited) -> bool:
        # called from a synchronous read that interrupted the guest: a real event stays queued
        if isinstance(stop, p.StopReply) and stop.signal == SIGINT:
            return True
        keep_stop(stop)
        return False

    sock = socket.fromfd(gdb.stream.socket.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    return GdbMemory(gdb.core, sock, ram_runs(mtree, None),
                     link_idle=link_idle, on_stop=on_stop, set_phys_mode=set_phys_mode, writable=writable)
