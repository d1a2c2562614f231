"""Find an arm64 Linux kernel with no configuration: page tables, kallsyms, BTF, data symbols.

Theory of operation (arm64 Linux 6.1, Documentation/arm64/memory.rst):

1. Page tables: TTBR1_EL1/TCR_EL1 from the gdbstub, or, for a dump (no system registers), the
   ``swapper_pg_dir`` scan (swapper.py). ``swapper_pg_dir`` sits in the image's read-only data,
   so its physical address is an anchor in the physically contiguous kernel image.
2. kallsyms, BTF and ``linux_banner`` all live in that read-only data, below ``swapper_pg_dir``:
   the physical search covers ``IMAGE_BEFORE`` bytes below it. kallsyms starts at ``_stext``,
   64 KiB above ``_text``; KASLR's slide is ``_text - KIMAGE_VADDR`` (2 MiB-aligned).
3. Debian builds without CONFIG_KALLSYMS_ALL, so kallsyms names functions only. The data
   symbols the OS layer needs are recovered from the code that uses them: a function that
   takes ``&init_task`` or ``&modules`` computes it with an ADRP/ADD pair (or ADRP and a load
   offset), which capstone decodes; each address so found is accepted only if the object
   there checks out through BTF (init_task: pid 0, comm "swapper", a tasks list whose next
   entry points back; modules: a list_head whose neighbours point back, and module names).
   ``sys_call_table`` is what ``do_el0_svc`` passes to ``el0_svc_common``, whose ``mov w2, #N``
   gives ``__NR_syscalls`` (and so the table's size). ``__per_cpu_offset`` and ``runqueues`` are
   the two addresses ``idle_cpu``'s ``cpu_rq(cpu)`` computes, accepted when CPU 0's ``struct rq``
   there says cpu 0 and has the ``swapper`` idle task. ``swapper_pg_dir`` and ``linux_banner`` are
   the addresses found in steps 1 and 2. The sysctl variables (kptr_restrict, modprobe_path, ...)
   come from their ``ctl_table`` entries, when first asked for (sysctl_vars.py).
"""

from __future__ import annotations

from array import array

import structlog

from vmwatch.cpu import PagingMode
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux import btf, kallsyms
from vmwatch.os.linux.locate import BANNER, KernelInfo
from vmwatch.os.linux.objects import StructReader, c_string
from vmwatch.os.linux.swapper import complete_registers
from vmwatch.os.linux.sysctl_vars import IMAGE_SPAN, SymbolsWithSysctls, find_sysctl_variables
from vmwatch.os.linux.syscalls import MAX_SYSCALLS

log = structlog.get_logger()

KIMAGE_VADDR = 0xFFFF_8000_0800_0000
"""Where ``_text`` links with 48-bit VAs (MODULES_END: 128 MiB above the start of the kernel half)."""
HEAD_SIZE = 0x10000
"""``_stext - _text``: the head text, padded to SEGMENT_ALIGN (64 KiB). kallsyms starts at ``_stext``
(its relative base), and the head is not mapped once the kernel runs."""
IMAGE_BEFORE = 128 << 20
"""How far below ``swapper_pg_dir`` the image's read-only data may start (the image is ~40 MiB)."""
BTF_HEADER = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
"""magic 0xeB9F, version 1, flags 0, hdr_len 24."""
CODE_MAX = 16 << 10
"""Bytes of one function decoded when looking for data references."""
MASK = (1 << 64) - 1
"""capstone gives immediates signed."""
REFERENCES = {
    "init_task": ("show_state_filter", "__arm64_sys_setpriority", "__arm64_sys_getpriority",
                  "check_hung_uninterruptible_tasks", "find_lock_later_rq"),
    "modules": ("print_modules", "find_module_all", "m_start", "module_kallsyms_lookup_name"),
    "sys_call_table": ("do_el0_svc",),
    "runqueues": ("idle_cpu", "available_idle_cpu", "nr_iowait_cpu", "task_curr"),
}
"""Text functions (in kallsyms) whose code computes ``&name``, most direct first."""


def is_arm64(phys, registers: tuple) -> bool:
    """Whether the guest is arm64: aarch64 registers, or an aarch64 ELF core without CPU notes."""
    if registers:
        return any(getattr(r, "arch", None) == "aarch64" for r in registers)
    return (getattr(phys, "metadata", None) or {}).get("machine") == "aarch64"


def locate(phys, registers: tuple, symbols_file: str | None = None):
    """The pieces of ``Linux`` for an arm64 kernel: (KernelInfo, symbols, types, memory, syscall count
    or None).

    Raises:
        SymbolError: no kernel tables, kallsyms, BTF or a needed data symbol was found, or the
            symbol file is another kernel's.
        UnsupportedOperation: a symbol file other than a System.map was given (types come from BTF).

    A System.map (the -dbg package's, or the guest's own /proc/kallsyms saved) adds the symbols
    kallsyms lacks, slid by KASLR; a data symbol it names is taken when it passes the same check
    as one found from code.
    """
    from vmwatch.errors import UnsupportedOperation
    from vmwatch.memory import GuestMemory
    from vmwatch.os.linux.symbols import load_symbols_file

    symbol_file = load_symbols_file(symbols_file) if symbols_file is not None else None
    if symbol_file is not None and (symbol_file.symbols is None or symbol_file.types is not None):
        raise UnsupportedOperation("--symbols on arm64: a System.map only (types come from the kernel's BTF)")
    registers, scanned = complete_registers(phys, registers or (Aarch64Registers(),))
    regs = next(r for r in registers if getattr(r, "arch", None) == "aarch64")
    memory = GuestMemory(phys, registers=regs)
    anchor = regs.ttbr1_el1 & 0x0000_FFFF_FFFF_F000
    low = max(anchor - IMAGE_BEFORE, min(r.start for r in phys.runs))
    read = lambda paddr, size: phys.read(paddr, size, pad=True)  # noqa: E731
    symbols, _tables, _base = kallsyms.scan(read, [(low, anchor - low)])
    text_vaddr = symbols["_stext"] - HEAD_SIZE
    text_paddr = memory.translate(symbols["_stext"]) - HEAD_SIZE
    if symbol_file is not None:
        symbols = symbol_file.merge_symbols(symbols, text_vaddr)
    found = {"swapper_pg_dir": text_vaddr + anchor - text_paddr}
    blob_at = _find(read, low, anchor, BTF_HEADER)
    if blob_at is None:
        raise SymbolError("no BTF in the arm64 kernel image (CONFIG_DEBUG_INFO_BTF off?)")
    types = btf.load_profile(read(blob_at, btf_size(read(blob_at, 24))))
    banner_at = _find(read, low, anchor, BANNER, _is_banner)
    if banner_at is None:
        raise SymbolError("no 'Linux version' banner in the arm64 kernel image")
    found["linux_banner"] = text_vaddr + banner_at - text_paddr
    found["init_task"] = named_or_found(memory, symbols, "init_task", _init_task_check(memory, types))
    found["modules"] = named_or_found(memory, symbols, "modules", _modules_check(memory, types))
    try:  # syscalls need it; ps and modules do not
        found["sys_call_table"] = named_or_found(memory, symbols, "sys_call_table", _syscalls_check(memory, symbols))
    except SymbolError as exc:
        log.debug("linux.arm64_no_syscall_table", error=str(exc))
    count = syscall_count(memory, symbols) if "sys_call_table" in found else None
    try:  # the scheduler's view (hidden processes) needs them; ps does not
        found.update(per_cpu_symbols(memory, symbols, types))
    except SymbolError as exc:
        log.debug("linux.arm64_no_runqueues", error=str(exc))
    span = min(IMAGE_SPAN, max(r.start + r.size for r in phys.runs) - text_paddr)
    symbols = with_symbols(symbols, found, {"sys_call_table": 8 * count} if count else {},
                           lambda: find_sysctl_variables(read, text_paddr, text_vaddr, span, types))
    banner = memory.cstring(found["linux_banner"], 512).rstrip("\n")
    parts = banner.split()
    kernel = KernelInfo(
        banner=banner, release=parts[2] if len(parts) > 2 else "?", text_vaddr=text_vaddr, text_paddr=text_paddr,
        slide=text_vaddr - KIMAGE_VADDR, phys_slide=text_paddr - min(r.start for r in phys.runs),
        page_offset=None, kernel_cr3=anchor, mode=PagingMode.AARCH64)
    log.debug("linux.found", arch="arm64", release=kernel.release, slide=hex(kernel.slide),
              tables="scanned" if scanned else "registers", **{k: hex(v) for k, v in found.items()})
    return kernel, symbols, types, memory, count


def btf_size(header: bytes) -> int:
    """Total bytes of a BTF blob from its 24-byte header (types and strings after the header)."""
    _magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = btf.HEADER.unpack_from(header)
    size = hdr_len + max(type_off + type_len, str_off + str_len)
    if not 24 <= size < 64 << 20:
        raise SymbolError(f"absurd BTF size {size:#x}")
    return size


def _is_banner(data: bytes, i: int) -> bool:
    """``linux_banner``: "Linux version 6.1.0-57-arm64 (...) #1 SMP ...\n". A second copy, built
    before the build number is known, says "# SMP": UTS_VERSION's "#" must be followed by a digit."""
    line = data[i:i + 512].split(b"\n", 1)[0]
    hash_at = line.find(b" #")
    return line[len(BANNER):len(BANNER) + 1].isdigit() and hash_at > 0 and line[hash_at + 2:hash_at + 3].isdigit()


def _find(read, start: int, end: int, needle: bytes, accept=lambda data, i: True) -> int | None:
    """Physical address of the first ``needle`` in ``[start, end)`` that ``accept`` takes."""
    chunk = 4 << 20
    for pos in range(start, end, chunk):
        data = read(pos, min(chunk + len(needle), end - pos))
        i = data.find(needle)
        while i >= 0:
            if accept(data, i):
                return pos + i
            i = data.find(needle, i + 1)
    return None


def _disassemble(memory, start: int, size: int):
    """capstone's instructions (with operand details) of the kernel code at ``start``."""
    import capstone

    arch = getattr(capstone, "CS_ARCH_ARM64", None) or capstone.CS_ARCH_AARCH64
    md = capstone.Cs(arch, capstone.CS_MODE_ARM)
    md.detail = True
    return md.disasm(memory.read(start, size, pad=True), start)


def code_references(memory, start: int, size: int) -> list[int]:
    """Addresses the code at ``start`` forms with ADRP and then ADD or a load/store offset."""
    import capstone

    pages: dict[int, int] = {}
    found = []
    for insn in _disassemble(memory, start, size):
        ops = insn.operands
        if insn.mnemonic == "adrp" and len(ops) == 2:
            pages[ops[0].reg] = ops[1].imm & MASK
        elif insn.mnemonic == "add" and len(ops) == 3 and ops[1].reg in pages and ops[2].type == capstone.CS_OP_IMM:
            found.append((pages[ops[1].reg] + ops[2].imm) & MASK)
            pages.pop(ops[0].reg, None)  # now an object's address, not a page: its loads are fields
        elif insn.mnemonic.startswith(("ldr", "str")) and ops and ops[-1].type == capstone.CS_OP_MEM:
            base = ops[-1].mem.base
            if base in pages:
                found.append((pages[base] + ops[-1].mem.disp) & MASK)
    return list(dict.fromkeys(found))


def syscall_count(memory, symbols) -> int | None:
    """``__NR_syscalls``: ``el0_svc_common(regs, scno, __NR_syscalls, sys_call_table)`` is called
    from ``do_el0_svc``; gcc folds the constant into the callee (``el0_svc_common.constprop.0``),
    which passes it on as ``mov w2, #N``. None if neither function has it."""
    import capstone

    start = symbols.get("do_el0_svc")
    if start is None:
        return None
    callees = [insn.operands[0].imm & MASK for insn in _disassemble(memory, start, _length(symbols, start))
               if insn.mnemonic == "bl" and insn.operands]
    for function in [start, *callees[:4]]:
        for insn in _disassemble(memory, function, _length(symbols, function)):
            ops = insn.operands
            if (insn.mnemonic == "mov" and len(ops) == 2 and ops[1].type == capstone.CS_OP_IMM
                    and insn.reg_name(ops[0].reg) == "w2" and 64 <= ops[1].imm <= MAX_SYSCALLS):
                return ops[1].imm
    return None


def _length(symbols, start: int) -> int:
    end = symbols.next_address(start)
    return min(end - start, CODE_MAX) if end else CODE_MAX


def named_or_found(memory, symbols, name: str, check) -> int:
    """``name``'s address from the symbol table when it has it (a System.map's) and it passes
    ``check``, else from the code that uses it (:func:`data_symbol`)."""
    named = symbols.get(name)
    try:
        if named is not None and check(named):
            return named
    except VmwatchError:
        pass
    return data_symbol(memory, symbols, name, check)


def data_symbol(memory, symbols, name: str, check) -> int:
    """The address of data symbol ``name`` from the code of the functions that use it (REFERENCES).

    Raises:
        SymbolError: no referenced address passes ``check``.
    """
    tried = []
    for function in REFERENCES[name]:
        start = symbols.get(function)
        if start is None:
            continue
        tried.append(function)
        for target in code_references(memory, start, _length(symbols, start)):
            try:
                if check(target):
                    return target
            except VmwatchError:
                continue
    raise SymbolError(f"{name} not found: kallsyms has no data symbols (CONFIG_KALLSYMS_ALL off) and no address "
                      f"the code of {', '.join(tried) or 'its users'} computes holds it", name=name)


def per_cpu_symbols(memory, symbols, types) -> dict[str, int]:
    """``__per_cpu_offset`` and ``runqueues`` from ``cpu_rq(cpu)``'s code: a pair of the addresses it
    computes where CPU 0's run queue (``runqueues + __per_cpu_offset[0]``) is one.

    Raises:
        SymbolError: no function that uses them yields a pair that checks out.
    """
    rq = StructReader(types, "rq")
    task = StructReader(types, "task_struct")

    def is_run_queue(address: int) -> bool:
        buf = memory.read(address, rq.size)
        idle = memory.read(rq.int(buf, "idle"), task.size)
        return rq.int(buf, "cpu") == 0 and task.int(idle, "pid") == 0 and task.bytes(idle, "comm").startswith(b"swapper")

    for function in REFERENCES["runqueues"]:
        start = symbols.get(function)
        if start is None:
            continue
        targets = code_references(memory, start, _length(symbols, start))
        for offsets in targets:
            for queues in targets:
                try:
                    if queues != offsets and is_run_queue((queues + memory.u64(offsets)) & MASK):
                        return {"__per_cpu_offset": offsets, "runqueues": queues}
                except VmwatchError:
                    continue
    raise SymbolError("runqueues not found: no address pair the code of idle_cpu and its kin computes is CPU 0's "
                      "run queue", name="runqueues")


def _init_task_check(memory, types):
    task = StructReader(types, "task_struct")
    tasks = task.offset("tasks")

    def check(address: int) -> bool:
        buf = memory.read(address, task.size)
        if task.int(buf, "pid") or not task.bytes(buf, "comm").startswith(b"swapper"):
            return False
        return memory.u64(task.int(buf, "tasks.next") + 8) == address + tasks

    return check


def _syscalls_check(memory, symbols):
    def check(address: int) -> bool:
        # Most of the first entries are handlers (one hooked entry must not hide the table).
        names = [symbols.lookup(memory.u64(address + 8 * i)) for i in range(16)]
        return sum(1 for n in names if n is not None and n[1] == 0 and n[0].startswith("__arm64_sys_")) >= 12

    return check


def _modules_check(memory, types):
    module = StructReader(types, "module")
    link, name = module.offset("list"), module.offset("name")

    def check(address: int) -> bool:
        first, last = memory.u64(address), memory.u64(address + 8)
        if first == address:
            return last == address
        if memory.u64(first + 8) != address or memory.u64(last) != address:
            return False
        text = c_string(memory.read(first - link + name, 56).split(b"\0", 1)[0])
        return bool(text) and text.isprintable()

    return check


def with_symbols(symbols, extra: dict[str, int], sizes: dict[str, int], sysctls):
    """``symbols`` plus the recovered data symbols (type ``D``), with the ``sizes`` known of them, and the
    sysctl variables ``sysctls()`` finds when one is first asked for."""
    kinds = symbols.types or "T" * len(symbols)
    keep = [i for i, name in enumerate(symbols.names) if name not in extra]  # a System.map's wrong one
    names = [symbols.names[i] for i in keep] + list(extra)
    addresses = array("Q", (symbols.addresses[i] for i in keep))
    addresses.extend(extra.values())
    types = "".join(kinds[i] for i in keep) + "D" * len(extra)
    merged = SymbolsWithSysctls(names, addresses, types, sysctls)
    merged.sizes.update(sizes)
    return merged
