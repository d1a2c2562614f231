"""The recording file format refuses truncated, corrupted, newer and foreign files clearly."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import RecordingError
from vmwatch.events import Access, Breakpoint, MemoryAccess, ProcessStart
from vmwatch.replay import Recording, recording_source
from vmwatch.replay import _codec
from vmwatch.replay.format import MAGIC, RecordType, RecordWriter, iter_records
from vmwatch.testing.cli import run_cli

from .synthetic import synthetic_source


def _record_small(path) -> bytes:
    async def session():
        with recording_source(synthetic_source(count=4), path) as target:
            async for event in target.events():
                target.memory.read(0x1000 * (event.seq + 1), 16)
                await target.registers(event.vcpu)

    trio.run(session)
    return path.read_bytes()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    return _record_small(tmp_path_factory.mktemp("rec") / "good.vmwr")


def _check_file(tmp_path, data: bytes, name="bad.vmwr") -> RecordingError | None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        with Recording.open(path) as recording:
            for ordinal in range(recording.page_count):
                recording.page(ordinal)
            for context, vcpu in list(recording._registers):
                recording.registers(context, vcpu)
    except RecordingError as exc:
        assert str(exc)
        return exc
    return None


def _rewrite_header(data: bytes, major: int, minor: int) -> bytes:
    head = struct.pack("<8sHH", MAGIC, major, minor)
    return head + struct.pack("<I", zlib.crc32(head)) + data[16:]


class TestReader:
    def test_good_file_opens(self, good, tmp_path):
        """The reference recording itself is accepted."""
        assert _check_file(tmp_path, good) is None

    def test_every_truncation_is_refused(self, good, tmp_path):
        """Cutting the file anywhere gives a RecordingError, never a partial success."""
        for cut in range(0, len(good), max(1, len(good) // 300)):
            assert _check_file(tmp_path, good[:cut]) is not None, cut

    def test_newer_major_version(self, good, tmp_path):
        """A recording of format 2.0 names both versions and asks for an upgrade."""
        error = _check_file(tmp_path, _rewrite_header(good, 2, 0))
        assert "format version 2.0 is newer than this vmwatch reads (1.x)" in str(error)

    def test_newer_minor_version_with_optional_record(self, good, tmp_path):
        """A 1.7 file with an unknown optional record type (>= 0x80) is still read."""
        out = io.BytesIO()
        writer = RecordWriter(out)
        records = list(iter_records(good))
        for record in records[:-1]:
            writer.write(record.kind, bytes(record.payload))
        writer.write(0x91, b"something new")
        writer.write(records[-1].kind, bytes(records[-1].payload))
        assert _check_file(tmp_path, _rewrite_header(out.getvalue(), 1, 7)) is None

    def test_unknown_mandatory_record(self, good, tmp_path):
        """An unknown record type below 0x80 is refused with its offset."""
        out = io.BytesIO()
        writer = RecordWriter(out)
        for record in iter_records(good):
            writer.write(record.kind, bytes(record.payload))
            if record.kind == RecordType.META:
                writer.write(0x33, b"x")
        error = _check_file(tmp_path, out.getvalue())
        assert "unknown record type 0x33" in str(error)

    def test_foreign_file(self, tmp_path):
        """An ELF file is not a recording."""
        error = _check_file(tmp_path, b"\x7fELF" + bytes(100))
        assert "not a vmwatch recording" in str(error)

    def test_wrong_page_digest(self, good, tmp_path):
        """A page whose content does not match its digest (CRC recomputed) is caught on read."""
        out = io.BytesIO()
        writer = RecordWriter(out)
        for record in iter_records(good):
            payload = bytes(record.payload)
            if record.kind == RecordType.PAGE:
                payload = payload[:1] + bytes(32) + payload[33:]
            writer.write(record.kind, payload)
        error = _check_file(tmp_path, out.getvalue())
        assert "does not match its BLAKE2b digest" in str(error)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_fuzz_byte_flips(self, good, tmp_path, data):
        """Random byte changes anywhere give RecordingError or a file that still reads fully."""
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        _check_file(tmp_path, bytes(blob))

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(records=st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 0x40, 0x80, 0x85]), st.binary(max_size=64)),
                            max_size=8))
    def test_fuzz_well_framed_garbage(self, tmp_path, records):
        """Valid framing with hostile payloads (CRCs correct) never escapes as another exception."""
        out = io.BytesIO()
        writer = RecordWriter(out)
        for kind, payload in records:
            writer.write(kind, payload)
        assert _check_file(tmp_path, out.getvalue()) is not None


class TestCodec:
    @pytest.mark.parametrize("event", [
        Breakpoint(seq=1, time_ns=2, vcpu=3, address=0xFFFFFFFF81000000),
        MemoryAccess(seq=4, access=Access.READ_WRITE, address=0x10, size=8, value=b"\x00\xff"),
        ProcessStart(seq=5, pid=1, ppid=0, comm="init \u00e9"),
    ])
    def test_events_round_trip(self, event):
        """Every field, enums and bytes included, survives encoding."""
        assert _codec.decode_event(_codec.encode_event(event)) == event

    @pytest.mark.parametrize("payload", [
        b'{"$attrs": "os:system", "fields": {}}',
        b'{"$attrs": "vmwatch.errors:RecordingError", "fields": {}}',
        b'{"$attrs": "vmwatch.events:Breakpoint", "fields": {"nope": 1}}',
        b'{"$attrs": "vmwatch.cpu:Registers", "fields": {}}',
        b'{"$enum": "vmwatch.events:Access", "value": 99}',
        b'[1, 2]',
        b'\xff',
    ])
    def test_hostile_payloads(self, payload):
        """Foreign classes, unknown fields, bad enum values and non-events are RecordingErrors."""
        with pytest.raises(RecordingError):
            _codec.decode_event(payload)



class TestCliErrors:
    @pytest.mark.parametrize(("damage", "message"), [
        (lambda b: b[:-9], "truncated"),
        (lambda b: _rewrite_header(b, 3, 1), "format version 3.1 is newer than this vmwatch reads (1.x)"),
        (lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], "checksum mismatch in record at file offset 0x"),
        (lambda b: b"PK\x03\x04" + b[4:], "not a vmwatch recording"),
    ])
    def test_one_line_exit_2(self, good, tmp_path, damage, message):
        """`vmwatch replay` on a damaged recording: exit 2, one line naming the problem, no traceback."""
        path = tmp_path / "bad.vmwr"
        path.write_bytes(damage(good))
        rules = tmp_path / "r.py"
        rules.write_text("from vmwatch.rules import rule\n\n@rule.on_start\ndef r(event, guest):\n    pass\n")
        result = run_cli("replay", path, "--rules", rules)
        assert result.status == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr


class TestHandled:
    """END's ``handled``: a replay stops where the live run stopped handling events."""

    def _recorded(self, path, handled_after: int | None) -> None:
        """Four events; the consumer says it handled those before ``handled_after`` (None: says nothing)."""
        async def session():
            with recording_source(synthetic_source(count=4), path) as target:
                async for event in target.events():
                    await target.registers(event.vcpu)
                    if handled_after is not None and event.seq < handled_after:
                        target.on_handled()

        trio.run(session)

    @pytest.mark.parametrize("handled_after", [None, 3, 1])
    def test_replay_stops_after_the_handled_events(self, tmp_path, handled_after):
        path = tmp_path / "cut.vmwr"
        self._recorded(path, handled_after)
        with Recording.open(path) as recording:
            assert len(recording.events) == 4
            assert recording.handled == (4 if handled_after is None else handled_after)
            assert ("handled" in recording.end) is (handled_after is not None)

            async def replay() -> int:
                from vmwatch.replay.player import ReplaySource

                return len([e async for e in ReplaySource(recording).events()])

            assert trio.run(replay) == recording.handled

    @pytest.mark.parametrize("value", [-1, 5, "2", 2.0, None])
    def test_absurd_handled_is_refused(self, tmp_path, value):
        path = tmp_path / "rec.vmwr"
        self._recorded(path, None)
        data = path.read_bytes()
        out = io.BytesIO()
        writer = RecordWriter(out)
        for record in iter_records(data):
            payload = bytes(record.payload)
            if record.kind == RecordType.END:
                writer.write_json(RecordType.END, {**json.loads(payload), "handled": value})
            else:
                writer.write(record.kind, payload)
        error = _check_file(tmp_path, data[:16] + out.getvalue())
        assert error is not None and "handled" in str(error)
