"""Sans-IO core of the gdb remote serial protocol (client side), as QEMU's gdbstub speaks it.

The byte layer, command encoders, reply decoders and target description live in _framing,
_commands, _replies and _registers; this module holds the client state machine and hands
their names on, so callers keep `from vmwatch.live.gdbrsp import _proto as p`.

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
from typing import Union

from vmwatch.errors import LocalProtocolError, RemoteProtocolError
from vmwatch.live.gdbrsp._framing import (  # noqa: F401 (re-exported: callers use _proto as p)
    INTERRUPT,
    ACK,
    NACK,
    MAX_PACKET,
    MEMORY_CHUNK,
    NeedData,
    NEED_DATA,
    checksum,
    escape,
    decode_payload,
    frame,
    Ack,
    Nack,
    Packet,
    Notification,
    BadPacket,
    Frame,
    Framer,
)
from vmwatch.live.gdbrsp._commands import (  # noqa: F401 (re-exported: callers use _proto as p)
    ReplyKind,
    Command,
    read_registers,
    write_registers,
    read_register,
    write_register,
    read_memory,
    memory_chunks,
    write_memory,
    WatchKind,
    insert_point,
    remove_point,
    step,
    cont,
    vcont,
    set_thread,
    query_halt_reason,
    query_supported,
    query_threads,
    read_features,
    set_sstep_flags,
    set_physical_mode,
    detach,
    SSTEP_ENABLE,
    SSTEP_NOIRQ,
    SSTEP_NOTIMER,
)
from vmwatch.live.gdbrsp._replies import (  # noqa: F401 (re-exported: callers use _proto as p)
    ThreadId,
    StopReply,
    Exited,
    Reply,
    ConsoleOutput,
    parse_stop_reply,
    parse_thread_list,
    decode_hex,
)
from vmwatch.live.gdbrsp._registers import (  # noqa: F401 (re-exported: callers use _proto as p)
    RegisterInfo,
    parse_target_xml,
    register_layout,
    parse_xfer,
    target_architecture,
)


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
