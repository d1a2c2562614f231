"""What the Windows initialisation found, and how: the kernel's facts and the steps that led to them."""

from __future__ import annotations

import time

import attrs
import structlog

log = structlog.get_logger()


@attrs.frozen
class Found:
    """One initialisation step: what was found, its value, and how."""

    what: str
    value: int | str | None
    how: str


@attrs.frozen(kw_only=True)
class KernelInfo:
    """Where ntoskrnl is and what it is."""

    base: int
    """Virtual base of ntoskrnl."""
    paddr: int | None
    size: int
    name: str
    build: int | None
    dtb: int
    kdbg: int | None
    """Virtual address of the KDBG block (None when none was found)."""
    found: tuple[Found, ...]
    kdbg_offsets: dict[str, int] = attrs.field(factory=dict)
    """Structure offsets the KDBG block states (OffsetPrcbCurrentThread, ...)."""
    bits: int = 64
    """32 (x86) or 64 (x64)."""


class Steps(list):
    """The Found records so far; each one logged with the milliseconds since the search began."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.perf_counter()

    def add(self, what: str, value, how: str) -> None:
        self.append(Found(what, value, how))
        log.debug("windows.found", what=what, value=hex(value) if isinstance(value, int) else value, how=how,
                  ms=round((time.perf_counter() - self.t0) * 1000, 1))
