"""``Linux``: one kernel found in memory, with its symbols, types and objects.

Zero configuration: the kernel's own kallsyms and BTF are read from memory (see locate.py). A
symbol file (System.map, vmlinux, ISF JSON, libvmi.conf) given by the user fills what the kernel
does not carry (see symbols.py).
"""

from __future__ import annotations

import structlog

from vmwatch.cpu import Registers
from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux import locate
from vmwatch.os.linux.locate import KernelInfo

log = structlog.get_logger()


class Linux:
    """A Linux kernel in a dump or a live guest.

    Attributes:
        kernel: where it is (:class:`KernelInfo`).
        symbols: name -> runtime virtual address (and address -> nearest name).
        types: the BTF profile (or the one from the symbol file).
        memory: a ``GuestMemory`` on the kernel page tables with symbol and pid->cr3 resolvers.
        syscall_count: entries of ``sys_call_table`` when the kernel's code says (arm64), else None.
        arch: ``x86`` or ``aarch64``.
    """

    def __init__(self, kernel: KernelInfo, symbols, types, memory, *, syscall_count: int | None = None,
                 arch: str = "x86") -> None:
        self.kernel = kernel
        self.arch = arch
        self.syscall_count = syscall_count
        self.symbols = symbols
        self.types = types
        self.memory = memory
        memory.symbols.resolver = symbols.__getitem__
        memory.pid_dtb.resolver = self._pid_cr3
        self.logged_breaks: set = set()
        """Broken kernel lists warned about already (one warning each, however often walked)."""

    @classmethod
    def from_memory(cls, phys, registers: tuple[Registers, ...] = (), symbols_file: str | None = None) -> Linux:
        """Find the kernel in physical memory ``phys``.

        Args:
            phys: physical memory (an image or a live source).
            registers: CPU state, if the source has some (speeds up and checks the search).
            symbols_file: optional System.map / vmlinux / ISF / libvmi.conf for kernels without BTF.

        Raises:
            SymbolError: no kernel found, or it lacks BTF and no symbol file was given.
        """
        from vmwatch.memory import GuestMemory
        from vmwatch.os.linux import arm64, btf

        registers = tuple(r for r in registers if r is not None)
        if arm64.is_arm64(phys, registers):
            kernel, symbols, types, memory, syscall_count = arm64.locate(phys, registers, symbols_file)
            return cls(kernel, symbols, types, memory, syscall_count=syscall_count, arch="aarch64")
        symbols, hint, token_table_paddr = locate.find_kallsyms(phys, registers)
        extra = None
        if symbols_file is not None:
            from vmwatch.os.linux.symbols import load_symbols_file

            extra = load_symbols_file(symbols_file)
            if extra.types is not None and not extra.types.has_type("struct task_struct"):
                raise SymbolError(f"{symbols_file}: its types have no struct task_struct (not a Linux kernel's)")
        text_vaddr = hint[0] if hint is not None else symbols["_text"]
        if extra is not None:
            symbols = extra.merge_symbols(symbols, text_vaddr)
        if "linux_banner" not in symbols and extra is not None:
            raise SymbolError(f"{symbols_file}: no linux_banner, and this kernel's kallsyms lacks it too")
        if "linux_banner" not in symbols:
            raise SymbolError(
                "this kernel needs a symbol file: its kallsyms has no data symbols (CONFIG_KALLSYMS_ALL "
                "is off, as on Debian's i386 kernels) and it carries no BTF: pass --symbols with the "
                "vmlinux of its linux-image-*-dbg package or a Volatility 3 ISF JSON file")
        if hint is not None:
            _, text_paddr, _cr3, mode = hint
        else:
            text_paddr = locate.physical_text(phys, symbols, token_table_paddr)
            mode = None
        root, mode = locate.kernel_root(phys, symbols, text_paddr, mode)
        memory = GuestMemory(phys, cr3=root, mode=mode)
        types = None
        if "__start_BTF" in symbols and "__stop_BTF" in symbols:
            start, stop = symbols["__start_BTF"], symbols["__stop_BTF"]
            if not 0 < stop - start < 256 << 20:
                raise SymbolError(f"absurd BTF size {stop - start:#x}")
            types = btf.load_profile(memory.read(start, stop - start))
        if extra is not None:
            types = extra.types or types  # what the user named wins over what memory holds
        if types is None:
            raise SymbolError(
                "this kernel carries no BTF type information (CONFIG_DEBUG_INFO_BTF is off): "
                "pass --symbols with a vmlinux with DWARF (from the linux-image-*-dbg package) "
                "or a Volatility 3 ISF JSON file")
        banner = memory.cstring(symbols["linux_banner"], 512).rstrip("\n")
        parts = banner.split()
        page_offset = None
        if "page_offset_base" in symbols:
            try:
                page_offset = memory.u64(symbols["page_offset_base"])
            except VmwatchError:
                page_offset = None
        # i386 kernels link elsewhere than x86_64's default: the symbol file says where.
        link_text = extra.link_address("_text") if extra is not None else None
        link_text = locate.DEFAULT_TEXT if link_text is None else link_text
        kernel = KernelInfo(
            banner=banner, release=parts[2] if len(parts) > 2 else "?",
            text_vaddr=text_vaddr, text_paddr=text_paddr,
            slide=text_vaddr - link_text, phys_slide=text_paddr - 0x1000000,
            page_offset=page_offset, kernel_cr3=root, mode=mode)
        log.debug("linux.found", release=kernel.release, slide=hex(kernel.slide), cr3=hex(root))
        return cls(kernel, symbols, types, memory)

    # -- objects ------------------------------------------------------------------------------

    def tasks(self):
        """Thread-group leaders (what /proc lists), as a Listing with ``.skipped`` problems."""
        from vmwatch.os.linux.tasks import TaskWalker

        return TaskWalker(self).walk()

    def modules(self):
        from vmwatch.os.linux.modules import walk_modules

        return walk_modules(self)

    def syscalls(self):
        from vmwatch.os.linux.syscalls import read_syscalls

        return read_syscalls(self, count=self.syscall_count)

    def idt(self, registers: Registers | None = None):
        """The IDT's gates (x86 only).

        Raises:
            UnsupportedOperation: an aarch64 kernel (its exception vectors are at VBAR_EL1).
        """
        if self.arch == "aarch64":
            from vmwatch.errors import UnsupportedOperation

            raise UnsupportedOperation("the IDT is x86's: an aarch64 kernel's exception vectors are at VBAR_EL1")
        from vmwatch.os.linux.idt import read_idt

        return read_idt(self, registers)

    def runnable_tasks(self, cpus: int) -> set[int]:
        """task_struct addresses the scheduler knows on CPUs 0..cpus-1 (current + CFS run queue)."""
        from vmwatch.os.linux.sched import runnable_tasks

        return runnable_tasks(self, cpus)

    def patch_sites(self):
        """The code the kernel patches itself (static keys, static calls, ftrace): a ``PatchSites``."""
        from vmwatch.os.linux.patch_sites import patch_sites

        return patch_sites(self)

    def per_cpu(self, name: str, cpu: int = 0) -> int:
        """Address of per-CPU variable ``name`` on ``cpu`` (x86 per-CPU symbols are offsets; arm64's
        are addresses in the image's per-CPU section, and the offset added wraps around)."""
        offsets = self.symbols["__per_cpu_offset"]
        return (self.symbols[name] + self.memory.pointer(offsets + cpu * self.memory.pointer_size)) & 0xFFFFFFFFFFFFFFFF

    @staticmethod
    def gs_base(registers: Registers) -> int | None:
        """The kernel's GS base of a vCPU: ``gs_base`` in kernel mode, ``kernel_gs_base`` (the
        value SWAPGS brings back) when the vCPU was stopped in user mode."""
        cpl = (registers.cs.selector & 3) if getattr(registers, "cs", None) is not None else 0
        return registers.kernel_gs_base if cpl == 3 else registers.gs_base

    def current_task(self, registers: Registers):
        """The task a vCPU was running, through its per-CPU ``current_task`` at GS base."""
        from vmwatch.os.linux.tasks import TaskWalker

        base = self.gs_base(registers)
        if not base:
            raise SymbolError("this vCPU's state has no GS base")
        address = self.memory.pointer(base + self.symbols["current_task"])
        return TaskWalker(self).read(address, [])

    def _pid_cr3(self, pid: int) -> int:
        for task in self.tasks():
            if task.pid == pid or pid in task.threads:
                if task.cr3 is None:
                    raise SymbolError(f"pid {pid} is a kernel thread: it has no user address space")
                return task.cr3
        raise SymbolError(f"no process with pid {pid}")
