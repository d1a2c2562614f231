"""A Windows triage dump (DumpType 4) as an OS layer: what the dump holds, and plainly what it cannot.

A triage dump keeps no physical memory, so nothing here walks a list: the processes are the
one EPROCESS the dump copied (the crashing thread's), decoded at the build's profile offsets;
the drivers are the dump's own driver list; the symbols are the KDBG copy's fields. Services
(SSDT) and the IDT are not in the dump: asking for them is an UnsupportedOperation, which
the CLI reports in one line and the engine turns into an inactive rule.
"""

from __future__ import annotations

from vmwatch.errors import GuestDataError, SymbolError, UnsupportedOperation
from vmwatch.os.linux.tasks import Listing
from vmwatch.os.windows import kdbg as kdbg_mod
from vmwatch.os.windows.facts import KernelInfo, Steps
from vmwatch.os.windows.modules import Driver
from vmwatch.os.windows.profiles import Profile, builtin, load_profile
from vmwatch.os.windows.symbols import WindowsSymbols
from vmwatch.os.windows.tasks import _process

ONLY_CURRENT = ("a triage dump holds one process, the crashing thread's: the other processes "
                "are not in it (take a kernel or full dump for them)")
ONLY_LISTED = "a triage dump holds the driver list, not the drivers' KLDR entries in memory"
NO_IDT = "a triage dump holds no IDT (no physical memory and no IDTR)"
NO_MEMORY = "a triage dump holds no physical memory: no other view of processes to compare with"


class TriageWindows:
    """The Windows kernel facts of a triage dump (``Windows.from_memory`` returns one for them)."""

    os_name = "windows"

    def __init__(self, kernel: KernelInfo, symbols: WindowsSymbols, profile: Profile | None, image) -> None:
        self.kernel = kernel
        self.symbols = symbols
        self.profile = profile
        self.profile_error: str | None = None
        self.triage = image.triage
        self.bits = image.metadata["bits"]
        self.memory = None

    @classmethod
    def from_image(cls, image, symbols_file: str | None = None) -> TriageWindows:
        """The facts of triage dump ``image``.

        Raises:
            SymbolError: ``symbols_file`` is given but is not a Windows profile.
        """
        t, meta = image.triage, image.metadata
        bits = meta["bits"]
        steps = Steps()
        build = image.header.minor
        steps.add("build", build, "crash dump header MinorVersion")
        steps.add("DTB", meta["directory_table_base"], "crash dump header DirectoryTableBase")
        fields: dict[str, int] = {}
        if t.kdbg is not None:
            try:
                block = kdbg_mod.parse(t.kdbg.ljust(kdbg_mod.MIN_SIZE, b"\0"), vaddr=meta["kd_debugger_data_block"],
                                       paddr=None, bits=bits)  # padded: a cut copy reads as zero fields
                fields = {k: v for k, v in block.fields.items() if v}
                steps.add("KDBG", meta["kd_debugger_data_block"], "triage dump's copy of the KDBG block")
            except GuestDataError as exc:
                steps.add("KDBG", None, f"the triage dump's KDBG copy is not one: {exc}")
        nt = t.drivers[0] if t.drivers else None
        base = fields.get("KernBase") or (nt.base if nt is not None else 0)
        steps.add("kernel base", base, "KDBG KernBase" if "KernBase" in fields else "first entry of the driver list")
        for name in ("PsActiveProcessHead", "PsLoadedModuleList"):
            if name in fields:
                steps.add(name, fields[name], "KDBG copy (the list itself is not in a triage dump)")
        profile, why = None, None
        try:
            profile = load_profile(symbols_file, bits) if symbols_file is not None else builtin(build, bits)
            steps.add("profile", profile.name, profile.source)
        except SymbolError as exc:  # an unknown build: the drivers still list, the process says why not
            if symbols_file is not None:
                raise
            why = str(exc)
            steps.add("profile", None, why)
        kernel = KernelInfo(base=base, paddr=None, size=nt.size if nt is not None else 0, name="ntoskrnl.exe",
                            build=build, dtb=meta["directory_table_base"], kdbg=meta["kd_debugger_data_block"],
                            found=tuple(steps), bits=bits)
        win = cls(kernel, WindowsSymbols({}, fields), profile, image)
        win.profile_error = why
        return win

    def ksym2v(self, name: str) -> int:
        """Virtual address of a KDBG field (the only symbols a triage dump holds)."""
        return self.symbols[name]

    def tasks(self) -> Listing:
        """The copied EPROCESS (when the dump has one and its build's offsets are known)."""
        skipped = [ONLY_CURRENT]
        found = []
        if self.triage.process is None:
            skipped.append("this triage dump has no EPROCESS copy")
        elif self.profile is None:
            skipped.append(f"the EPROCESS copy is not decoded: {self.profile_error}")
        else:
            o = self.profile.eprocess
            raw = self.triage.process.ljust(max(v for v in o.values() if v is not None) + 16, b"\0")
            found.append(_process(raw, None, o, self.profile.bits))
        return Listing(found, skipped)

    def modules(self) -> Listing:
        """The dump's driver list (``address`` None: the KLDR entries themselves are not saved)."""
        skipped = [ONLY_LISTED]
        if self.triage.overflowed:
            skipped.append("the dump's driver list was cut short when it was written (TriageOptions)")
        return Listing([Driver(d.name, d.base, d.size, d.path, None) for d in self.triage.drivers], skipped)

    def syscalls(self):
        raise UnsupportedOperation("a triage dump holds no kernel image: the service table (SSDT) is not in it")

    def idt_bases(self, registers=()):
        raise UnsupportedOperation(NO_IDT)

    def idt(self, registers=None):
        raise UnsupportedOperation(NO_IDT)

    def scan_processes(self):
        raise UnsupportedOperation(NO_MEMORY)

    def hidden_processes(self, *, pool: bool = True):
        raise UnsupportedOperation(NO_MEMORY)

    def in_kernel(self, address: int) -> bool:
        return self.kernel.base <= address < self.kernel.base + self.kernel.size
