"""CPU state shared by every source: saved registers of a dump, live registers of a vCPU.

One value type for all sources so the paging layer, the OS layer and the debugger never care
where registers came from. Fields a source does not know stay ``None``.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")

# CR0 / CR4 / EFER bits that the paging layer and the security rules care about.
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
COMMON_MSRS = frozenset((0x10, 0x1B, 0x174, 0x175, 0x176, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
                         0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102))
"""MSRs every x86-64 CPU model implements (TSC, APIC base, SYSENTER, EFER, the SYSCALL ones, FS/GS
bases): the ones vmwatch has a guest read (an ``rdmsr`` of an MSR the model lacks faults)."""
MSR_NAMES = {
    0x10: "tsc", 0x1B: "apic_base", 0x48: "spec_ctrl", 0x174: "sysenter_cs", 0x175: "sysenter_esp",
    0x176: "sysenter_eip", 0x6E0: "tsc_deadline", 0xC0000080: "efer", 0xC0000081: "star",
    0xC0000082: "lstar", 0xC0000083: "cstar", 0xC0000084: "fmask", 0xC0000100: "fs_base",
    0xC0000101: "gs_base", 0xC0000102: "kernel_gs_base",
}  # fmt: skip
MSR_NUMBERS = {name: number for number, name in MSR_NAMES.items()}
CS_L = 1 << 21
"""The L (64-bit code) bit of a segment descriptor's attribute word, as QEMU stores it."""
EXCEPTION_NAMES = {
    0: "divide_error", 1: "debug", 2: "nmi", 3: "breakpoint", 4: "overflow", 5: "bound_range",
    6: "invalid_opcode", 7: "device_not_available", 8: "double_fault", 9: "coprocessor_segment_overrun",
    10: "invalid_tss", 11: "segment_not_present", 12: "stack_fault", 13: "general_protection",
    14: "page_fault", 16: "x87_fpu_error", 17: "alignment_check", 18: "machine_check", 19: "simd_exception",
    20: "virtualization", 21: "control_protection", 28: "hypervisor_injection", 29: "vmm_communication",
    30: "security",
}  # fmt: skip
"""The architectural exception vectors (Intel SDM vol. 3A table 6-1; 28-30: AMD APM vol. 2 8.2)."""
EXCEPTION_VECTORS = {name: vector for vector, name in EXCEPTION_NAMES.items()}
ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))
"""Vectors for which the CPU pushes an error code below the interrupt frame (SDM 6.13)."""


def exception_name(vector: int) -> str:
    """Name of exception ``vector``: ``page_fault``, or ``vector_15`` for a reserved one."""
    return EXCEPTION_NAMES.get(vector, f"vector_{vector}")


def msr_name(number: int) -> str:
    """Short name of MSR ``number``: ``lstar``, or ``0x1234`` for one without a name."""
    return MSR_NAMES.get(number, f"{number:#x}")


class PagingMode(enum.Enum):
    """The x86 paging mode selected by CR0.PG, CR4.PAE, CR4.LA57 and EFER.LMA (Intel SDM 4.1.1)."""

    NONE = "none"
    BITS32 = "32-bit"
    PAE = "pae"
    LEVEL4 = "4-level"
    LEVEL5 = "5-level"
    AARCH64 = "aarch64"
    """Not x86: AArch64 stage 1, its shape read from TCR_EL1 (vmwatch.memory.aarch64)."""

    @classmethod
    def from_registers(cls, cr0: int, cr4: int, efer: int) -> PagingMode:
        if not cr0 & CR0_PG:
            return cls.NONE
        if not cr4 & CR4_PAE:
            return cls.BITS32
        if not efer & (EFER_LMA | EFER_LME):
            return cls.PAE
        return cls.LEVEL5 if cr4 & CR4_LA57 else cls.LEVEL4


def _opt() -> int | None:
    return attrs.field(default=None)


@attrs.frozen(kw_only=True)
class Segment:
    """A segment register: selector plus the hidden descriptor cache."""

    selector: int = 0
    base: int = 0
    limit: int = 0
    attributes: int = 0


@attrs.frozen(kw_only=True)
class Registers:
    """The architectural state of one x86 vCPU. Unknown fields are ``None``."""

    vcpu: int = 0
    """Index of the vCPU, from 0."""
    rax: int | None = _opt()
    rbx: int | None = _opt()
    rcx: int | None = _opt()
    rdx: int | None = _opt()
    rsi: int | None = _opt()
    rdi: int | None = _opt()
    rbp: int | None = _opt()
    rsp: int | None = _opt()
    r8: int | None = _opt()
    r9: int | None = _opt()
    r10: int | None = _opt()
    r11: int | None = _opt()
    r12: int | None = _opt()
    r13: int | None = _opt()
    r14: int | None = _opt()
    r15: int | None = _opt()
    rip: int | None = _opt()
    rflags: int | None = _opt()
    cs: Segment | None = None
    ss: Segment | None = None
    ds: Segment | None = None
    es: Segment | None = None
    fs: Segment | None = None
    gs: Segment | None = None
    fs_base: int | None = _opt()
    gs_base: int | None = _opt()
    kernel_gs_base: int | None = _opt()
    cr0: int | None = _opt()
    cr2: int | None = _opt()
    cr3: int | None = _opt()
    cr4: int | None = _opt()
    cr8: int | None = _opt()
    efer: int | None = _opt()
    gdtr_base: int | None = _opt()
    gdtr_limit: int | None = _opt()
    idtr_base: int | None = _opt()
    idtr_limit: int | None = _opt()
    msrs: dict[str, int] = attrs.field(factory=dict)
    """Other model-specific registers by name (``lstar``, ``star``, ``sysenter_eip``, ...)."""

    arch: ClassVar[str] = "x86"
    """The architecture family (``aarch64`` for :class:`vmwatch.cpu_aarch64.Aarch64Registers`)."""

    @property
    def pc(self) -> int | None:
        """The program counter by its arch-neutral name (RIP)."""
        return self.rip

    @property
    def sp(self) -> int | None:
        """The stack pointer by its arch-neutral name (RSP)."""
        return self.rsp

    @property
    def paging_mode(self) -> PagingMode:
        """The paging mode these control registers select (4-level assumed if EFER is unknown)."""
        cr0 = self.cr0 or 0
        cr4 = self.cr4 or 0
        efer = self.efer
        if efer is None:
            # Unknown EFER (e.g. QEMU ELF dumps): long mode if running above 4 GiB or in a
            # 64-bit code segment (CS.L, descriptor bit 21) - a 64-bit guest paused in user mode.
            long_code = self.cs is not None and bool(self.cs.attributes & CS_L)
            efer = EFER_LMA if (cr4 & CR4_PAE and ((self.rip or 0) > 0xFFFFFFFF or long_code)) else 0
        return PagingMode.from_registers(cr0, cr4, efer)

    def as_dict(self) -> dict[str, object]:
        """Known registers as a flat JSON-friendly dict (segments as selector/base/limit dicts)."""
        out: dict[str, object] = {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if value is None or (field.name == "msrs" and not value):
                continue
            if isinstance(value, Segment):
                value = attrs.asdict(value)
            out[field.name] = value
        return out
