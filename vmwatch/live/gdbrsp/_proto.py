"""Sans-IO core of the gdb remote serial protocol (client side), as QEMU's gdbstub speaks it.

Theory of operation (gdb manual, "Remote Protocol", sections "Overview", "Packets",
"Stop Reply Packets", "Interrupts"):

* A packet is ``$payload#cs``: ``cs`` is the sum of the raw payload bytes modulo 256 in two hex
  digits. Inside the payload ``}`` escapes the next byte (XOR 0x20) and ``X*n`` repeats ``X``
  ``ord(n) - 29`` more times (run-length encoding; only the stub sends it). Escapes and repeats
  are undone in one pass, after the checksum is verified over the raw bytes.
* Every packet is acknowledged with ``+`` (or ``-`` to ask for a retransmission). QEMU offers
  no no-ack mode over this link, so the core acks each packet it accepts and resends its last
  packet when it sees ``-``. The ack of a reply or stop reply is owed, not sent at once: it
  leads our next packet (``+$...``). A stub that waits for it has nothing else to do meanwhile,
  and the lone ``+`` would cost a wake-up of the stub per round trip (measured on QEMU 7.2: a
  register read took 287 us with immediate acks; the stub's own turnaround is 45 us).
* ``%payload#cs`` is an asynchronous notification (non-stop mode only); it is surfaced, not acked.
* The byte 0x03 outside a packet asks a running target to stop.

The client is in one of a few states; :data:`TRANSITIONS` says what may happen in each:
STOPPED (the target waits for commands), AWAITING (one command sent, its reply pending),
RUNNING (a resume command was sent; only the interrupt byte may be sent and a stop reply ends
it), CLOSED (the target exited or we detached). Misuse raises :class:`LocalProtocolError`;
malformed input from the stub raises :class:`RemoteProtocolError`.

QEMU quirks measured on 7.2 (DESIGN.md): while the VM runs *any* byte from us stops it, so we
send nothing but 0x03 in RUNNING; a stub that is waiting for our ack of its last reply drops
that reply as soon as it sees ``$``.
"""

from __future__ import annotations

import collections
import enum
import xml.etree.ElementTree as ElementTree
from typing import Callable, Iterator, Union

import attrs

from vmwatch.errors import LocalProtocolError, RemoteProtocolError

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


# ---------------------------------------------------------------- commands and replies


class ReplyKind(enum.Enum):
    """How the stub answers a command."""

    PLAIN = "plain"   # one reply packet ("OK", "E14", hex data, "" for unsupported)
    STOP = "stop"     # a stop reply, right away (``?``)
    RESUME = "resume" # nothing until the target stops again (``c``, ``s``, ``vCont``)


@attrs.frozen
class Command:
    """A packet we send, and what kind of answer it gets."""

    payload: bytes
    reply: ReplyKind = ReplyKind.PLAIN

    def __repr__(self) -> str:
        return f"Command({self.payload[:40]!r}, {self.reply.name})"


def _cmd(text: str, reply: ReplyKind = ReplyKind.PLAIN) -> Command:
    return Command(text.encode("ascii"), reply)


def read_registers() -> Command:
    """``g``: all registers of the selected thread, in target-description order."""
    return _cmd("g")


def write_registers(data: bytes) -> Command:
    """``G``: write all registers."""
    return _cmd("G" + data.hex())


def read_register(regnum: int) -> Command:
    return _cmd(f"p{regnum:x}")


def write_register(regnum: int, value: bytes) -> Command:
    """``P``: one register, ``value`` already in target byte order."""
    return _cmd(f"P{regnum:x}={value.hex()}")


def read_memory(addr: int, length: int) -> Command:
    """``m``: at most :data:`MEMORY_CHUNK` bytes (see :func:`memory_chunks`)."""
    if not 0 < length <= MEMORY_CHUNK:
        raise ValueError(f"read length {length!r} not in 1..{MEMORY_CHUNK:#x}")
    if addr < 0:
        raise ValueError(f"address {addr!r} is negative")
    return _cmd(f"m{addr:x},{length:x}")


def memory_chunks(addr: int, length: int) -> Iterator[tuple[int, int]]:
    """Split a read into ``(addr, length)`` pieces QEMU answers in one ``m`` each."""
    end = addr + length
    while addr < end:
        size = min(MEMORY_CHUNK, end - addr)
        yield addr, size
        addr += size


def write_memory(addr: int, data: bytes) -> Command:
    return _cmd(f"M{addr:x},{len(data):x}:{data.hex()}")


class WatchKind(enum.IntEnum):
    """``Z`` packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4


def insert_point(kind: WatchKind, addr: int, length: int = 1) -> Command:
    """``Z0``..``Z4``: breakpoint (length is the x86 "kind", 1) or watchpoint over a range."""
    return _cmd(f"Z{int(kind)},{addr:x},{length:x}")


def remove_point(kind: WatchKind, addr: int, length: int = 1) -> Command:
    return _cmd(f"z{int(kind)},{addr:x},{length:x}")


def step() -> Command:
    return _cmd("s", ReplyKind.RESUME)


def cont() -> Command:
    return _cmd("c", ReplyKind.RESUME)


def vcont(*actions: tuple[str, str | None]) -> Command:
    """``vCont;a[:thread]...``: e.g. ``vcont(("s", "p1.1"), ("c", None))``."""
    parts = [a if t is None else f"{a}:{t}" for a, t in actions]
    return _cmd("vCont;" + ";".join(parts), ReplyKind.RESUME)


def set_thread(thread: str, op: str = "g") -> Command:
    """``Hg``/``Hc``: select the thread later register commands use."""
    return _cmd(f"H{op}{thread}")


def query_halt_reason() -> Command:
    return _cmd("?", ReplyKind.STOP)


def query_supported(features: str = "multiprocess+;swbreak+;hwbreak+;qRelocInsn-;xmlRegisters=i386") -> Command:
    return _cmd("qSupported:" + features)


def query_threads(first: bool = True) -> Command:
    return _cmd("qfThreadInfo" if first else "qsThreadInfo")


def read_features(annex: str, offset: int, length: int = 0xF00) -> Command:
    return _cmd(f"qXfer:features:read:{annex}:{offset:x},{length:x}")


def set_sstep_flags(flags: int) -> Command:
    """``Qqemu.sstep``: bits ENABLE=1, NOIRQ=2, NOTIMER=4."""
    return _cmd(f"Qqemu.sstep={flags:x}")


def set_physical_mode(on: bool) -> Command:
    """``Qqemu.PhyMemMode``: ``m``/``M`` address guest-physical memory (QEMU spelling)."""
    return _cmd(f"Qqemu.PhyMemMode:{int(on)}")


def detach(pid: int | None = 1) -> Command:
    """``D;pid`` (multiprocess) or plain ``D``: the target resumes."""
    return _cmd("D" if pid is None else f"D;{pid:x}")


SSTEP_ENABLE = 1
SSTEP_NOIRQ = 2
SSTEP_NOTIMER = 4


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


# ---------------------------------------------------------------- target description


@attrs.frozen
class RegisterInfo:
    """One register of the target description."""

    name: str
    regnum: int
    bitsize: int
    offset: int
    """Byte offset in the ``g`` packet."""

    @property
    def size(self) -> int:
        return self.bitsize // 8


def parse_target_xml(document: bytes) -> tuple[list[str], list[tuple[str, int, int | None]]]:
    """Parse one target-description document.

    Returns ``(included annexes, [(register name, bitsize, explicit regnum or None)])``.
    ElementTree drops XML comments, so commented-out registers never shift the offsets.
    Architecture and feature names are ignored; only ``reg`` and ``xi:include`` matter.

    Raises:
        RemoteProtocolError: not well-formed XML or a register without name/bitsize.
    """
    if b"xi:" in document and b"xmlns:xi" not in document:
        # QEMU's target.xml uses xi:include without declaring the prefix: declare it.
        start = document.find(b"<target")
        if start >= 0:
            cut = start + len(b"<target")
            document = document[:cut] + b' xmlns:xi="http://www.w3.org/2001/XInclude"' + document[cut:]
    try:
        root = ElementTree.fromstring(document)
    except ElementTree.ParseError as exc:
        raise RemoteProtocolError(f"bad gdb target description: {exc}") from None
    includes: list[str] = []
    regs: list[tuple[str, int, int | None]] = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "include" and el.get("href"):
            includes.append(el.get("href", ""))
        elif tag == "reg":
            try:
                name = el.attrib["name"]
                bitsize = int(el.attrib["bitsize"])
                regnum = int(el.attrib["regnum"]) if "regnum" in el.attrib else None
            except (KeyError, ValueError):
                raise RemoteProtocolError(f"bad register in target description: {el.attrib!r}") from None
            if bitsize <= 0 or bitsize % 8 or bitsize > 4096:
                raise RemoteProtocolError(f"register {name!r} has odd bitsize {bitsize}")
            regs.append((name, bitsize, regnum))
    return includes, regs


def register_layout(fetch: Callable[[str], bytes], annex: str = "target.xml") -> list[RegisterInfo]:
    """Build the ``g`` packet layout by following ``xi:include`` from ``annex``.

    ``fetch(annex) -> document`` is supplied by the caller (the I/O side). Registers are numbered
    in document order unless ``regnum`` says otherwise; offsets accumulate in number order.
    """
    collected: list[tuple[str, int, int | None]] = []
    seen: set[str] = set()

    def walk(name: str, depth: int) -> None:
        if name in seen or depth > 8:
            raise RemoteProtocolError(f"target description include loop at {name!r}")
        seen.add(name)
        includes, regs = parse_target_xml(fetch(name))
        collected.extend(regs)
        for inc in includes:
            walk(inc, depth + 1)

    walk(annex, 0)
    numbered: list[tuple[int, str, int]] = []
    next_num = 0
    for name, bitsize, regnum in collected:
        if regnum is not None:
            next_num = regnum
        numbered.append((next_num, name, bitsize))
        next_num += 1
    numbered.sort()
    out, offset = [], 0
    for regnum, name, bitsize in numbered:
        out.append(RegisterInfo(name, regnum, bitsize, offset))
        offset += bitsize // 8
    return out


def parse_xfer(payload: bytes) -> tuple[bytes, bool]:
    """``qXfer`` reply: ``m<data>`` (more follows) or ``l<data>`` (last). Returns (data, last)."""
    if payload[:1] not in (b"m", b"l"):
        raise RemoteProtocolError(f"bad qXfer reply {payload[:40]!r}")
    return payload[1:], payload[:1] == b"l"


# ---------------------------------------------------------------- the client state machine


class State(enum.Enum):
    STOPPED = "STOPPED"
    AWAITING = "AWAITING"
    RUNNING = "RUNNING"
    CLOSED = "CLOSED"


class _Send(enum.Enum):
    PLAIN = "send a command"
    RESUME = "send a resume command"
    INTERRUPT = "send the interrupt byte"


class _Recv(enum.Enum):
    REPLY_MORE = "receive a reply (more pending)"
    REPLY_LAST = "receive the last pending reply"
    REPLY_THEN_RUN = "receive the last reply of a batch that resumes"
    STOP = "receive a stop reply"
    EXIT = "receive an exit reply"


TRANSITIONS: dict[State, dict[object, State]] = {
    State.STOPPED: {_Send.PLAIN: State.AWAITING, _Send.RESUME: State.RUNNING},
    State.AWAITING: {
        _Recv.REPLY_MORE: State.AWAITING,
        _Recv.REPLY_LAST: State.STOPPED,
        _Recv.REPLY_THEN_RUN: State.RUNNING,
        _Recv.STOP: State.STOPPED,
        _Recv.EXIT: State.CLOSED,
    },
    State.RUNNING: {_Send.INTERRUPT: State.RUNNING, _Recv.STOP: State.STOPPED, _Recv.EXIT: State.CLOSED},
    State.CLOSED: {},
}
"""What may happen in each state; anything missing is a protocol error."""

ClientEvent = Union[Reply, StopReply, Exited, Notification, ConsoleOutput]


class Client:
    """Client side of one gdbstub connection (all-stop mode).

    Feed received bytes with :meth:`receive_data`, pull events with :meth:`next_event`, and
    send whatever :meth:`send` / :meth:`send_batch` / :meth:`interrupt` / :meth:`data_to_send`
    return. Acks are produced by the core; callers only write the bytes out.
    """

    def __init__(self, state: State = State.STOPPED) -> None:
        self.state = state
        self._fresh = True
        """On a fresh connection QEMU may send a stop reply nobody asked for: the ``$`` of our
        first packet stops a guest a previous client left running (measured on 7.2)."""
        self._framer = Framer()
        self._out = bytearray()
        self.ack_owed = False
        """The last reply is acked by the ``+`` that leads our next packet."""
        self._last_sent: bytes | None = None
        self._queue: collections.deque[Command] = collections.deque()
        self._resume_after: Command | None = None

    # -- sending

    def send(self, command: Command) -> bytes:
        """Frame one command and move the state machine.

        Raises:
            LocalProtocolError: the command is not allowed now (e.g. a command while running).
        """
        return self.send_batch([command])

    def send_batch(self, commands: list[Command]) -> bytes:
        """Frame several commands sent back to back; only the last may resume the target.

        Pipelining is a QEMU-specific shortcut: its stub processes packets in order and drops
        an unacked reply as soon as the next ``$`` arrives, so replies followed by another of
        our packets are not acked (an ack reaching a running VM would stop it).

        Raises:
            LocalProtocolError: not stopped, an empty batch, or a resume before the end.
        """
        if not commands:
            raise LocalProtocolError("empty gdb command batch")
        if any(c.reply is ReplyKind.RESUME for c in commands[:-1]):
            raise LocalProtocolError("only the last command of a batch may resume the target")
        resume = commands[-1] if commands[-1].reply is ReplyKind.RESUME else None
        waits = commands[:-1] if resume else commands
        if self.state is not State.STOPPED:
            what = _Send.RESUME if resume and not waits else _Send.PLAIN
            raise LocalProtocolError(f"cannot {what.value} in state {self.state.name}")
        self._transition(_Send.PLAIN if waits else _Send.RESUME)
        self._queue.extend(waits)
        self._resume_after = resume if waits else None
        data = b"".join(frame(c.payload) for c in commands)
        self._last_sent = frame(commands[-1].payload)
        owed = ACK if self.ack_owed else b""
        self.ack_owed = False
        return owed + bytes(self._take_out()) + data

    def interrupt(self) -> bytes:
        """The 0x03 byte that stops a running target (allowed only while RUNNING)."""
        self._transition(_Send.INTERRUPT)
        return INTERRUPT

    def data_to_send(self) -> bytes:
        """What must go out now: nacks, retransmissions, acks of console output (owed acks of
        replies wait for the next packet, see :attr:`ack_owed`)."""
        return bytes(self._take_out())

    def _take_out(self) -> bytearray:
        out, self._out = self._out, bytearray()
        return out

    # -- receiving

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    @property
    def trailing_data(self) -> bytes:
        return self._framer.trailing_data

    def next_event(self) -> ClientEvent | NeedData:
        """Return the next event or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: malformed bytes, or a packet the current state cannot accept.
        """
        while True:
            fr = self._framer.next_frame()
            if fr is NEED_DATA:
                return NEED_DATA
            if isinstance(fr, Ack):
                continue
            if isinstance(fr, Nack):
                if self._last_sent is not None and self.state is not State.RUNNING:
                    self._out += self._last_sent
                continue
            if isinstance(fr, BadPacket):
                self._out += NACK
                continue
            if isinstance(fr, Notification):
                return fr
            return self._packet(fr.payload)

    def _packet(self, payload: bytes) -> ClientEvent:
        queue = self._queue
        if self.state is State.RUNNING and payload[:1] == b"O" and payload != b"OK":
            self._out += ACK
            return ConsoleOutput(decode_hex(payload[1:]))
        if self.state is State.AWAITING and queue and queue[0].reply is ReplyKind.PLAIN:
            if self._fresh and payload[:1] in (b"T", b"S") and payload[1:3].isalnum():
                self._out += ACK
                return parse_stop_reply(payload)
            self._fresh = False
            command = queue.popleft()
            if queue:
                what = _Recv.REPLY_MORE
            elif self._resume_after is not None:
                what = _Recv.REPLY_THEN_RUN
            else:
                what = _Recv.REPLY_LAST
                self.ack_owed = True
            self._transition(what)
            if what is _Recv.REPLY_THEN_RUN:
                self._resume_after = None
            if command.payload[:1] == b"D" and payload == b"OK":
                self.state = State.CLOSED
            return Reply(payload)
        if self.state in (State.AWAITING, State.RUNNING):
            self._fresh = False
            event = parse_stop_reply(payload)
            if queue:
                queue.popleft()
            if queue or self._resume_after is not None:
                raise RemoteProtocolError(f"gdb stop reply {payload[:40]!r} while replies are pending")
            self.ack_owed = True
            self._transition(_Recv.EXIT if isinstance(event, Exited) else _Recv.STOP)
            return event
        raise RemoteProtocolError(f"unexpected gdb packet {payload[:40]!r} in state {self.state.name}")

    def _transition(self, what: object) -> None:
        try:
            self.state = TRANSITIONS[self.state][what]
        except KeyError:
            err = RemoteProtocolError if isinstance(what, _Recv) else LocalProtocolError
            raise err(f"cannot {getattr(what, 'value', what)} in state {self.state.name}") from None
