"""Each processor's KPCR, found through KDBG's KiProcessorBlock: where its IDT is without CPU state.

KiProcessorBlock is an array of KPRCB pointers, one per processor, ended by a null (or the
array's MAX_PROCESSORS bound). On x64 every build embeds the KPRCB in its KPCR at 0x180, and
the KPCR holds Self (0x18), CurrentPrcb (0x20) and IdtBase (0x38): the layout in Microsoft's
public PDBs (Vergilius Project and ntdiff dumps, "_KPCR", Windows 7 SP1 to 10 2004). A KPCR is
used only when Self and CurrentPrcb point back at it, so a stray pointer in hostile memory is
reported, not followed.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.errors import GuestDataError, SymbolError, VmwatchError

MAX_PROCESSORS = 2048
"""Windows' own limit on logical processors (x64, 32 groups of 64)."""
PRCB_IN_PCR, SELF, CURRENT_PRCB, IDT_BASE = 0x180, 0x18, 0x20, 0x38


@attrs.frozen
class Processor:
    """One processor's control region."""

    number: int
    kpcr: int
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
    out = []
    for number in range(MAX_PROCESSORS):
        try:
            prcb = memory.pointer(array + 8 * number)
        except VmwatchError:
            break  # the array ends at its page's end: no more processors
        if not prcb:
            break
        kpcr = prcb - PRCB_IN_PCR
        self_ptr, current = struct.unpack("<QQ", memory.read(kpcr + SELF, 16))
        if self_ptr != kpcr or current != prcb:
            raise GuestDataError(f"KiProcessorBlock[{number}] = {prcb:#x}: its KPCR at {kpcr:#x} does not "
                                 f"point back at itself (Self {self_ptr:#x}, CurrentPrcb {current:#x})")
        out.append(Processor(number, kpcr, memory.pointer(kpcr + IDT_BASE)))
    return out
