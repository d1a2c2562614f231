"""An independent, deliberately naive x86 page walker used as an oracle by the tests.

Written straight from the Intel SDM tables, one function per mode, sharing no code with
vmwatch.memory.paging. Returns the physical address or None when not mapped.
"""

from __future__ import annotations


def _u(buf: bytes, addr: int, size: int) -> int | None:
    if addr < 0 or addr + size > len(buf):
        return None
    return int.from_bytes(buf[addr : addr + size], "little")


def walk32(buf: bytes, cr3: int, vaddr: int, pse: bool = True) -> int | None:
    if vaddr >> 32:
        return None
    pde = _u(buf, (cr3 & 0xFFFFF000) + ((vaddr >> 22) & 0x3FF) * 4, 4)
    if pde is None or not pde & 1:
        return None
    if pse and pde & 0x80:
        if pde & (1 << 21):
            return None
        high = ((pde >> 13) & 0xFF) << 32
        return high | (pde & 0xFFC00000) | (vaddr & 0x3FFFFF)
    pte = _u(buf, (pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4, 4)
    if pte is None or not pte & 1:
        return None
    return (pte & 0xFFFFF000) | (vaddr & 0xFFF)


ADDR = 0x000FFFFFFFFFF000


def walk_pae(buf: bytes, cr3: int, vaddr: int) -> int | None:
    if vaddr >> 32:
        return None
    pdpte = _u(buf, (cr3 & 0xFFFFFFE0) + ((vaddr >> 30) & 3) * 8, 8)
    if pdpte is None or not pdpte & 1 or pdpte & 0x6:
        return None
    return _walk_long(buf, pdpte & ADDR, vaddr, [21, 12])


def _walk_long(buf: bytes, table: int, vaddr: int, shifts: list[int]) -> int | None:
    for shift in shifts:
        entry = _u(buf, table + ((vaddr >> shift) & 0x1FF) * 8, 8)
        if entry is None or not entry & 1:
            return None
        if shift in (21, 30) and entry & 0x80:
            size = 1 << shift
            if entry & (size - 1) & ~0x1FFF:
                return None
            return (entry & ADDR & ~(size - 1)) | (vaddr & (size - 1))
        table = entry & ADDR
    return table | (vaddr & 0xFFF)


def walk4(buf: bytes, cr3: int, vaddr: int) -> int | None:
    top = vaddr >> 47
    if top not in (0, 0x1FFFF):
        return None
    return _walk_long(buf, cr3 & ADDR, vaddr, [39, 30, 21, 12])


def walk5(buf: bytes, cr3: int, vaddr: int) -> int | None:
    top = vaddr >> 56
    if top not in (0, 0xFF):
        return None
    return _walk_long(buf, cr3 & ADDR, vaddr, [48, 39, 30, 21, 12])
