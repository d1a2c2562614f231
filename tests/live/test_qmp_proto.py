"""The sans-IO QMP core, byte for byte: one table of (state, message, wire bytes), fed one byte at a time."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwatch.errors import LinkClosedError, LocalProtocolError, RemoteProtocolError
from vmwatch.live.qmp._proto import (
    NEED_DATA, Closed, Error, Event, Greeting, QmpConnection, Return, State,
)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"},'
            b' "capabilities": ["oob"]}}\r\n')
CAPS_CMD = b'{"execute":"qmp_capabilities","id":1}\n'
CAPS_RET = b'{"return": {}, "id": 1}\r\n'

# (state the client is in, message it must parse, exact bytes QEMU sends)
RECEIVED = [
    (State.GREETING, Greeting({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, ("oob",)),
     GREETING),
    (State.READY, Return(2, {"status": "running", "singlestep": False, "running": True}),
     b'{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}\r\n'),
    (State.READY, Error(2, "CommandNotFound", "The command nope has not been found"),
     b'{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n'),
    (State.READY, Event("STOP", {}, 1764107000.5),
     b'{"timestamp": {"seconds": 1764107000, "microseconds": 500000}, "event": "STOP"}\r\n'),
    (State.READY, Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 1764107001.25),
     b'{"timestamp": {"seconds": 1764107001, "microseconds": 250000}, "event": "SHUTDOWN",'
     b' "data": {"guest": false, "reason": "host-qmp-quit"}}\r\n'),
]


def ready() -> QmpConnection:
    conn = QmpConnection()
    conn.receive_data(GREETING)
    assert isinstance(conn.next_event(), Greeting)
    assert conn.send_command("qmp_capabilities") == (1, CAPS_CMD)
    conn.receive_data(CAPS_RET)
    assert conn.next_event() == Return(1, {})
    assert conn.state is State.READY
    return conn


def in_state(state: State) -> QmpConnection:
    if state is State.GREETING:
        return QmpConnection()
    conn = ready()
    assert conn.send_command("query-status")[0] == 2
    return conn


def drain(conn: QmpConnection) -> list:
    out = []
    while (message := conn.next_event()) is not NEED_DATA:
        out.append(message)
        if isinstance(message, Closed):
            break
    return out


@pytest.mark.parametrize(("state", "message", "wire"), RECEIVED)
def test_receive_one_byte_at_a_time(state, message, wire):
    conn = in_state(state)
    got = []
    for i in range(len(wire)):
        conn.receive_data(wire[i:i + 1])
        got += drain(conn)
        if i < len(wire) - 2:
            assert got == [], "a message must not appear before its line ends"
    assert got == [message]


@pytest.mark.parametrize(("state", "message", "wire"), RECEIVED)
def test_trailing_data_survives(state, message, wire):
    conn = in_state(state)
    follow = b'{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
    conn.receive_data(wire + follow[:10])
    assert drain(conn) == [message]
    if isinstance(message, Greeting):
        return  # an event before capabilities are negotiated is a violation, tested below
    conn.receive_data(follow[10:])
    assert drain(conn) == [Event("RESUME", {}, 1.0)]


def test_command_bytes():
    conn = ready()
    assert conn.send_command("query-status") == (2, b'{"execute":"query-status","id":2}\n')
    assert conn.send_command("dump-guest-memory", {"paging": False, "protocol": "file:/x"}) == (
        3, b'{"execute":"dump-guest-memory","id":3,"arguments":{"paging":false,"protocol":"file:/x"}}\n')
    assert conn.pending == {2: "query-status", 3: "dump-guest-memory"}


def test_events_interleave_with_replies_in_order():
    conn = ready()
    conn.send_command("stop")
    conn.send_command("cont")
    conn.receive_data(
        b'{"timestamp": {"seconds": 5, "microseconds": 1}, "event": "STOP"}\r\n'
        b'{"return": {}, "id": 2}\r\n'
        b'{"timestamp": {"seconds": 6, "microseconds": 2}, "event": "RESUME"}\r\n'
        b'{"return": {}, "id": 3}\r\n')
    assert drain(conn) == [Event("STOP", {}, 5.000001), Return(2, {}), Event("RESUME", {}, 6.000002), Return(3, {})]
    assert conn.pending == {}


def test_events_during_negotiation_are_fine():
    conn = QmpConnection()
    conn.receive_data(GREETING)
    drain(conn)
    conn.send_command("qmp_capabilities")
    conn.receive_data(b'{"event": "RESUME"}\n' + CAPS_RET)
    assert drain(conn) == [Event("RESUME", {}, None), Return(1, {})]


def test_commands_before_negotiation_are_local_errors():
    conn = QmpConnection()
    with pytest.raises(LocalProtocolError, match="GREETING"):
        conn.send_command("query-status")
    conn.receive_data(GREETING)
    drain(conn)
    with pytest.raises(LocalProtocolError, match="CAPABILITIES"):
        conn.send_command("query-status")


@pytest.mark.parametrize(("state", "wire", "why"), [
    (State.READY, b'{"return": {}, "id": 2\r\n', "bad JSON"),
    (State.READY, b'\xff\xfe\r\n', "bad JSON"),
    (State.READY, b'[1, 2]\n', "not an object"),
    (State.READY, b'{"return": {}, "id": 99}\n', "unknown id"),
    (State.READY, b'{"hello": 1}\n', "unknown message"),
    (State.READY, b'{"error": "x", "id": 2}\n', "malformed error"),
    (State.READY, b'{"event": 5}\n', "malformed event"),
    (State.READY, b'{"event": "X", "data": [1]}\n', "malformed event data"),
    (State.READY, GREETING, "unexpected Greeting"),
    (State.GREETING, b'{"return": {}, "id": 1}\n', "unexpected Return"),
    (State.GREETING, b'{"event": "STOP"}\n', "unexpected Event"),
    (State.GREETING, b'{"QMP": {"version": 7}}\n', "malformed greeting"),
])
def test_violations_are_remote_protocol_errors(state, wire, why):
    conn = in_state(state)
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=why):
        drain(conn)
    assert conn.state is State.CLOSED
    with pytest.raises(LinkClosedError):
        conn.send_command("query-status")


def test_end_of_stream():
    conn = ready()
    conn.receive_data(b"")
    assert conn.next_event() == Closed()
    conn = ready()
    conn.receive_data(b'{"return": ')
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


def test_endless_line_is_refused(monkeypatch):
    from vmwatch.live.qmp import _proto

    monkeypatch.setattr(_proto, "MAX_LINE", 100)
    conn = ready()
    conn.receive_data(b'{"return": "' + b"x" * 200)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        conn.next_event()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40) | st.sampled_from(
    [b"\n", b"{", b"}", b'"id": 2', b'{"return": {}, "id": 2}\n', b'{"event": "X"}\n', b'{"error": {}}\n']),
    max_size=12))
def test_fuzz_garbage_gives_messages_or_remote_errors(chunks):
    conn = ready()
    conn.send_command("query-status")
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            drain(conn)
        conn.receive_data(b"")
        drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.CLOSED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["event", "return"]), json_values), max_size=8), st.data())
def test_fuzz_any_split_gives_the_same_messages(items, data):
    conn = ready()
    wire, expected = b"", []
    for kind, value in items:
        if kind == "event":
            wire += json.dumps({"event": "X", "data": {"v": value}}).encode() + b"\r\n"
            expected.append(Event("X", {"v": value}, None))
        else:
            ident, _ = conn.send_command("q")
            wire += json.dumps({"return": value, "id": ident}).encode() + b"\r\n"
            expected.append(Return(ident, value))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    got, start = [], 0
    for cut in [*cuts, len(wire)]:
        if cut > start:
            conn.receive_data(wire[start:cut])
        got += drain(conn)
        start = cut
    assert got == expected
