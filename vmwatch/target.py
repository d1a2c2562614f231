"""Open whatever the user names on the command line: an image path or ``qemu:/path/to/qmp.sock``.

A target gives physical memory (synchronous reads, the hot path) and CPU state; live targets
also give control and events through ``target.live``. Callers ask capabilities, not types.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import attrs

from vmwatch.cpu import Registers


@attrs.define
class Target:
    """What every command works on."""

    spec: str
    """What the user typed."""
    memory: object
    """Physical memory: ``read(paddr, size)``, ``read_into(paddr, buf)``, ``volatile``, ``writable``."""
    saved_cpus: tuple[Registers, ...] = ()
    """Saved CPU state of an image (empty for a live guest: ask ``live.registers``)."""
    live: object | None = None
    """The live backend (pause, resume, registers, breakpoints, events) or ``None`` for images."""

    async def cpu_state(self) -> tuple[Registers, ...]:
        """Registers of every vCPU: saved ones for an image, current ones for a live guest."""
        if self.live is None:
            return self.saved_cpus
        return await self.live.all_registers()


QEMU_PREFIX = "qemu:"


@contextlib.asynccontextmanager
async def open_target(spec: str, *, writable: bool = False) -> AsyncIterator[Target]:
    """Open an image file or attach to a live QEMU (``qemu:/path/to/qmp.sock``).

    Raises:
        ImageFormatError: the file is not a memory image vmwatch reads.
        LinkError: the QEMU cannot be reached.
    """
    if spec.startswith(QEMU_PREFIX):
        from vmwatch.live.qemu import attach_qemu

        async with attach_qemu(spec[len(QEMU_PREFIX):], writable=writable) as vm:
            yield Target(spec=spec, memory=vm.memory, live=vm)
        return
    from vmwatch.images import open_image

    with open_image(spec) as image:
        yield Target(spec=spec, memory=image, saved_cpus=tuple(image.cpus))
