"""The trio QMP client against a scripted fake QEMU on a memory stream, and against the real lab guest."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from vmwatch.errors import LinkClosedError, LinkError, RemoteProtocolError
from vmwatch.live.qmp import QmpError, open_qmp
from vmwatch.live.qmp._trio import qmp_over_stream

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n'


class FakeQemu:
    """The server end: reads one command line at a time and answers as scripted."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = b""

    async def command(self):
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            assert data, "client closed"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def send(self, *objs):
        await self.stream.send_all(b"".join(json.dumps(o).encode() + b"\r\n" for o in objs))

    async def handshake(self):
        await self.stream.send_all(GREETING)
        cmd = await self.command()
        assert cmd == {"execute": "qmp_capabilities", "id": 1}
        await self.send({"return": {}, "id": 1})


async def test_execute_and_events_in_order():
    client, server = trio.testing.memory_stream_pair()
    fake = FakeQemu(server)

    async def serve():
        await fake.handshake()
        cmd = await fake.command()
        assert cmd == {"execute": "human-monitor-command", "id": 2, "arguments": {"command-line": "info cpus"}}
        await fake.send({"event": "STOP"}, {"return": "* CPU #0\r\n", "id": 2}, {"event": "RESUME"})
        cmd = await fake.command()
        await fake.send({"error": {"class": "CommandNotFound", "desc": "no"}, "id": cmd["id"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with qmp_over_stream(client) as qmp:
            assert qmp.greeting.version["qemu"]["major"] == 7
            assert await qmp.execute("human-monitor-command", command_line="info cpus") == "* CPU #0\r\n"
            assert [(await qmp.events.receive()).name for _ in range(2)] == ["STOP", "RESUME"]
            with pytest.raises(QmpError, match="CommandNotFound") as info:
                await qmp.execute("nope")
            assert info.value.error_class == "CommandNotFound"


async def test_closed_socket_fails_every_waiter_and_ends_events():
    client, server = trio.testing.memory_stream_pair()
    fake = FakeQemu(server)
    errors = []

    async def waiter(qmp, name):
        try:
            await qmp.execute(name)
        except LinkClosedError as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer:
        async def serve():
            await fake.handshake()
            await fake.command()
            await fake.command()
            await server.aclose()

        outer.start_soon(serve)
        async with qmp_over_stream(client) as qmp:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter, qmp, "a")
                    nursery.start_soon(waiter, qmp, "b")
                assert [e async for e in qmp.events] == []
            assert len(errors) == 2
            with pytest.raises(LinkClosedError):
                await qmp.execute("after")


async def test_garbage_from_qemu_is_a_remote_protocol_error():
    client, server = trio.testing.memory_stream_pair()
    fake = FakeQemu(server)

    async def serve():
        await fake.handshake()
        await fake.command()
        await server.send_all(b"{not json}\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with qmp_over_stream(client) as qmp:
            with trio.fail_after(5), pytest.raises(RemoteProtocolError, match="bad JSON"):
                await qmp.execute("query-status")


async def test_close_before_greeting():
    client, server = trio.testing.memory_stream_pair()
    await server.aclose()
    with trio.fail_after(5), pytest.raises(LinkClosedError):
        async with qmp_over_stream(client):
            pass


async def test_silent_qemu_before_greeting(autojump_clock):
    """A QEMU that accepts the connection but never greets (stopped) is a LinkClosedError in bounded time."""
    from vmwatch.live.qmp._trio import NEGOTIATE_DEADLINE

    client, _server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(LinkClosedError, match="no QMP greeting"):
        async with qmp_over_stream(client):
            pass
    assert trio.current_time() - start == pytest.approx(NEGOTIATE_DEADLINE)


async def test_nothing_listening(tmp_path):
    with pytest.raises(LinkError, match="cannot connect"):
        async with open_qmp(tmp_path / "none.sock"):
            pass


@pytest.mark.guest
async def test_real_qemu_status_and_stop_cont_events(lab_guest):
    with trio.fail_after(30):
        async with open_qmp(lab_guest.qmp_path) as qmp:
            assert qmp.greeting.version["qemu"]["major"] >= 7
            assert (await qmp.execute("query-status"))["status"] == "running"
            await qmp.execute("stop")
            assert (await qmp.execute("query-status"))["status"] == "paused"
            await qmp.execute("cont")
            names = [(await qmp.events.receive()).name for _ in range(2)]
            assert names == ["STOP", "RESUME"]
            with pytest.raises(QmpError):
                await qmp.execute("no-such-command")
    assert lab_guest.shell("echo alive") == "alive\n"


@pytest.mark.guest
async def test_public_qmp_socket_is_free_while_the_lab_uses_its_own(lab_guest):
    assert lab_guest.status() == "running"  # the lab's own monitor connection stays open
    with trio.fail_after(10):
        async with open_qmp(lab_guest.qmp_path) as qmp:
            assert (await qmp.execute("query-status"))["running"] is True
