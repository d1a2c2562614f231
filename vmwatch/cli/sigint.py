"""Ctrl-C during a watch: the first ends it cleanly, the second interrupts at once."""

from __future__ import annotations

import signal

import trio


async def stop_on_sigint(watcher) -> None:
    """First Ctrl-C: ``watcher.stop()`` (an engine or a fleet; alerts flushed). Second: interrupt at once."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            watcher.stop()
            break
    await trio.sleep_forever()
