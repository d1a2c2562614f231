"""gdb remote protocol reply decoders: stop replies, thread lists, hex payloads (sans-IO)."""

from __future__ import annotations

import attrs

from vmwatch.errors import RemoteProtocolError
from vmwatch.live.gdbrsp._framing import _HEX


# ---------------------------------------------------------------- reply decoding


@attrs.frozen
class ThreadId:
    """A thread id, ``p<pid>.<tid>`` in multiprocess mode or a bare ``<tid>``."""

    tid: int
    pid: int | None = None

    @classmethod
    def parse(cls, text: bytes) -> ThreadId:
        try:
            if text.startswith(b"p"):
                pid, _, tid = text[1:].partition(b".")
                return cls(tid=_parse_tid(tid) if tid else -1, pid=_parse_tid(pid))
            return cls(tid=_parse_tid(text))
        except ValueError:
            raise RemoteProtocolError(f"bad gdb thread id {text!r}") from None

    def __str__(self) -> str:
        tid = "-1" if self.tid == -1 else f"{self.tid:x}"
        return tid if self.pid is None else f"p{self.pid:x}.{tid}"


def _parse_tid(text: bytes) -> int:
    return -1 if text == b"-1" else int(text, 16)


@attrs.frozen(kw_only=True)
class StopReply:
    """``S``/``T`` stop reply: the target stopped with ``signal``."""

    signal: int
    thread: ThreadId | None = None
    watch: tuple[str, int] | None = None
    """``("watch" | "rwatch" | "awatch", start of the watched range)`` for a watchpoint stop."""
    reason: str | None = None
    """``swbreak``/``hwbreak`` when the stub says so."""
    registers: dict[int, bytes] = attrs.field(factory=dict)
    """Expedited registers by number (raw target-order bytes)."""


@attrs.frozen
class Exited:
    """``W`` (exit code) or ``X`` (killed by signal): the target is gone."""

    status: int
    signalled: bool = False


@attrs.frozen
class Reply:
    """The reply packet to a plain command."""

    payload: bytes

    @property
    def is_error(self) -> bool:
        p = self.payload
        return len(p) == 3 and p[:1] == b"E" and p[1] in _HEX and p[2] in _HEX

    @property
    def unsupported(self) -> bool:
        return self.payload == b""

    @property
    def ok(self) -> bool:
        return self.payload == b"OK"


@attrs.frozen
class ConsoleOutput:
    """An ``O`` packet: text the stub prints while the target runs (e.g. monitor output)."""

    text: bytes


def parse_stop_reply(payload: bytes) -> StopReply | Exited:
    """Decode ``S05``, ``T05thread:p01.01;watch:ffff...;``, ``W00``, ``X09`` (and ``;process:..``).

    Raises:
        RemoteProtocolError: anything else.
    """
    if len(payload) < 3 or payload[1] not in _HEX or payload[2] not in _HEX:
        raise RemoteProtocolError(f"malformed gdb stop reply {payload[:40]!r}")
    kind, code = payload[:1], int(payload[1:3], 16)
    if kind in (b"W", b"X"):
        return Exited(code, signalled=kind == b"X")
    if kind == b"S":
        if len(payload) != 3:
            raise RemoteProtocolError(f"malformed gdb stop reply {payload[:40]!r}")
        return StopReply(signal=code)
    if kind != b"T":
        raise RemoteProtocolError(f"malformed gdb stop reply {payload[:40]!r}")
    thread = watch = reason = None
    registers: dict[int, bytes] = {}
    for pair in payload[3:].split(b";"):
        if not pair:
            continue
        key, sep, value = pair.partition(b":")
        if not sep:
            raise RemoteProtocolError(f"gdb stop reply field {pair[:40]!r} has no value")
        try:
            if key == b"thread":
                thread = ThreadId.parse(value)
            elif key in (b"watch", b"rwatch", b"awatch"):
                watch = (key.decode(), int(value, 16))
            elif key in (b"swbreak", b"hwbreak"):
                reason = key.decode()
            elif key and all(c in _HEX for c in key):
                registers[int(key, 16)] = bytes.fromhex(value.decode("ascii"))
            # other keys (core, library, exec, fork...) are allowed and ignored
        except ValueError:
            raise RemoteProtocolError(f"bad gdb stop reply field {pair[:40]!r}") from None
    return StopReply(signal=code, thread=thread, watch=watch, reason=reason, registers=registers)


def parse_thread_list(payload: bytes) -> list[ThreadId] | None:
    """Decode a ``qfThreadInfo`` reply: ``m p1.1,p1.2`` or ``l`` (end, returns ``None``)."""
    if payload == b"l":
        return None
    if not payload.startswith(b"m"):
        raise RemoteProtocolError(f"bad gdb thread list {payload[:40]!r}")
    return [ThreadId.parse(t) for t in payload[1:].split(b",") if t]


def decode_hex(payload: bytes) -> bytes:
    """Hex reply (``g``, ``m``, ``p``) to bytes.

    Raises:
        RemoteProtocolError: odd length or not hex (QEMU sends ``xx`` for unavailable bytes only
            in trace frames, which vmwatch does not use).
    """
    try:
        return bytes.fromhex(payload.decode("ascii"))
    except ValueError:
        raise RemoteProtocolError(f"gdb reply is not hex: {payload[:40]!r}") from None
