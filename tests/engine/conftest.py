"""Shared by the live sensor tests: start a watch and wait until its sensors armed their traps."""

from __future__ import annotations

import pytest
import trio


@pytest.fixture
def start_armed():
    """``await start_armed(nursery, engine, traps)``: run ``engine`` in ``nursery``, wait for its
    traps (armed in the background after start), and check it armed ``traps`` with nothing inactive."""

    async def start(nursery: trio.Nursery, engine, traps: int) -> None:
        await nursery.start(engine.run)
        with trio.fail_after(60):
            while engine.summary.traps == 0:
                await trio.sleep(0.05)
        assert engine.summary.traps == traps and not engine.summary.inactive, engine.summary

    return start
