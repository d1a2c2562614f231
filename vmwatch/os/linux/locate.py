"""Find a Linux kernel in physical memory: page tables, KASLR slides, kallsyms, BTF.

Theory of operation (x86_64; Documentation/arch/x86/x86_64/mm.rst):

1. With CPU state (a dump's saved registers, a live vCPU): CR3 (PCID bits and the PTI user
   bit 12 cleared) walks the kernel-text window ``0xffffffff80000000..+1 GiB``. Boot code
   clears every 2 MiB entry of that window outside the image, so the first mapped 2 MiB page is
   ``_text``: that gives the virtual and physical base at once, and kallsyms is searched only
   inside the image.
2. Without CPU state, 2 MiB-aligned pages that begin like ``startup_64`` are tried first, then
   all of physical memory is searched for the kallsyms token table (the image is physically
   contiguous, so its tables need no translation).
3. kallsyms gives runtime (slid) addresses. The physical base is the 2 MiB-aligned address
   below the tables where ``linux_banner`` reads "Linux version"; the kernel page-table root is
   the physical address of ``init_top_pgt``, and the paging depth (4 or 5 levels) is whichever
   translates ``_text`` back to its physical base.
4. i386 (32-bit or PAE paging): the image sits in the direct map, so kallsyms (4-byte pointers) is
   found by the physical search; Debian's i386 kallsyms has no data symbols, which a symbol file
   then supplies (``swapper_pg_dir``, ``linux_banner``, ``kallsyms_token_table``: kernel.py).
"""

from __future__ import annotations

import hashlib

import attrs
import structlog

from vmwatch.cpu import PagingMode, Registers
from vmwatch.errors import SymbolError, TranslationError, VmwatchError
from vmwatch.os.linux import _cache, kallsyms

log = structlog.get_logger()

START_KERNEL_MAP = 0xFFFFFFFF80000000
DEFAULT_TEXT = 0xFFFFFFFF81000000
"""Where ``_text`` links without KASLR (x86_64 CONFIG_PHYSICAL_START 16 MiB)."""
_KERNEL_WINDOW = 1 << 30
_2M = 1 << 21
_IMAGE_MAX = 256 << 20
_CR3_MASK = 0x000FFFFFFFFFF000
BANNER = b"Linux version "


@attrs.frozen
class KernelInfo:
    """Where the kernel is and what it is."""

    banner: str
    release: str
    text_vaddr: int
    """Runtime virtual address of ``_text``."""
    text_paddr: int
    """Physical address of ``_text``."""
    slide: int
    """Virtual KASLR slide: ``text_vaddr - 0xffffffff81000000``."""
    phys_slide: int
    """Physical KASLR slide: ``text_paddr - 16 MiB`` (CONFIG_PHYSICAL_START)."""
    page_offset: int | None
    """Start of the direct map (``page_offset_base``), None if unknown."""
    kernel_cr3: int
    mode: PagingMode


def cr3_candidates(registers: tuple[Registers, ...]) -> list[tuple[int, PagingMode]]:
    """Kernel page-table roots from saved/live registers: PCID and PTI user bit cleared first."""
    found: list[tuple[int, PagingMode]] = []
    for regs in registers:
        if regs.cr3 is None or regs.cr0 is None:
            continue
        mode = regs.paging_mode
        if mode not in (PagingMode.LEVEL4, PagingMode.LEVEL5):
            continue
        base = regs.cr3 & _CR3_MASK
        for cr3 in (base & ~0x1000, base):
            if (cr3, mode) not in found:
                found.append((cr3, mode))
    return found


def text_from_page_tables(phys, cr3: int, mode: PagingMode) -> tuple[int, int] | None:
    """(virtual, physical) ``_text`` from the first mapped 2 MiB page of the kernel-text window."""
    from vmwatch.memory import GuestMemory

    mem = GuestMemory(phys, cr3=cr3, mode=mode)
    vaddr = START_KERNEL_MAP
    while vaddr < START_KERNEL_MAP + _KERNEL_WINDOW:
        try:
            return vaddr, mem.translate(vaddr)
        except TranslationError as exc:
            skip = 1 << getattr(exc, "invalid_bits", 21)
            vaddr = (vaddr + max(skip, _2M)) & ~(max(skip, _2M) - 1)
    return None


def _runs(phys) -> list[tuple[int, int]]:
    runs = getattr(phys, "runs", None)
    if runs:
        return [(run.start, run.size) for run in runs]
    size = getattr(phys, "size", 0)
    if not size:
        raise SymbolError("physical memory has no known extent to search for the kernel")
    return [(0, size)]


def _kallsyms_from_text(read, text_paddr: int):
    """kallsyms searched from a (likely) kernel image base; reuses where it was found last time.

    The cache key is the first page of text, the same for one kernel build wherever KASLR puts it.
    """
    key = hashlib.blake2b(read(text_paddr, 4096), digest_size=16).hexdigest()
    offset = _cache.load("kallsyms-at", key)
    found = None
    if isinstance(offset, int) and 0 < offset < _IMAGE_MAX:
        try:
            found = kallsyms.decode_at(read, text_paddr + offset, text_paddr, text_paddr + _IMAGE_MAX)
        except SymbolError:
            found = None
    if found is None:
        found = kallsyms.scan(read, [(text_paddr, _IMAGE_MAX)], chunk=4 << 20)
    symbols, tables, base = found
    _cache.store("kallsyms-at", key, base + tables.token_table - text_paddr)
    return symbols, base + tables.token_table


def _image_candidates(phys, read, limit: int = 8) -> list[int]:
    """2 MiB-aligned physical pages that start like x86_64 ``startup_64`` (a REX.W ``lea``).

    Only an ordering hint for the blind search: each is checked by decoding kallsyms after it.
    """
    found = []
    for start, size in _runs(phys):
        paddr = (start + _2M - 1) & ~(_2M - 1)
        while paddr < start + size and len(found) < limit:
            if read(paddr, 3) == b"\x48\x8d\x25":
                found.append(paddr)
            paddr += _2M
    return found


def pointer_size(registers: tuple[Registers, ...]) -> int | None:
    """4 or 8 from the paging mode of the first vCPU with paging on; None if none has it."""
    for regs in registers:
        if regs.cr0 is None:
            continue
        if regs.paging_mode in (PagingMode.BITS32, PagingMode.PAE):
            return 4
        if regs.paging_mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
            return 8
    return None


def _kallsyms_32(phys, read):
    """kallsyms of an i386 kernel: tried first where it was found lately (the same dump read
    again, the same boot), by a digest of its token table; else the whole physical search."""
    runs = _runs(phys)
    recent = _cache.load("kallsyms-tt32", "recent")
    recent = recent if isinstance(recent, list) else []
    for entry in recent:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], int)):
            continue
        paddr, digest = entry
        if hashlib.blake2b(read(paddr, 1024), digest_size=16).digest() != digest:
            continue
        start, size = next(((s, n) for s, n in runs if s <= paddr < s + n), (0, 0))
        if not size:
            continue
        try:
            symbols, tables, base = kallsyms.decode_at(read, paddr, start, start + size, pointer_size=4)
        except SymbolError:
            continue
        return symbols, base + tables.token_table
    symbols, tables, base = kallsyms.scan(read, runs, pointer_size=4)
    paddr = base + tables.token_table
    entry = (paddr, hashlib.blake2b(read(paddr, 1024), digest_size=16).digest())
    _cache.store("kallsyms-tt32", "recent", [entry] + [e for e in recent if e != entry][:7])
    return symbols, paddr


def find_kallsyms(phys, registers: tuple[Registers, ...] = ()):
    """Locate and decode kallsyms; use CPU state to narrow the search when there is some.

    i386 kernels (32-bit or PAE paging in the CPU state) are found by the physical search only:
    their kernel image sits in the direct map, which has no window of its own to walk.

    Returns:
        (symbols, text hint as (vaddr, paddr, cr3, mode) or None, physical address of the token table)
    """
    read = lambda paddr, size: phys.read(paddr, size, pad=True)  # noqa: E731
    size = pointer_size(registers)
    if size == 4:
        try:
            symbols, token_table = _kallsyms_32(phys, read)
            return symbols, None, token_table
        except SymbolError:
            if any(regs.efer is not None for regs in registers):
                raise
            size = 8  # 32-bit was a guess without EFER: a 64-bit kernel is searched for too
    for cr3, mode in cr3_candidates(registers):
        try:
            text = text_from_page_tables(phys, cr3, mode)
        except VmwatchError:
            continue
        if text is None:
            continue
        try:
            symbols, token_table = _kallsyms_from_text(read, text[1])
        except SymbolError:
            continue
        if symbols.get("_text") == text[0]:
            return symbols, (text[0], text[1], cr3, mode), token_table
    log.debug("linux.blind_search", reason="no CPU state maps the kernel text window")
    for paddr in _image_candidates(phys, read):
        try:
            symbols, token_table = _kallsyms_from_text(read, paddr)
        except SymbolError:
            continue
        return symbols, None, token_table
    try:
        symbols, tables, base = kallsyms.scan(read, _runs(phys))
    except SymbolError:
        if size is not None:
            raise
        symbols, tables, base = kallsyms.scan(read, _runs(phys), pointer_size=4)  # an i386 kernel?
    return symbols, None, base + tables.token_table


def physical_text(phys, symbols: kallsyms.Symbols, token_table_paddr: int) -> int:
    """The 2 MiB-aligned physical base below the tables at which ``linux_banner`` reads right.

    With ``kallsyms_token_table`` among the symbols (from a symbol file) it is exact, no search.
    """
    banner = symbols["linux_banner"] - symbols["_text"]
    if "kallsyms_token_table" in symbols:
        paddr = token_table_paddr - (symbols["kallsyms_token_table"] - symbols["_text"])
        if phys.read(paddr + banner, len(BANNER), pad=True) == BANNER:
            return paddr
    start = (token_table_paddr & ~(_2M - 1))
    for paddr in range(start, max(-1, start - _IMAGE_MAX), -_2M):
        if phys.read(paddr + banner, len(BANNER), pad=True) == BANNER:
            return paddr
    raise SymbolError("kernel image base not found (linux_banner does not read 'Linux version')")


def kernel_root(phys, symbols: kallsyms.Symbols, text_paddr: int,
                hint: PagingMode | None = None) -> tuple[int, PagingMode]:
    """Physical ``init_top_pgt`` (``swapper_pg_dir`` on i386) and the paging mode that maps
    ``_text`` back to ``text_paddr``."""
    from vmwatch.memory import GuestMemory

    name = "init_top_pgt" if "init_top_pgt" in symbols else "swapper_pg_dir"
    if name not in symbols:
        raise SymbolError("neither init_top_pgt nor swapper_pg_dir is known: the kernel page tables cannot be found")
    root = text_paddr + symbols[name] - symbols["_text"]
    modes = [hint] if hint else []
    wide = symbols["_text"] > 0xFFFFFFFF
    candidates = (PagingMode.LEVEL4, PagingMode.LEVEL5) if wide else (PagingMode.PAE, PagingMode.BITS32)
    modes += [m for m in candidates if m not in modes]
    for mode in modes:
        try:
            if GuestMemory(phys, cr3=root, mode=mode).translate(symbols["_text"]) == text_paddr:
                return root, mode
        except VmwatchError:
            continue
    raise SymbolError(f"{name} at {root:#x} does not map _text to {text_paddr:#x}")
