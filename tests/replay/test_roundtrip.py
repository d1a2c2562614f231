"""Recording a synthetic live session and replaying it gives back what the handlers saw."""

from __future__ import annotations

import pytest

from vmwatch.errors import PageNotRecorded, PhysicalReadError, RecordingError, UnsupportedOperation
from vmwatch.replay import Recording, open_replay, recording_source
from vmwatch.replay.format import SETUP

from .synthetic import HOLE, handler_reads, synthetic_source


async def run_session(target, reads_for=handler_reads):
    """Drive a target like the engine would; return what each event's handler saw."""
    seen = []
    setup = target.memory.read(0x2000, 0x100)
    seen.append(("setup", setup))
    async for event in target.events():
        observed = [event]
        for paddr, size in reads_for(event.seq):
            observed.append(target.memory.read(paddr, size))
        try:
            target.memory.read(HOLE[0] + 0x10, 4)
        except PhysicalReadError as exc:
            observed.append(("hole", str(exc)))
        observed.append(target.memory.read(HOLE[0] - 8, 16, pad=True))
        observed.append(await target.registers(event.vcpu))
        if event.seq % 5 == 0:
            observed.append(await target.all_registers())
        seen.append(observed)
    return seen


@pytest.fixture
async def recorded(tmp_path):
    path = tmp_path / "session.vmwr"
    with recording_source(synthetic_source(), path) as target:
        live_seen = await run_session(target)
    return path, live_seen


class TestRoundTrip:
    async def test_replay_sees_what_live_saw(self, recorded):
        """Every read, unmapped-read error, padded read and register read replays identically."""
        path, live_seen = recorded
        with open_replay(path) as target:
            replay_seen = await run_session(target)
        assert replay_seen == live_seen
        assert len(live_seen) == 31

    async def test_pages_are_deduplicated(self, recorded):
        """Unchanged pages are stored once: far fewer stored pages than page reads."""
        path, _ = recorded
        with Recording.open(path) as recording:
            assert recording.end["page_reads"] > 3 * recording.page_count
            assert len(recording.events) == 30
            assert recording.meta["volatile"] is True

    async def test_changed_memory_is_seen_per_event(self, tmp_path):
        """A page the guest changed between events replays with each event's own content."""
        path = tmp_path / "r.vmwr"
        whole = lambda seq: [(0, HOLE[0])]  # noqa: E731 - read all low RAM every event
        with recording_source(synthetic_source(count=5), path) as target:
            live_seen = await run_session(target, whole)
        assert len({bytes(obs[1]) for obs in live_seen[1:]}) == 5
        with open_replay(path) as target:
            assert await run_session(target, whole) == live_seen

    async def test_read_outside_recording_names_address(self, recorded):
        """A different rule set reading a never-recorded page gets PageNotRecorded, not zeros."""
        path, _ = recorded
        with open_replay(path) as target:
            async for event in target.events():
                with pytest.raises(PageNotRecorded, match=r"0x3f000 is not in the recording \(at event 0\)"):
                    target.memory.read(0x3F000, 8)
                with pytest.raises(PageNotRecorded):
                    target.memory.read(0x3F000, 8, pad=True)
                break
            assert target.memory.missing.paddr == 0x3F000

    async def test_earlier_pages_serve_other_rules_unless_strict(self, recorded):
        """A page recorded at setup serves later events; strict mode refuses it."""
        path, _ = recorded
        with open_replay(path) as target:
            async for event in target.events():
                if event.seq == 3:
                    assert len(target.memory.read(0x2000, 0x10)) == 0x10
                    break
        with open_replay(path, strict=True) as target:
            async for event in target.events():
                if event.seq == 3:
                    with pytest.raises(PageNotRecorded, match="0x2000"):
                        target.memory.read(0x2000, 0x10)
                    break

    async def test_registers_not_recorded(self, recorded):
        """Registers no handler read for an event are a RecordingError, not made up."""
        path, _ = recorded
        with open_replay(path) as target:
            async for event in target.events():
                if event.seq == 1:
                    with pytest.raises(RecordingError, match="vCPU 1 were not recorded for event 1"):
                        await target.registers(1)
                    break

    async def test_replay_is_read_only(self, recorded):
        """Writes and steps are refused by a replay."""
        path, _ = recorded
        with open_replay(path) as target:
            with pytest.raises(UnsupportedOperation):
                target.memory.write(0, b"x")
            with pytest.raises(UnsupportedOperation):
                await target.step(0)

    async def test_setup_context_before_events(self, recorded):
        """Before the first event, replay serves the setup reads."""
        path, live_seen = recorded
        with open_replay(path) as target:
            assert target.context == SETUP
            assert target.memory.read(0x2000, 0x100) == live_seen[0][1]

    async def test_interrupted_session_is_complete(self, tmp_path):
        """A watch stopped by KeyboardInterrupt still writes a complete, replayable recording."""
        path = tmp_path / "stopped.vmwr"
        with pytest.raises(KeyboardInterrupt):
            with recording_source(synthetic_source(count=10), path) as target:
                async for event in target.events():
                    target.memory.read(0x1000, 8)
                    if event.seq == 4:
                        raise KeyboardInterrupt
        with Recording.open(path) as recording:
            assert len(recording.events) == 5

    async def test_crashed_session_is_truncated(self, tmp_path):
        """A recording cut by a crash has no END record and is refused as truncated."""
        path = tmp_path / "crashed.vmwr"
        with pytest.raises(ZeroDivisionError):
            with recording_source(synthetic_source(count=10), path) as target:
                async for event in target.events():
                    1 / 0
        with pytest.raises(RecordingError, match="truncated"):
            Recording.open(path)


class TestBaseImage:
    async def _record(self, tmp_path, base=None):
        path = tmp_path / "b.vmwr"
        source = synthetic_source(count=3)
        image = tmp_path / "base.raw"
        image.write_bytes(source.memory.read(0, 0x20000))  # low RAM as a raw image, before the session
        with recording_source(source, path, base=image if base is None else base) as target:
            async for event in target.events():
                target.memory.read(0x1000, 8)
        return path, image, source

    async def test_unrecorded_pages_come_from_the_base(self, tmp_path):
        """A page the session never read is served from the named base image, not refused."""
        path, image, _ = await self._record(tmp_path)
        with open_replay(path) as replay:
            async for event in replay.events():
                assert replay.memory.read(0x7000, 16) == image.read_bytes()[0x7000:0x7010]
                with pytest.raises(PhysicalReadError):
                    replay.memory.read(0x20000, 4)  # beyond the base image: unmapped, as the image says
                break

    async def test_wrong_base_is_refused(self, tmp_path):
        """Another file than the recorded base (same size, other content) is a RecordingError."""
        path, image, _ = await self._record(tmp_path)
        other = tmp_path / "other.raw"
        other.write_bytes(bytes(image.stat().st_size))
        with pytest.raises(RecordingError, match="is not the base image"):
            with open_replay(path, base=other):
                pass

    async def test_strict_ignores_base(self, tmp_path):
        """Strict replay never reads the base."""
        path, _, _ = await self._record(tmp_path)
        with open_replay(path, strict=True) as replay:
            async for event in replay.events():
                with pytest.raises(PageNotRecorded):
                    replay.memory.read(0x7000, 16)
                break
