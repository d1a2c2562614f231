"""The guest handle rules receive: cached reads, OS objects, the event's vCPU, ``alert(...)``.

One handle per run, so caches and the OS layer (Linux or Windows, detected once) are shared by every rule; the per-event
fields (event, registers, current task) are reset before each dispatch. While rules run the
guest is paused (live sources), so everything a rule reads is consistent.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from vmwatch.cpu import Registers
from vmwatch.engine.alerts import Alert
from vmwatch.engine.dispatch import RuleRun
from vmwatch.events import Event
from vmwatch.ruletypes import Severity

# PTI keeps user and kernel page tables in one 8 KiB pair: bit 12 picks the user half.
_CR3_ROOT_MASK = ~0xFFF & ~(1 << 12) & ((1 << 52) - 1)
_TTBR_BASE_MASK = ((1 << 48) - 1) & ~1


@attrs.frozen
class Current:
    """The task running on the event's vCPU."""

    pid: int | None
    comm: str | None
    cr3: int | None


def cr3_root(cr3: int | None) -> int | None:
    """Page-table root of a CR3 value, PCID and PTI user/kernel bit stripped."""
    return None if cr3 is None else cr3 & _CR3_ROOT_MASK


def user_root(regs: Any) -> int | None:
    """The user page-table root of a vCPU's registers: CR3's (x86), TTBR0_EL1's base (AArch64, ASID
    and CnP stripped), as ``Task.cr3`` holds it."""
    if regs is None:
        return None
    if regs.arch == "aarch64":
        return None if regs.ttbr0_el1 is None else regs.ttbr0_el1 & _TTBR_BASE_MASK
    return cr3_root(regs.cr3)


class Guest:
    """What a rule sees of the guest."""

    def __init__(
        self,
        *,
        vm: str,
        host: str = "",
        phys: object | None,
        capabilities: frozenset[str] = frozenset(),
        os_factory: Callable[[Guest], Any] | None = None,
        current_resolver: Callable[[Guest], Current | None] | None = None,
    ) -> None:
        self.vm = vm
        self.host = host
        """The host watching it: alerts carry both."""
        self.phys = phys
        """The source's physical memory (``read``/``read_into``), or ``None``."""
        self.capabilities = capabilities
        self.event: Event | None = None
        self.registers: Registers | None = None
        """Registers of the event's vCPU (traps), or of vCPU 0 at ticks and start; ``None`` if unknown."""
        self.cpus: tuple[Registers, ...] = ()
        """Registers of every vCPU at ticks and start (when the source gives registers)."""
        self.rule: RuleRun | None = None
        self._os_factory = os_factory
        self._current_resolver = current_resolver
        self._kernel: Any = None
        self._kernel_error: Exception | None = None
        self._memory: Any = None
        self._current: Current | None = None
        self._current_known = False
        self._alerts: list[Alert] = []
        self._emitted: list[Event] = []

    # -- per-event --------------------------------------------------------------------------

    def begin(self, event: Event, registers: Registers | None) -> None:
        self.event = event
        if registers is not None:
            self.registers = registers
        self._current_known = False

    def take_alerts(self) -> list[Alert]:
        alerts, self._alerts = self._alerts, []
        return alerts

    def take_emitted(self) -> list[Event]:
        emitted, self._emitted = self._emitted, []
        return emitted

    # -- what rules use ---------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        """The running rule's private state for this run."""
        return self.rule.state  # type: ignore[union-attr]

    @property
    def config(self) -> dict[str, Any]:
        """The running rule's settings (defaults merged with this run's overrides)."""
        return self.rule.config  # type: ignore[union-attr]

    @property
    def kernel(self) -> Any:
        """The guest's OS layer, Linux or Windows (detected from memory), built on first use.

        Raises:
            VmwatchError: no kernel the OS layer understands.
        """
        if self._kernel is None:
            if self._kernel_error is not None:
                raise self._kernel_error
            if self._os_factory is None:
                from vmwatch.errors import UnsupportedOperation

                raise UnsupportedOperation("this source has no guest OS to inspect")
            try:
                self._kernel = self._os_factory(self)
            except Exception as exc:
                self._kernel_error = exc
                raise
            self._memory = self._kernel.memory
        return self._kernel

    @property
    def linux(self) -> Any:
        """The guest's Linux kernel (:class:`vmwatch.os.linux.Linux`).

        Raises:
            OtherGuestOS: the guest runs Windows (the engine then sets the asking rule aside).
            VmwatchError: no kernel the OS layer understands.
        """
        return self._kernel_of("linux")

    @property
    def windows(self) -> Any:
        """The guest's Windows kernel (:class:`vmwatch.os.windows.Windows`).

        Raises:
            OtherGuestOS: the guest runs Linux (the engine then sets the asking rule aside).
            VmwatchError: no kernel the OS layer understands.
        """
        return self._kernel_of("windows")

    def _runs_windows(self) -> bool:
        """Whether the guest's kernel is known to be Windows (the resolver reads Linux tasks)."""
        try:
            return getattr(self.kernel, "os_name", "linux") == "windows"
        except Exception:  # no kernel: the resolver says why, as before
            return False

    def _kernel_of(self, wanted: str) -> Any:
        kernel = self.kernel
        running = getattr(kernel, "os_name", "linux")
        if running != wanted:
            from vmwatch.errors import OtherGuestOS

            raise OtherGuestOS(wanted.capitalize(), running.capitalize())
        return kernel

    @property
    def memory(self) -> Any:
        """Cached virtual/physical reads (:class:`vmwatch.memory.GuestMemory`)."""
        if self._memory is None:
            if self.phys is None:
                from vmwatch.errors import UnsupportedOperation

                raise UnsupportedOperation("this source has no memory")
            from vmwatch.memory import GuestMemory

            self._memory = GuestMemory(self.phys, registers=self.registers)
        return self._memory

    @property
    def current(self) -> Current | None:
        """The task on the event's vCPU (pid, comm, page-table root), or ``None`` if unknown."""
        if not self._current_known:
            self._current_known = True
            event = self.event
            pid = getattr(event, "pid", None)
            if pid is not None:
                self._current = Current(pid, getattr(event, "comm", None) or None, user_root(self.registers))
            elif self._current_resolver is not None and not self._runs_windows():
                self._current = self._current_resolver(self)
            else:
                cr3 = user_root(self.registers)
                self._current = Current(None, None, cr3) if cr3 is not None else None
        return self._current

    def alert(self, severity: Severity | str, message: str, **details: Any) -> Alert:
        """Raise an alert about the current event; ``pid``/``comm`` default to the current task."""
        event = self.event
        pid = details.pop("pid", None)
        comm = details.pop("comm", None)
        if pid is None and comm is None:
            pid = getattr(event, "pid", None)
            comm = getattr(event, "comm", None)
            if pid is None:
                try:
                    cur = self.current
                except Exception:  # the task is unknowable (guest data bad): the alert still counts
                    cur = None
                if cur is not None:
                    pid, comm = cur.pid, cur.comm
        alert = Alert(
            rule=self.rule.name if self.rule else "engine", severity=Severity.parse(severity), message=message,
            vm=self.vm, host=self.host, time_ns=event.time_ns if event else 0, seq=event.seq if event else 0,
            pid=pid, comm=comm or None, details=details,
        )
        self._alerts.append(alert)
        if self.rule is not None:
            self.rule.alerts += 1
        return alert

    def emit(self, event: Event) -> None:
        """Dispatch a derived event (sensors: ``ProcessStart`` from a breakpoint) after this one."""
        self._emitted.append(event)

    def on_resume(self) -> None:
        """The guest ran: drop what may be stale."""
        if self._memory is not None:
            self._memory.on_resume()


def default_os_factory(guest: Guest) -> Any:
    """The OS layer of a source with memory: Linux or Windows, found from its memory and registers."""
    from vmwatch.os import detect

    return detect.from_memory(guest.phys, guest.cpus or ((guest.registers,) if guest.registers else ()))
