"""Blocking QMP client on a unix socket, for synchronous callers (the lab guest, fixtures)."""

from __future__ import annotations

import collections
import socket
import time
from typing import Any, Mapping

from vmwatch.errors import LinkClosedError, LinkError
from vmwatch.live.qmp._proto import NEED_DATA, Closed, Error, Event, Greeting, QmpConnection, QmpError, Return


class SyncQmp:
    """``SyncQmp.connect(path)`` -> negotiated client; ``execute(cmd, **args)``; ``events`` deque."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._conn = QmpConnection()
        self.events: collections.deque[Event] = collections.deque(maxlen=4096)
        self.greeting: Greeting | None = None

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> "SyncQmp":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise LinkError(f"cannot connect to QMP socket {path}: {exc}") from exc
        client = cls(sock, timeout)
        try:
            message = client._next_message(time.monotonic() + timeout)
            assert isinstance(message, Greeting)  # the core's state table allows nothing else
            client.greeting = message
            client.execute("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                timeout: float | None = None, **kwargs: Any) -> Any:
        """Run a command and return its ``return`` value; keyword names get ``_`` -> ``-``.

        Raises:
            QmpError: QEMU answered with an error.
            LinkClosedError: the connection closed first.
        """
        args = dict(arguments or {})
        args.update({key.replace("_", "-"): value for key, value in kwargs.items()})
        ident, data = self._conn.send_command(command, args)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._conn.send_failed()
            raise LinkClosedError(f"QMP connection lost sending {command}: {exc}") from exc
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while True:
            message = self._next_message(deadline)
            if isinstance(message, Event):
                self.events.append(message)
            elif isinstance(message, (Return, Error)) and message.id in (ident, None):
                if isinstance(message, Error):
                    raise QmpError(command, message.error_class, message.desc)
                return message.value

    def _next_message(self, deadline: float) -> Greeting | Return | Error | Event:
        while True:
            message = self._conn.next_event()
            if isinstance(message, Closed):
                raise LinkClosedError("QEMU closed the QMP connection")
            if message is not NEED_DATA:
                return message  # type: ignore[return-value]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkError("QMP: no reply from QEMU in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                data = b""
                if not isinstance(exc, ConnectionResetError):
                    raise LinkClosedError(f"QMP connection failed: {exc}") from exc
            self._conn.receive_data(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "SyncQmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
