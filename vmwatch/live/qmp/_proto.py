"""Sans-IO core of the QEMU Machine Protocol: bytes in -> messages out, commands -> bytes.

QEMU writes one JSON object per line. The client waits for the greeting, sends
``qmp_capabilities`` and is then READY: every command carries an id and its ``return`` or
``error`` comes back with that id, while asynchronous events arrive in between at any time.
No I/O here and no trio: the wrappers in ``_trio`` and ``_sync`` feed this core.
"""

from __future__ import annotations

import enum
import itertools
import json
from typing import Any, Mapping

import attrs

from vmwatch.errors import LinkClosedError, LinkError, LocalProtocolError, RemoteProtocolError

MAX_LINE = 64 * 1024 * 1024
"""A peer that sends a longer line without a newline is broken (or hostile)."""


class State(enum.Enum):
    GREETING = "waiting for the greeting"
    CAPABILITIES = "greeting received, capabilities not negotiated"
    NEGOTIATING = "waiting for the reply to qmp_capabilities"
    READY = "ready"
    CLOSED = "closed"


@attrs.frozen
class Greeting:
    version: Mapping[str, Any]
    capabilities: tuple[str, ...]


@attrs.frozen
class Return:
    id: Any
    value: Any


@attrs.frozen
class Error:
    id: Any
    error_class: str
    desc: str


@attrs.frozen
class Event:
    name: str
    data: Mapping[str, Any]
    timestamp: float | None
    """Seconds since the epoch, as QEMU stamped it."""


@attrs.frozen
class Closed:
    """The peer closed the connection (``receive_data(b"")``)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Message = Greeting | Return | Error | Event | Closed


class QmpError(LinkError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command}: {error_class}: {desc}")


class _Violation(Exception):
    """The one internal error kind; the receive boundary turns it into RemoteProtocolError."""


# (state, kind of message received) -> next state. A missing key is a protocol violation.
_RECEIVE: dict[tuple[State, type], State] = {
    (State.GREETING, Greeting): State.CAPABILITIES,
    (State.NEGOTIATING, Return): State.READY,
    (State.NEGOTIATING, Event): State.NEGOTIATING,
    (State.READY, Return): State.READY,
    (State.READY, Error): State.READY,
    (State.READY, Event): State.READY,
}
# state -> the commands we may send in it (None: any).
_SEND: dict[State, frozenset[str] | None] = {
    State.CAPABILITIES: frozenset({"qmp_capabilities"}),
    State.READY: None,
}


class QmpConnection:
    """One client side of a QMP connection."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self._buffer = bytearray()
        self._eof = False
        self._ids = itertools.count(1)
        self.pending: dict[int, str] = {}
        """Ids of commands sent and not answered yet -> command name."""

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means it closed the connection."""
        if self._eof and data:
            raise LocalProtocolError("data received after the end of the stream")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Message | _NeedData:
        """The next complete message, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: QEMU sent something QMP does not allow (bad JSON, unknown id...).
        """
        if self.state is State.CLOSED:
            return Closed()
        try:
            return self._next()
        except _Violation as exc:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"QMP peer: {exc}") from None

    def _next(self) -> Message | _NeedData:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                raise _Violation(f"line longer than {MAX_LINE} bytes")
            if self._eof:
                if self._buffer.strip():
                    raise _Violation("connection closed in the middle of a message")
                self.state = State.CLOSED
                return Closed()
            return NEED_DATA
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        if not line.strip():
            return self._next()
        message = _parse(line)
        key = (self.state, type(message))
        if key not in _RECEIVE:
            raise _Violation(f"unexpected {type(message).__name__} in state {self.state.name}")
        if isinstance(message, (Return, Error)):
            if message.id is None and isinstance(message, Error):
                pass  # QEMU could not parse a command well enough to find its id
            elif message.id not in self.pending:
                raise _Violation(f"reply with unknown id {message.id!r}")
            else:
                del self.pending[message.id]
        self.state = _RECEIVE[key]
        return message

    def send_command(self, name: str, arguments: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        """Encode a command; returns ``(id, bytes to send)``.

        Raises:
            LocalProtocolError: the command is not allowed in the current state.
        """
        allowed = _SEND.get(self.state, frozenset())
        if allowed is not None and name not in allowed:
            if self.state is State.CLOSED:
                raise LinkClosedError(f"QMP connection is closed (sending {name})")
            raise LocalProtocolError(f"cannot send {name!r} in state {self.state.name} ({self.state.value})")
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": name, "id": ident}
        if arguments:
            message["arguments"] = dict(arguments)
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self.pending[ident] = name
        if name == "qmp_capabilities" and self.state is State.CAPABILITIES:
            self.state = State.NEGOTIATING
        return ident, data

    def send_failed(self) -> None:
        """The wrapper could not send what ``send_command`` produced: the stream is unusable."""
        self.state = State.CLOSED


def _parse(line: bytes) -> Message:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Violation(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Violation(f"message is a {type(obj).__name__}, not an object")
    if "QMP" in obj:
        qmp = obj["QMP"]
        if not isinstance(qmp, dict) or not isinstance(qmp.get("version", {}), dict):
            raise _Violation("malformed greeting")
        caps = qmp.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise _Violation("malformed greeting capabilities")
        return Greeting(qmp.get("version", {}), tuple(caps))
    if "return" in obj:
        return Return(_hashable_id(obj.get("id")), obj["return"])
    if "error" in obj:
        error = obj["error"]
        if not isinstance(error, dict):
            raise _Violation("malformed error")
        return Error(_hashable_id(obj.get("id")), str(error.get("class", "GenericError")), str(error.get("desc", "")))
    if "event" in obj:
        if not isinstance(obj["event"], str):
            raise _Violation("malformed event name")
        data = obj.get("data", {})
        if not isinstance(data, dict):
            raise _Violation("malformed event data")
        return Event(obj["event"], data, _timestamp(obj.get("timestamp")))
    raise _Violation(f"unknown message with keys {sorted(obj)[:5]}")


def _hashable_id(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise _Violation(f"unhashable id {value!r:.40}")
    return value


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, dict):
        return None
    seconds, micro = value.get("seconds"), value.get("microseconds")
    if isinstance(seconds, int) and isinstance(micro, int):
        return seconds + micro / 1e6
    return None
