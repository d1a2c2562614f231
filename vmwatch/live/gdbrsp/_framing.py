"""gdb remote protocol byte layer: packet framing, checksums, escapes and acks (sans-IO)."""

from __future__ import annotations

import enum
from typing import Union

import attrs

from vmwatch.errors import RemoteProtocolError


INTERRUPT = b"\x03"
ACK = b"+"
NACK = b"-"
MAX_PACKET = 1 << 20
"""Longest payload accepted from the stub; a longer one is hostile or broken."""
MEMORY_CHUNK = 0x800
"""QEMU answers ``m`` with at most this many bytes."""

_ESCAPED = frozenset(b"$#}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class NeedData(enum.Enum):
    """Sentinel returned by :meth:`Client.next_event` when more bytes are needed."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


def checksum(raw: bytes) -> int:
    """Sum of the bytes modulo 256, as carried after ``#``."""
    return sum(raw) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape ``$ # } *`` in a payload we send (binary data, e.g. ``X`` or ``vFile`` writes)."""
    if not any(b in _ESCAPED for b in data):
        return data
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def decode_payload(raw: bytes) -> bytes:
    """Undo escapes and run-length encoding of a received payload.

    Raises:
        RemoteProtocolError: a dangling escape, a repeat with nothing to repeat, or a bad count.
    """
    if 0x7D not in raw and 0x2A not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x7D:  # '}'
            if i + 1 >= n:
                raise RemoteProtocolError("gdb packet ends inside an escape")
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A:  # '*'
            if not out or i + 1 >= n:
                raise RemoteProtocolError("gdb run-length repeat with nothing to repeat")
            count = raw[i + 1] - 29
            if count < 3 or raw[i + 1] > 126:
                raise RemoteProtocolError(f"gdb run-length count byte {raw[i + 1]:#x} is invalid")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def frame(payload: bytes, start: bytes = b"$") -> bytes:
    """Frame a payload (already escaped) as ``$payload#cs``."""
    return b"%s%s#%02x" % (start, payload, checksum(payload))


# ---------------------------------------------------------------- frames (the byte layer)


@attrs.frozen
class Ack:
    """The stub acknowledged our last packet (``+``)."""


@attrs.frozen
class Nack:
    """The stub asks us to resend our last packet (``-``)."""


@attrs.frozen
class Packet:
    """A decoded packet payload."""

    payload: bytes


@attrs.frozen
class Notification:
    """An asynchronous ``%name:data`` notification (non-stop mode)."""

    payload: bytes


@attrs.frozen
class Interrupt:
    """The byte 0x03 outside a packet: the debugger asks the running target to stop (server side)."""


@attrs.frozen
class BadPacket:
    """A packet whose checksum did not match (answered with ``-``)."""

    raw: bytes


Frame = Union[Ack, Nack, Packet, Notification, BadPacket, Interrupt]


class Framer:
    """Splits the received byte stream into frames. Pure: no acks, no state machine.

    Args:
        interrupts: accept the interrupt byte between packets (a server reads it from gdb; a
            client never receives one).
    """

    def __init__(self, *, interrupts: bool = False) -> None:
        self._buf = bytearray()
        self._interrupts = interrupts

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet part of a returned frame."""
        return bytes(self._buf)

    def next_frame(self) -> Frame | NeedData:
        """Return the next complete frame, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: a byte that cannot start a frame, a bad checksum field, or a
                packet longer than :data:`MAX_PACKET`.
        """
        buf = self._buf
        if not buf:
            return NEED_DATA
        first = buf[0]
        if first == 0x2B:  # '+'
            del buf[:1]
            return Ack()
        if first == 0x2D:  # '-'
            del buf[:1]
            return Nack()
        if first == 0x03 and self._interrupts:
            del buf[:1]
            return Interrupt()
        if first not in (0x24, 0x25):  # '$', '%'
            raise RemoteProtocolError(f"unexpected byte {first:#04x} outside a gdb packet")
        end = buf.find(b"#", 1)
        if end < 0:
            if len(buf) > MAX_PACKET + 4:
                raise RemoteProtocolError(f"gdb packet longer than {MAX_PACKET:#x} bytes")
            return NEED_DATA
        if len(buf) < end + 3:
            return NEED_DATA
        raw = bytes(buf[1:end])
        cs = bytes(buf[end + 1 : end + 3])
        del buf[: end + 3]
        if not (cs[0] in _HEX and cs[1] in _HEX):
            raise RemoteProtocolError(f"gdb packet checksum field {cs!r} is not hex")
        if int(cs, 16) != checksum(raw):
            return BadPacket(raw)
        payload = decode_payload(raw)
        return Notification(payload) if first == 0x25 else Packet(payload)
