"""Sans-IO core of the gdb remote serial protocol, server side: vmwatch answers a gdb.

Theory of operation (gdb manual, "Remote Protocol": "Overview", "Packets", "Interrupts",
"General Query Packets"): gdb sends ``$payload#cs`` packets, framed as on the client side
(vmwatch/live/gdbrsp/_framing.py, whose :class:`Framer` both sides share). The server acks each
good packet with ``+`` and asks for a bad one again with ``-``, until gdb turns acks off with
``QStartNoAckMode``; it resends its last reply when gdb sends ``-``. The byte 0x03 between
packets asks a running target to stop. Each packet is parsed into one request value below; the
server answers with :meth:`ServerCore.reply`, once per request (a resume request's answer is the
stop reply, sent when the target stops). Unknown packets get the empty reply, which gdb reads as
"not supported".
"""

from __future__ import annotations

from typing import Union

import attrs

from vmwatch.errors import RemoteProtocolError
from vmwatch.live.gdbrsp._framing import (NEED_DATA, Ack, BadPacket, Framer, Interrupt, Nack, NeedData, Notification,
                                          escape, frame)


@attrs.frozen
class Query:
    """A ``q``/``Q`` packet: ``name`` up to the first ``:`` or ``,`` and the rest as ``args``."""

    name: str
    args: str = ""


@attrs.frozen
class ReadRegisters:
    """``g``: every register of the selected thread."""


@attrs.frozen
class ReadRegister:
    """``p n``: one register by its number in the target description."""

    regnum: int


@attrs.frozen
class ReadMemory:
    """``m addr,length``."""

    vaddr: int
    length: int


@attrs.frozen
class Write:
    """``M``, ``X``, ``G`` or ``P``: gdb wants to change the target (refused unless writable)."""

    kind: str


@attrs.frozen
class SetThread:
    """``Hg``/``Hc`` thread: the thread later ``g``/``m`` (or resume) requests are about."""

    op: str
    thread: int
    """gdb thread id: vCPU index + 1; 0 means any thread, -1 all threads."""


@attrs.frozen
class ThreadAlive:
    """``T thread``."""

    thread: int


@attrs.frozen
class Resume:
    """``c``, ``s`` or ``vCont;c`` / ``vCont;s[:thread]``: run or step until the target stops."""

    step: bool
    thread: int | None = None


@attrs.frozen
class Point:
    """``Z``/``z`` kind,addr,length: insert (or remove) a breakpoint (0, 1) or watchpoint (2-4)."""

    insert: bool
    kind: int
    vaddr: int
    length: int


@attrs.frozen
class HaltReason:
    """``?``: why the target stopped."""


@attrs.frozen
class Detach:
    """``D`` (or ``k``: vmwatch never kills a guest): leave the target running, end the session."""


@attrs.frozen
class Unsupported:
    """Any other packet: answered with an empty reply."""

    payload: bytes


Request = Union[Query, ReadRegisters, ReadRegister, ReadMemory, Write, SetThread, ThreadAlive, Resume, Point,
                HaltReason, Detach, Unsupported, Interrupt]


def _hex(text: str) -> int:
    if text == "-1":
        return -1
    return int(text, 16)


def parse_request(payload: bytes) -> Request:
    """Turn one packet payload from gdb into a request.

    Raises:
        RemoteProtocolError: a known packet with malformed fields.
    """
    try:
        return _parse(payload.decode("latin-1"), payload)
    except ValueError as exc:
        raise RemoteProtocolError(f"malformed gdb packet {payload[:40]!r}: {exc}") from None


def _parse(text: str, payload: bytes) -> Request:
    head, rest = text[:1], text[1:]
    if head in "qQ" and text:
        cut = min((i for i in (text.find(":"), text.find(",")) if i >= 0), default=len(text))
        return Query(text[:cut], text[cut + 1:])
    if text == "g":
        return ReadRegisters()
    if head == "p":
        return ReadRegister(int(rest, 16))
    if head == "m":
        vaddr, length = rest.split(",")
        return ReadMemory(int(vaddr, 16), int(length, 16))
    if head in "MXGP" and text:
        return Write(head)
    if head == "H" and len(rest) >= 2:
        return SetThread(rest[0], _hex(rest[1:]))
    if head == "T" and rest:
        return ThreadAlive(_hex(rest))
    if text in ("c", "s") or head in "cs" and rest and all(c in "0123456789abcdefABCDEF" for c in rest):
        return Resume(step=head == "s")
    if text.startswith("vCont;"):
        action = text[6:].split(";")[0]
        verb, _, thread = action.partition(":")
        if verb[:1] in ("c", "C", "s", "S"):
            return Resume(step=verb[0] in "sS", thread=_hex(thread) if thread else None)
        return Unsupported(payload)
    if head in "Zz" and rest:
        kind, vaddr, length = rest.split(";")[0].split(",")
        return Point(head == "Z", int(kind), int(vaddr, 16), int(length, 16))
    if text == "?":
        return HaltReason()
    if head == "D" or text == "k":
        return Detach()
    return Unsupported(payload)


class ServerCore:
    """Bytes from gdb in, requests out; replies in, bytes for gdb out. No I/O."""

    def __init__(self) -> None:
        self._framer = Framer(interrupts=True)
        self._acks = True
        self._out = bytearray()
        self._last = b""
        self._asked_no_ack = False

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def next_request(self) -> Request | NeedData:
        """The next request gdb sent, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: bytes that are not gdb packets.
        """
        while True:
            got = self._framer.next_frame()
            if got is NEED_DATA or isinstance(got, Interrupt):
                return got
            if isinstance(got, Ack):
                continue
            if isinstance(got, Nack):
                self._out += self._last
                continue
            if isinstance(got, BadPacket):
                self._out += b"-"
                continue
            if isinstance(got, Notification):
                raise RemoteProtocolError("gdb sent a notification packet, which only servers send")
            if self._acks:
                self._out += b"+"
            request = parse_request(got.payload)
            self._asked_no_ack = request == Query("QStartNoAckMode")
            return request

    def reply(self, payload: bytes) -> None:
        """Queue one reply packet (escaped and framed here).

        An ``OK`` to ``QStartNoAckMode`` ends acks, both ways, after that reply.
        """
        self._last = frame(escape(payload))
        self._out += self._last
        if self._asked_no_ack and payload == b"OK":
            self._acks = False
        self._asked_no_ack = False

    def data_to_send(self) -> bytes:
        """What to write to gdb now (acks and replies), emptied by the call."""
        out = bytes(self._out)
        self._out.clear()
        return out
