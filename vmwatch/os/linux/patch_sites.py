"""Kernel code Linux patches itself at run time: static keys, static calls, ftrace sites.

A kernel-text integrity check must not report these: jump-table entries are
``{s32 code, s32 target, long key}`` relative to the field; static call sites ``{s32 addr, s32 key}``;
mcount_loc is a list of absolute addresses. Each site spans the 5 bytes of a jmp/call/nop5.
"""

from __future__ import annotations

import bisect

_MAX_TABLE = 16 << 20


class PatchSites:
    """The sites, sorted: ``covers(address)`` says whether a changed byte is the kernel's own patch."""

    def __init__(self, sites: list[tuple[int, int]]) -> None:
        self.sites = sorted(sites)
        """``(address, length)`` of each site."""

    def covers(self, address: int) -> bool:
        sites = self.sites
        k = bisect.bisect_right(sites, (address, 1 << 62)) - 1
        return k >= 0 and sites[k][0] <= address < sites[k][0] + sites[k][1]

    def __len__(self) -> int:
        return len(self.sites)


def patch_sites(linux) -> PatchSites:
    """Every site the kernel may rewrite (tables this kernel lacks are skipped)."""
    symbols, memory = linux.symbols, linux.memory
    sites: list[tuple[int, int]] = []

    def table(start: str, stop: str) -> tuple[int, bytes]:
        lo, hi = symbols.get(start), symbols.get(stop)
        if lo is None or hi is None or not 0 <= hi - lo <= _MAX_TABLE:
            return 0, b""
        return lo, memory.read(lo, hi - lo, pad=True)

    lo, raw = table("__start___jump_table", "__stop___jump_table")
    for off in range(0, len(raw) - 15, 16):
        sites.append((lo + off + int.from_bytes(raw[off:off + 4], "little", signed=True), 5))
    lo, raw = table("__start_static_call_sites", "__stop_static_call_sites")
    for off in range(0, len(raw) - 7, 8):
        sites.append((lo + off + int.from_bytes(raw[off:off + 4], "little", signed=True), 5))
    lo, raw = table("__start_mcount_loc", "__stop_mcount_loc")
    for off in range(0, len(raw) - 7, 8):
        sites.append((int.from_bytes(raw[off:off + 8], "little"), 5))
    return PatchSites(sites)
