"""Where gdbs connect: a unix or TCP listener, and the loop that serves them one after another."""

from __future__ import annotations

import os

import structlog
import trio

from vmwatch.debug.session import DebugSession
from vmwatch.errors import VmwatchError
from vmwatch.gdbserver.serve import serve

log = structlog.get_logger()


def check_spec(spec: str) -> None:
    """Raise VmwatchError unless ``spec`` is ``unix:PATH`` or ``tcp:[HOST:]PORT``."""
    kind, _, where = spec.partition(":")
    port = where.rpartition(":")[2]
    if kind == "unix" and where or kind == "tcp" and port.isdigit() and int(port) < 65536:
        return
    raise VmwatchError(f"gdb listen address {spec!r}: expected unix:PATH or tcp:HOST:PORT")


async def open_listener(spec: str) -> trio.SocketListener:
    """A listener on ``unix:PATH`` (a stale socket file is replaced) or ``tcp:HOST:PORT``."""
    check_spec(spec)
    kind, _, where = spec.partition(":")
    if kind == "unix":
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        if os.path.exists(where):
            os.unlink(where)
        await sock.bind(where)
    else:
        host, _, port = where.rpartition(":")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((host or "127.0.0.1", int(port)))
    sock.listen(1)
    return trio.SocketListener(sock)


async def serve_each(listener: trio.SocketListener, session: DebugSession, vcpus: int, *,
                     survive: bool = False) -> None:
    """Serve gdbs one after another, forever. ``survive``: a client that breaks the protocol
    (or a read that fails) ends its own connection with a warning, not the caller."""
    async with listener:
        while True:
            stream = await listener.accept()
            await session.attach()
            async with stream:
                try:
                    await serve(stream, session, vcpus)
                except (VmwatchError, trio.BrokenResourceError) as exc:
                    if not survive:
                        raise
                    log.warning("gdbserver.client_dropped", error=str(exc))
