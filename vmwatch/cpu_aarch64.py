"""CPU state of an AArch64 vCPU: the sibling of :class:`vmwatch.cpu.Registers` for arm64 guests.

The same contract as x86's: one value type whatever the source (gdbstub, dump notes), fields a
source does not know stay ``None``. The system registers kept are the ones the translation layer
(TTBR0/TTBR1 split by TCR_EL1), the OS layer (``current`` in SP_EL0 while in EL1) and the security
rules (VBAR_EL1, SCTLR_EL1) read.
"""

from __future__ import annotations

from typing import ClassVar, Iterable

import attrs

SYSTEM_REGISTERS = ("sp_el0", "sp_el1", "elr_el1", "spsr_el1", "esr_el1", "far_el1", "ttbr0_el1", "ttbr1_el1",
                    "tcr_el1", "sctlr_el1", "vbar_el1", "mair_el1", "tpidr_el1", "contextidr_el1")
"""Field names of the system registers, in the order ``info`` shows them."""

PSTATE_EL_SHIFT = 2
PSTATE_SP = 1 << 0
"""PSTATE.SP: 1 when the current stack pointer is SP_ELx rather than SP_EL0 (Arm ARM D1.2.2)."""


def refuse_aarch64(sources: Iterable[object], what: str) -> None:
    """Raise UnsupportedOperation naming ``what`` if any of ``sources`` is AArch64's: registers, or a
    live backend (both have ``arch``). For what only x86 has (MSRs).
    """
    if any(getattr(source, "arch", None) == "aarch64" for source in sources):
        from vmwatch.errors import UnsupportedOperation

        raise UnsupportedOperation(f"{what}: x86 only, not on aarch64 guests")


def _opt() -> int | None:
    return attrs.field(default=None)


@attrs.frozen(kw_only=True)
class Aarch64Registers:
    """The architectural state of one AArch64 vCPU. Unknown fields are ``None``."""

    arch: ClassVar[str] = "aarch64"
    vcpu: int = 0
    """Index of the vCPU, from 0."""
    x: tuple[int, ...] | None = None
    """x0..x30 (x29 is the frame pointer, x30 the link register)."""
    sp: int | None = _opt()
    """The stack pointer in use (SP_EL0 or SP_ELx, as PSTATE.SP selects)."""
    pc: int | None = _opt()
    pstate: int | None = _opt()
    """PSTATE as gdb's ``cpsr`` and the dump's ``pstate`` show it (NZCV, DAIF, EL, SP)."""
    sp_el0: int | None = _opt()
    """In EL1 Linux keeps ``current`` (the running task_struct) here."""
    sp_el1: int | None = _opt()
    elr_el1: int | None = _opt()
    spsr_el1: int | None = _opt()
    esr_el1: int | None = _opt()
    far_el1: int | None = _opt()
    ttbr0_el1: int | None = _opt()
    """User-half table base (bits 47:1) with ASID (63:48) and CnP (0)."""
    ttbr1_el1: int | None = _opt()
    """Kernel-half table base, same layout."""
    tcr_el1: int | None = _opt()
    """T0SZ (5:0), T1SZ (21:16), granules TG0/TG1, IPS: the shape of the walk."""
    sctlr_el1: int | None = _opt()
    vbar_el1: int | None = _opt()
    mair_el1: int | None = _opt()
    tpidr_el1: int | None = _opt()
    contextidr_el1: int | None = _opt()

    @property
    def el(self) -> int | None:
        """The exception level the vCPU runs at (PSTATE.EL), or None if PSTATE is unknown."""
        return None if self.pstate is None else (self.pstate >> PSTATE_EL_SHIFT) & 3

    @property
    def lr(self) -> int | None:
        return None if self.x is None else self.x[30]

    @property
    def fp(self) -> int | None:
        return None if self.x is None else self.x[29]

    def as_dict(self) -> dict[str, object]:
        """Known registers as a flat JSON-friendly dict (``x0``..``x30``, ``el`` derived from PSTATE)."""
        out: dict[str, object] = {"vcpu": self.vcpu}
        if self.x is not None:
            out.update({f"x{i}": value for i, value in enumerate(self.x)})
        for name in ("sp", "pc", "pstate", *SYSTEM_REGISTERS):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.el is not None:
            out["el"] = self.el
        return out
