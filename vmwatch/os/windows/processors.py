"""Each processor's KPCR, found through KDBG's KiProcessorBlock: where its IDT is without CPU state.

KiProcessorBlock is an array of KPRCB pointers, one per processor, ended by a null (or the
array's MAX_PROCESSORS bound). On x64 every build embeds the KPRCB in its KPCR at 0x180 (the
block says so too: OffsetPcrContainedPrcb), and the KPCR holds Self (0x18), CurrentPrcb (0x20)
and IdtBase (0x38); on x86 the KPCR holds SelfPcr (0x1C), Prcb (0x20) and IDT (0x38) with
PrcbData at 0x120: the layouts in Microsoft's public PDBs (Vergilius Project and ntdiff dumps,
"_KPCR", Windows 7 SP1 x86/x64 to 10 2004). A KPCR is used only when Self and CurrentPrcb point
back at it, so a stray pointer in hostile memory is reported, not followed.

The thread running on a processor is KPRCB.CurrentThread, and its process KTHREAD.ApcState
.Process: the KDBG block states both offsets (OffsetPrcbCurrentThread, OffsetKThreadApcProcess),
so this view needs no per-build table. It is the scheduler's view, a second one beside
ActiveProcessLinks that costs a few reads (a rootkit's unlinked process shows while it runs).
"""

from __future__ import annotations

import attrs

from vmwatch.errors import GuestDataError, SymbolError, VmwatchError

MAX_PROCESSORS = 2048
"""Windows' own limit on logical processors (x64, 32 groups of 64)."""
PRCB_IN_PCR, SELF, CURRENT_PRCB, IDT_BASE = 0x180, 0x18, 0x20, 0x38
KPCR_X86 = (0x120, 0x1C, 0x20, 0x38)
"""The same four on x86: PrcbData, SelfPcr, Prcb, IDT."""


@attrs.frozen
class Processor:
    """One processor's control region."""

    number: int
    kpcr: int
    prcb: int
    idt_base: int


def processors(win) -> list[Processor]:
    """Every processor on KiProcessorBlock, in order.

    Raises:
        SymbolError: no KiProcessorBlock (no KDBG).
        GuestDataError: an entry whose KPCR does not point back at itself.
    """
    if "KiProcessorBlock" not in win.symbols:
        raise SymbolError("no KiProcessorBlock (it comes from the KDBG block, which was not found)",
                          name="KiProcessorBlock")
    array = win.symbols["KiProcessorBlock"]
    memory = win.memory
    size = memory.pointer_size
    in_pcr, self_at, prcb_at, idt_at = (PRCB_IN_PCR, SELF, CURRENT_PRCB, IDT_BASE) if size == 8 else KPCR_X86
    in_pcr = win.kernel.kdbg_offsets.get("OffsetPcrContainedPrcb", in_pcr)
    out = []
    for number in range(MAX_PROCESSORS):
        try:
            prcb = memory.pointer(array + size * number)
        except VmwatchError:
            break  # the array ends at its page's end: no more processors
        if not prcb:
            break
        kpcr = prcb - in_pcr
        self_ptr, current = memory.pointer(kpcr + self_at), memory.pointer(kpcr + prcb_at)
        if self_ptr != kpcr or current != prcb:
            raise GuestDataError(f"KiProcessorBlock[{number}] = {prcb:#x}: its KPCR at {kpcr:#x} does not "
                                 f"point back at itself (Self {self_ptr:#x}, CurrentPrcb {current:#x})")
        out.append(Processor(number, kpcr, prcb, memory.pointer(kpcr + idt_at)))
    return out


def running_processes(win) -> dict[int, int]:
    """{processor number: EPROCESS of its current thread} (idle processors run the Idle process).

    Raises:
        SymbolError: no KDBG, or a KDBG that states no thread offsets (older than its Size field covers).
    """
    offsets = win.kernel.kdbg_offsets
    if "OffsetPrcbCurrentThread" not in offsets or "OffsetKThreadApcProcess" not in offsets:
        raise SymbolError("the KDBG block states no OffsetPrcbCurrentThread/OffsetKThreadApcProcess: "
                          "no scheduler view of processes", name="OffsetPrcbCurrentThread")
    memory = win.memory
    out = {}
    for p in processors(win):
        thread = memory.pointer(p.prcb + offsets["OffsetPrcbCurrentThread"])
        out[p.number] = memory.pointer(thread + offsets["OffsetKThreadApcProcess"])
    return out
