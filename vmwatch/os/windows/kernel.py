"""``Windows``: one ntoskrnl found in memory, with its exports, KDBG, DTB and objects.

The initialisation follows LibVMI (seed 004): kernel base, symbols (exports, KDBG), page
directory, process list. Each step is logged at debug and kept as a :class:`Found` record
("what, the value, how it was found") that ``vmwatch info`` prints.
"""

from __future__ import annotations

import struct

import attrs
import structlog

from vmwatch.cpu import PagingMode, Registers
from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.windows import kdbg as kdbg_mod
from vmwatch.os.windows import locate, pe
from vmwatch.os.windows.facts import KernelInfo, Steps
from vmwatch.os.windows.profiles import Profile, builtin, load_profile
from vmwatch.os.windows.symbols import WindowsSymbols

log = structlog.get_logger()

_KDBG_READ = 0x400
_KEYS = ("KiWaitNever", "KiWaitAlways", "KdpDataBlockEncoded")
_HEADER_LISTS = {"PsActiveProcessHead": "ps_active_process_head", "PsLoadedModuleList": "ps_loaded_module_list"}


class Windows:
    """A Windows kernel (x64, or x86 with PAE or 32-bit paging) in a dump or a live guest.

    Attributes:
        kernel: where it is and how each fact was found (:class:`KernelInfo`).
        symbols: ntoskrnl exports + KDBG fields + profile symbols (:class:`WindowsSymbols`).
        profile: the structure offsets used.
        memory: a ``GuestMemory`` on the kernel page tables.
    """

    os_name = "windows"

    def __init__(self, kernel: KernelInfo, symbols: WindowsSymbols, profile: Profile, memory) -> None:
        self.kernel = kernel
        self.symbols = symbols
        self.profile = profile
        self.memory = memory
        memory.symbols.resolver = symbols.__getitem__
        memory.pid_dtb.resolver = self._pid_dtb

    def ksym2v(self, name: str) -> int:
        """Virtual address of kernel symbol ``name`` (an export, KDBG field or profile symbol)."""
        return self.memory.symbols.get(name)

    @classmethod
    def from_memory(cls, phys, registers: tuple[Registers, ...] = (), symbols_file: str | None = None) -> Windows:
        """Find ntoskrnl in physical memory ``phys``.

        Args:
            phys: physical memory (an image or a live source).
            registers: CPU state, if the source has some (CR3, IDTR).
            symbols_file: a Volatility 3 Windows ISF or a libvmi.conf Windows entry.

        Returns:
            A Windows; for a triage dump (no physical memory) a
            :class:`vmwatch.os.windows.triage.TriageWindows` with what the dump holds.

        Raises:
            SymbolError: no ntoskrnl, no way to its virtual base or DTB, or an unknown build
                without a profile.
            PEFormatError: ntoskrnl's headers or exports are corrupt.
        """
        from vmwatch.memory import GuestMemory

        if getattr(phys, "triage", None) is not None:  # a triage dump: saved pieces, no memory to search
            from vmwatch.os.windows.triage import TriageWindows

            return TriageWindows.from_image(phys, symbols_file)
        steps = Steps()
        registers = tuple(r for r in registers if r is not None)
        meta = getattr(phys, "metadata", None) or {}
        dtb, mode = cls._page_tables(meta, registers, steps)
        memory = GuestMemory(phys, cr3=dtb, mode=mode) if dtb is not None else None

        vaddr = paddr = None
        idtr = next((r.idtr_base for r in registers if getattr(r, "idtr_base", None)), None)
        if memory is not None and idtr:
            try:
                vaddr, handler = locate.idt_kernel(memory, idtr)
                paddr = memory.translate(vaddr)
                steps.add("kernel base", vaddr, f"scanned down from IDT vector 0 handler {handler:#x} (IDTR {idtr:#x})")
            except VmwatchError as exc:
                log.debug("windows.idt_scan_failed", error=str(exc))
                vaddr = None
        if vaddr is None:
            paddr, _, tried = locate.physical_kernel(phys)
            steps.add("kernel physical base", paddr, f"physical scan upward for MZ exporting ntoskrnl ({tried} MZ pages)")
            read = lambda a, n: phys.read(a, n, pad=True)  # noqa: E731
            image_base = paddr
        else:
            read, image_base = memory.read, vaddr
        headers = pe.parse_headers(read, image_base)
        bits = headers.bits
        steps.add("architecture", "x64" if bits == 64 else "x86", f"ntoskrnl's PE header (Machine {headers.machine:#x})")
        if memory is not None and memory.pointer_size * 8 != bits:
            raise SymbolError(f"a {bits}-bit ntoskrnl, but the page tables are {mode.value} paging")
        # The profile is read once a kernel is found: a Linux guest given a Linux symbol file must
        # not end in a complaint about the file as a Windows profile.
        user_profile = load_profile(symbols_file, bits) if symbols_file is not None else None
        exports = pe.read_exports(read, headers)
        build = None
        if "NtBuildNumber" in exports.rvas:
            build = struct.unpack("<I", read(image_base + exports.rvas["NtBuildNumber"], 4))[0] & 0xFFFF
            steps.add("build", build, "ntoskrnl export NtBuildNumber")
        profile = user_profile or builtin(build, bits)
        steps.add("profile", profile.name, profile.source)

        if vaddr is None and memory is not None and meta.get("kd_debugger_data_block") \
                and "KdDebuggerDataBlock" in profile.symbols:
            guess = meta["kd_debugger_data_block"] - profile.symbols["KdDebuggerDataBlock"]
            try:
                if memory.translate(guess) == paddr:
                    vaddr = guess
                    steps.add("kernel base", vaddr, "crash dump KdDebuggerDataBlock minus its profile RVA")
            except VmwatchError:
                pass
        if vaddr is None and memory is not None and meta.get("ps_loaded_module_list"):
            vaddr = cls._base_from_module_list(memory, meta["ps_loaded_module_list"], profile, paddr)
            if vaddr is not None:
                steps.add("kernel base", vaddr, "DllBase of the first entry on the crash dump header's PsLoadedModuleList")
        block, kdbg_how = cls._find_kdbg(phys, memory, meta, profile, vaddr, (paddr, headers.size_of_image))
        if block is not None and vaddr is None:
            vaddr = block.fields["KernBase"]
            steps.add("kernel base", vaddr, "KDBG KernBase")
        if vaddr is None:
            raise SymbolError(f"ntoskrnl found at physical {paddr:#x}, but neither CPU state (IDTR, CR3) nor a "
                              "KDBG block gives its virtual address (Windows 8+ encodes KDBG: pass --symbols "
                              "with an ISF naming KiWaitNever/KiWaitAlways/KdpDataBlockEncoded)")
        if dtb is None:
            dtb, eprocess, mode = locate.system_process_dtb(phys, profile, vaddr, paddr)
            steps.add("DTB", dtb, f"System EPROCESS found by scan at physical {eprocess:#x}")
            if bits == 32:
                steps.add("paging", mode.value, "the System DirectoryTableBase maps the kernel in this mode "
                          + ("(PAE tried first)" if mode is PagingMode.PAE else "(not as PAE)"))
            memory = GuestMemory(phys, cr3=dtb, mode=mode)
        if paddr is not None:
            cls._check_dtb(memory, dtb, mode, vaddr, paddr)
        if block is not None:
            if block.vaddr is None:
                block = cls._kdbg_vaddr(block, memory, vaddr, headers.size_of_image)
            steps.add("KDBG", block.vaddr if block.vaddr is not None else block.paddr, kdbg_how)

        relocated = {name: vaddr + rva for name, rva in exports.rvas.items()}
        extra = {name: vaddr + rva for name, rva in profile.symbols.items()}
        sources = dict.fromkeys(profile.symbols, "profile symbol")
        for name in _HEADER_LISTS:  # a dump header copies the list heads: used when KDBG is missing
            if meta.get(_HEADER_LISTS[name]):
                extra[name], sources[name] = meta[_HEADER_LISTS[name]], "crash dump header " + name
        if block is not None:
            extra.update({name: value for name, value in block.fields.items() if value})
            sources.update(dict.fromkeys((n for n, v in block.fields.items() if v), "KDBG"))
            if block.vaddr is not None:
                extra["KdDebuggerDataBlock"] = block.vaddr
        sources.update(dict.fromkeys(exports.rvas, "ntoskrnl export"))
        symbols = WindowsSymbols(relocated, extra)
        for name in ("PsActiveProcessHead", "PsLoadedModuleList", "PsInitialSystemProcess", "KeServiceDescriptorTable"):
            if name in symbols:
                steps.add(name, symbols[name], sources[name])
        kernel = KernelInfo(base=vaddr, paddr=paddr, size=headers.size_of_image, name=exports.name, build=build,
                            dtb=dtb, kdbg=block.vaddr if block is not None else None, found=tuple(steps),
                            kdbg_offsets=dict(block.offsets) if block is not None else {}, bits=bits)
        return cls(kernel, symbols, profile, memory)

    @staticmethod
    def _check_dtb(memory, dtb: int, mode: PagingMode, vaddr: int, paddr: int) -> None:
        """The DTB must map the kernel's virtual base onto the ntoskrnl image that was found.

        Raises:
            SymbolError: it maps it nowhere or elsewhere (a wrong DTB, or a wrong paging mode:
                a dump header whose PaeEnabled lies).
        """
        try:
            mapped = memory.translate(vaddr)
        except VmwatchError as exc:
            raise SymbolError(f"DTB {dtb:#x} in {mode.value} paging does not map the kernel base {vaddr:#x} "
                              f"({exc})") from None
        if mapped != paddr:
            raise SymbolError(f"DTB {dtb:#x} in {mode.value} paging maps the kernel base {vaddr:#x} to physical "
                              f"{mapped:#x}, not to ntoskrnl at {paddr:#x}")

    @staticmethod
    def _page_tables(meta: dict, registers, steps: Steps) -> tuple[int | None, PagingMode | None]:
        """The kernel DTB and paging mode from a crash dump header or a vCPU, or (None, None)."""
        dtb = meta.get("directory_table_base") or None
        if dtb is not None:
            if meta.get("bits") == 32:
                mode = PagingMode.PAE if meta.get("pae") else PagingMode.BITS32
                steps.add("paging", mode.value, "crash dump header PaeEnabled")
            else:
                mode = PagingMode.LEVEL4
            dtb &= locate.ROOT_MASKS[mode]
            steps.add("DTB", dtb, "crash dump header DirectoryTableBase")
            return dtb, mode
        found = locate.cpu_paging(registers)
        if found is None:
            return None, None
        dtb, mode = found
        if mode is not PagingMode.LEVEL4:
            steps.add("paging", mode.value, "CR0/CR4/EFER of the saved/live vCPU")
        steps.add("DTB", dtb, "CR3 of the saved/live vCPU")
        return dtb, mode

    @staticmethod
    def _find_kdbg(phys, memory, meta, profile, vaddr, image: tuple[int, int]):
        """The KDBG block and how it was found, or (None, why not)."""
        candidates = []
        if meta.get("kd_debugger_data_block"):
            candidates.append((meta["kd_debugger_data_block"], "crash dump header KdDebuggerDataBlock"))
        if profile.kdbg_vaddr:
            candidates.append((profile.kdbg_vaddr, "libvmi.conf win_kdvb"))
        if vaddr is not None and "KdDebuggerDataBlock" in profile.symbols:
            candidates.append((vaddr + profile.symbols["KdDebuggerDataBlock"], "profile symbol KdDebuggerDataBlock"))
        keys, bits = None, profile.bits
        if bits == 64 and vaddr is not None and all(k in profile.symbols for k in _KEYS):
            keys = tuple(vaddr + profile.symbols[k] for k in _KEYS)
        if memory is not None:
            for address, how in candidates:
                try:
                    raw = memory.read(address, _KDBG_READ, pad=True)
                    if raw[0x10:0x14] != kdbg_mod.TAG and keys is not None:
                        never, always = memory.u64(keys[0]), memory.u64(keys[1])
                        raw = kdbg_mod.decode(raw, never, always, keys[2])
                        return kdbg_mod.parse(raw, vaddr=address, paddr=None, encoded=True, kernel_base=vaddr), \
                            how + ", decoded with KiWaitNever/KiWaitAlways"
                    return kdbg_mod.parse(raw, vaddr=address, paddr=None, kernel_base=vaddr, bits=bits), how
                except VmwatchError as exc:
                    log.debug("windows.kdbg_candidate_rejected", address=hex(address), error=str(exc))
        block, rejected = kdbg_mod.scan_physical(phys, vaddr, first=image, bits=bits)
        for line in rejected[:8]:
            log.debug("windows.kdbg_rejected", reason=line)
        if block is None:
            return None, "no KDBG"
        inside = image[0] <= block.paddr < image[0] + image[1]
        return block, (f"physical scan for the KDBG tag (Size {block.size:#x})"
                       + (", in ntoskrnl's own pages" if inside else ""))

    @staticmethod
    def _base_from_module_list(memory, head: int, profile: Profile, paddr: int) -> int | None:
        """ntoskrnl is the first driver loaded: its DllBase, if it maps to the image found."""
        try:
            entry = memory.pointer(head)
            base = memory.pointer(entry + profile.ldr["DllBase"])
            return base if memory.translate(base) == paddr else None
        except VmwatchError:
            return None

    @staticmethod
    def _kdbg_vaddr(block, memory, base: int, size: int):
        """A physically found block with its virtual address: KDBG sits in ntoskrnl's data."""
        page = block.paddr & ~0xFFF
        for offset in range(0, size, 0x1000):
            try:
                if memory.translate(base + offset) == page:
                    return attrs.evolve(block, vaddr=base + offset + (block.paddr & 0xFFF))
            except VmwatchError:
                continue
        return block

    # -- objects ------------------------------------------------------------------------------

    def tasks(self):
        """Processes on PsActiveProcessHead, as a Listing with ``.skipped`` problems."""
        from vmwatch.os.windows.tasks import walk_processes

        return walk_processes(self)

    def modules(self):
        """Drivers on PsLoadedModuleList, as a Listing with ``.skipped`` problems."""
        from vmwatch.os.windows.modules import walk_modules

        return walk_modules(self)

    def scan_processes(self):
        """Processes found by their pool tag in physical memory, linked or not (a second view).

        Returns:
            A Listing of :class:`vmwatch.os.windows.psscan.PoolProcess`.
        """
        from vmwatch.os.windows.psscan import scan_processes

        return scan_processes(self)

    def hidden_processes(self, *, pool: bool = True):
        """Processes another view sees (running, or in pool memory) but ActiveProcessLinks lacks.

        Returns:
            A list of :class:`vmwatch.os.windows.crossview.Hidden`.
        """
        from vmwatch.os.windows.crossview import hidden_processes

        return hidden_processes(self, pool=pool)

    def process_at(self, address: int):
        """The EPROCESS at virtual ``address``, read at the profile's offsets (a :class:`Process`)."""
        from vmwatch.os.windows.tasks import read_process

        return read_process(self, address)

    def running_processes(self) -> dict[int, int]:
        """The EPROCESS address of the thread running on each processor (KPRCB.CurrentThread).

        Raises:
            SymbolError: no KDBG, or one that states no thread offsets.
        """
        from vmwatch.os.windows.processors import running_processes

        return running_processes(self)

    def driver_at(self, address: int, drivers=None):
        """The loaded driver (ntoskrnl, hal, ...) whose image holds ``address``, or None.

        ``drivers``: a ``modules()`` listing already read (a rule checking many addresses).
        """
        return next((d for d in drivers or self.modules() if d.base <= address < d.base + d.size), None)

    def describe(self, address: int) -> str:
        """``export+off (address)`` inside ntoskrnl, else the driver holding it, else "outside every driver"."""
        if self.in_kernel(address):
            hit = self.symbols.lookup(address)
            if hit is not None:
                return f"{hit[0]}+{hit[1]:#x} ({address:#x})" if hit[1] else f"{hit[0]} ({address:#x})"
            return f"{address:#x} in {self.kernel.name}"
        driver = self.driver_at(address)
        return f"{address:#x} in {driver.name}" if driver is not None else f"{address:#x}, outside every loaded driver"

    def syscalls(self):
        """The SSDT (KeServiceDescriptorTable), each entry resolved or flagged outside ntoskrnl."""
        from vmwatch.os.windows.ssdt import read_ssdt

        return read_ssdt(self)

    def idt_bases(self, registers=()) -> dict[int, int]:
        """The IDT base of each processor: IDTR of each vCPU given, else each KPCR's IdtBase.

        Raises:
            SymbolError: no IDTR and no KDBG (KiProcessorBlock) to find the KPCRs by.
        """
        bases = {r.vcpu: r.idtr_base for r in registers if r is not None and getattr(r, "idtr_base", None)}
        if bases:
            return bases
        from vmwatch.os.windows.processors import processors

        try:
            return {p.number: p.idt_base for p in processors(self)}
        except SymbolError:
            raise SymbolError("no IDTR in the CPU state and no KDBG to find the processors' KPCRs by "
                              "(a Windows kernel exports no IDT address)") from None

    def idt(self, registers: Registers | None = None):
        """The IDT of the vCPU of ``registers`` (its IDTR), or of processor 0 (its KPCR's IdtBase).

        Raises:
            SymbolError: neither an IDTR nor a KDBG to find the KPCR by.
        """
        bases = self.idt_bases((registers,) if registers is not None else ())
        return self.idt_at(bases.get(getattr(registers, "vcpu", 0), next(iter(bases.values()))))

    def idt_at(self, base: int):
        """The 256 gates of the IDT at virtual ``base``, handlers resolved to exports."""
        from vmwatch.os.linux.idt import GATE_SIZE, decode_gate

        size = GATE_SIZE if self.kernel.bits == 64 else 8  # an x86 gate is 8 bytes
        raw = self.memory.read(base, 256 * size)
        return [decode_gate(v, raw[v * size:(v + 1) * size], self.symbols) for v in range(256)]

    def in_kernel(self, address: int) -> bool:
        """Whether ``address`` is inside the ntoskrnl image."""
        return self.kernel.base <= address < self.kernel.base + self.kernel.size

    def _pid_dtb(self, pid: int) -> int:
        for task in self.tasks():
            if task.pid == pid:
                return task.dtb
        raise SymbolError(f"no process with pid {pid}")
