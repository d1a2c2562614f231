"""The blocking QMP client (used by the lab) against a scripted fake QEMU on a real unix socket."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from vmwatch.errors import LinkClosedError, LinkError, RemoteProtocolError
from vmwatch.live.qmp import QmpError
from vmwatch.live.qmp._sync import SyncQmp

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n'


def serve(path, script):
    """Accept one client and run ``script(conn, read_command)`` in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        reader = conn.makefile("rb")
        try:
            script(conn, lambda: json.loads(reader.readline()))
        finally:
            reader.close()
            conn.close()
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def handshake(conn, read):
    conn.sendall(GREETING)
    assert read() == {"execute": "qmp_capabilities", "id": 1}
    conn.sendall(b'{"return": {}, "id": 1}\r\n')


def test_execute_events_and_errors(tmp_path):
    def script(conn, read):
        handshake(conn, read)
        cmd = read()
        assert cmd == {"execute": "human-monitor-command", "id": 2, "arguments": {"command-line": "info cpus"}}
        conn.sendall(b'{"event": "STOP"}\r\n{"return": "ok", "id": 2}\r\n')
        cmd = read()
        conn.sendall(b'{"error": {"class": "GenericError", "desc": "nope"}, "id": %d}\r\n' % cmd["id"])
        conn.recv(100)  # until the client closes

    thread = serve(tmp_path / "q.sock", script)
    with SyncQmp.connect(tmp_path / "q.sock", timeout=5) as qmp:
        assert qmp.greeting.version["qemu"]["major"] == 7
        assert qmp.execute("human-monitor-command", command_line="info cpus") == "ok"
        assert [e.name for e in qmp.events] == ["STOP"]
        with pytest.raises(QmpError, match="GenericError: nope"):
            qmp.execute("x")
    thread.join(5)


def test_peer_closing_mid_command_is_link_closed(tmp_path):
    def script(conn, read):
        handshake(conn, read)
        read()

    serve(tmp_path / "q.sock", script)
    with SyncQmp.connect(tmp_path / "q.sock", timeout=5) as qmp, pytest.raises(LinkClosedError):
        qmp.execute("query-status")


def test_silent_peer_times_out(tmp_path):
    done = threading.Event()

    def script(conn, read):
        handshake(conn, read)
        read()
        done.wait(5)

    serve(tmp_path / "q.sock", script)
    with SyncQmp.connect(tmp_path / "q.sock", timeout=5) as qmp:
        with pytest.raises(LinkError, match="no reply"):
            qmp.execute("query-status", timeout=0.3)
    done.set()


def test_garbage_is_a_remote_protocol_error(tmp_path):
    def script(conn, read):
        conn.sendall(b"\x00garbage\r\n")
        conn.recv(100)

    serve(tmp_path / "q.sock", script)
    with pytest.raises(RemoteProtocolError):
        SyncQmp.connect(tmp_path / "q.sock", timeout=5)


def test_nothing_listening(tmp_path):
    with pytest.raises(LinkError, match="cannot connect"):
        SyncQmp.connect(tmp_path / "none.sock", timeout=1)
