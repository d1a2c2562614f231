"""The whole exception tree of vmwatch.

Every error raised on purpose by vmwatch derives from :class:`VmwatchError`; each layer has
its own subclass carrying structured attributes a caller can act on. Messages are built by the
constructors and always print addresses in hex. The CLI maps any ``VmwatchError`` to exit
status 2 and one line on stderr.

Messages quote guest and file data (tag names, symbols, paths): ``str(exc)`` is that message
escaped for a terminal (:func:`vmwatch.text.shown`), one line whatever the data held; the
attributes (``path``, ``name``...) keep the exact values.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from vmwatch.text import shown


class VmwatchError(Exception):
    """Base class of every error vmwatch raises on purpose."""

    def __init__(self, message: str) -> None:
        if not message:
            raise ValueError("VmwatchError needs a message")
        # backslashes stay: a message may quote a repr() whose escapes are already visible
        super().__init__(shown(message, backslash=False))


class ImageFormatError(VmwatchError):
    """A memory image file is malformed, truncated, or of an unsupported kind."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        self.path = path
        self.offset = offset
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"file offset {offset:#x}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class UnsupportedOperation(VmwatchError):
    """The source cannot do this (e.g. writing to a dump, or breakpoints on an image).

    A rule raising it is set aside for the run and reported inactive (not a rule error).
    """


class OtherGuestOS(UnsupportedOperation):
    """A rule asked for one OS layer (``guest.linux``) of a guest that runs another (Windows).

    Unlike a rule failing on bad guest data, this is no fault: the engine sets the rule aside for
    the run and reports it inactive, with no error alert.
    """

    def __init__(self, wanted: str, running: str) -> None:
        self.wanted = wanted
        self.running = running
        super().__init__(f"the guest runs {running}, not {wanted}")


class PhysicalReadError(VmwatchError):
    """A guest-physical range is not backed by the source (a hole, MMIO, or past the end)."""

    def __init__(self, paddr: int, length: int, message: str | None = None) -> None:
        self.paddr = paddr
        self.length = length
        super().__init__(message or f"physical address {paddr:#x} (+{length:#x}) is not mapped")


class TranslationError(VmwatchError):
    """A virtual address cannot be translated to a physical one."""

    def __init__(
        self,
        vaddr: int,
        cr3: int,
        message: str | None = None,
        *,
        level: int | None = None,
        entry: int | None = None,
    ) -> None:
        self.vaddr = vaddr
        self.cr3 = cr3
        self.level = level
        self.entry = entry
        if message is None:
            message = f"cannot translate {vaddr:#x} with page tables at {cr3:#x}"
            if level is not None:
                message += f" (level {level}, entry {entry or 0:#x})"
        super().__init__(message)


class PageNotPresent(TranslationError):
    """A paging-structure entry on the walk has its present bit clear.

    ``invalid_bits`` is how many low address bits the missing entry covers, so a scan can
    skip the whole 4 KiB, 2 MiB, 1 GiB or 512 GiB region at once.
    """

    def __init__(self, vaddr: int, cr3: int, *, level: int, entry: int, invalid_bits: int) -> None:
        self.invalid_bits = invalid_bits
        super().__init__(
            vaddr,
            cr3,
            f"page not present at {vaddr:#x} (cr3 {cr3:#x}, level {level}, entry {entry:#x})",
            level=level,
            entry=entry,
        )


class GuestDataError(VmwatchError):
    """Guest memory holds something impossible: a cyclic list, a page-table loop, an absurd length."""


class PEFormatError(GuestDataError):
    """A PE image in guest memory has impossible headers or export data (truncated, absurd
    counts, RVAs outside the image); ``vaddr`` is where the image starts."""

    def __init__(self, message: str, *, vaddr: int) -> None:
        self.vaddr = vaddr
        super().__init__(f"PE image at {vaddr:#x}: {message}")


class SymbolError(VmwatchError):
    """A symbol, type or struct member is unknown or the OS profile cannot be built."""

    def __init__(self, message: str, *, name: str | None = None, member: str | None = None) -> None:
        self.name = name
        self.member = member
        super().__init__(message)


class KernelNotFound(SymbolError):
    """No kernel of the OS looked for is in memory (unlike its siblings, which mean a kernel was
    found but cannot be used as it is): OS detection then tries the next OS."""


class LinkError(VmwatchError):
    """A problem talking to a live hypervisor (QMP, gdbstub)."""


class ProtocolError(LinkError):
    """A peer broke the wire protocol (bad framing, checksum, or an unexpected reply)."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol state machine does not allow."""


class RemoteProtocolError(ProtocolError):
    """The remote peer sent something the protocol does not allow."""


class LinkClosedError(LinkError):
    """The hypervisor closed the connection or died; the event stream has ended."""


class LabError(VmwatchError):
    """The lab guest cannot be provisioned, booted or reached."""


class RecordingError(VmwatchError):
    """A recording file is truncated, corrupted, of a newer format, or lacks the memory asked for."""


class PageNotRecorded(RecordingError):
    """Replay read a physical page the recording does not hold (unlike PhysicalReadError, the
    live source may well have had it: the recorded rules just never read it)."""

    def __init__(self, paddr: int, event: int) -> None:
        self.paddr = paddr
        self.event = event
        when = "before the first event" if event < 0 else f"at event {event}"
        super().__init__(f"physical address {paddr:#x} is not in the recording ({when})")


class DebugError(VmwatchError):
    """A debugger command cannot be done as asked (bad address expression, unknown breakpoint number)."""


class TimelineError(VmwatchError):
    """A timeline database cannot be read, or a timeline query is malformed (bad time, bucket)."""


class TargetListError(VmwatchError):
    """A list of targets (``watch A B...``, ``--targets FILE``, a socket glob) names nothing usable."""

    def __init__(self, message: str, *, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec
        """The target, file or glob at fault (exact), if one is."""


class RuleError(VmwatchError):
    """A rule pack cannot be loaded or a rule is declared wrongly."""


class VolatilityError(VmwatchError):
    """Volatility 3 is missing, or a plugin is unknown, failed or cannot run here."""


@contextlib.contextmanager
def bare_exception() -> Iterator[None]:
    """Around a nursery whose background tasks never raise: the group it raises holds the body's
    one exception, given back bare (callers catch ``LinkError``, not an ``ExceptionGroup``)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
