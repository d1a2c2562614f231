"""An independent, deliberately naive AArch64 stage-1 walker used as an oracle by the tests.

Written from the Arm ARM (DDI 0487 D8) as one loop over levels, sharing no code with
vmwatch.memory.aarch64. Returns the physical address, or None when the address does not translate.
"""

from __future__ import annotations

GRANULE_TG0 = {0: 12, 1: 16, 2: 14}
GRANULE_TG1 = {1: 14, 2: 12, 3: 16}


def walk(buf: bytes, tcr: int, ttbr0: int, ttbr1: int, vaddr: int) -> int | None:
    if vaddr < 0 or vaddr >= 1 << 64:
        return None
    upper = (vaddr >> 55) & 1
    if upper:
        granule, size_field, tbi, root = GRANULE_TG1[(tcr >> 30) & 3], (tcr >> 16) & 63, (tcr >> 38) & 1, ttbr1
    else:
        granule, size_field, tbi, root = GRANULE_TG0[(tcr >> 14) & 3], tcr & 63, (tcr >> 37) & 1, ttbr0
    va_bits = 64 - size_field
    top_bit = 56 if tbi else 64
    for bit in range(va_bits, top_bit):
        if (vaddr >> bit) & 1 != upper:
            return None
    per_level = granule - 3
    levels = (va_bits - granule + per_level - 1) // per_level
    table = root & ((1 << 48) - 2) & ~7
    for i in range(levels):
        level = 4 - levels + i
        shift = granule + (levels - 1 - i) * per_level
        index_bits = min(per_level, va_bits - shift)
        index = (vaddr >> shift) % (1 << index_bits)
        addr = table + index * 8
        if addr + 8 > len(buf):
            return None
        desc = int.from_bytes(buf[addr : addr + 8], "little")
        if desc % 2 == 0:
            return None
        out = (desc % (1 << 48)) // (1 << granule) * (1 << granule)
        if granule == 16:
            out += ((desc >> 12) % 16) << 48
        if level == 3:
            if not desc & 2:
                return None
            return out + vaddr % (1 << granule)
        if not desc & 2:
            allowed = {12: (1, 2), 14: (2,), 16: (1, 2)}[granule]
            if level not in allowed:
                return None
            return out // (1 << shift) * (1 << shift) + vaddr % (1 << shift)
        table = out
    return None
