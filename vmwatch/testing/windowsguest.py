"""WindowsGuest: a Windows x64 test guest built around a real ntoskrnl.exe PE file.

The real image (Wine's PE32+ ntoskrnl, with its real export table) is laid out section by
section at a kernel virtual address in 4-level page tables the builder writes; a KDBG block
(plain or encoded the way KdEncodeDataBlock does it), EPROCESS and KLDR_DATA_TABLE_ENTRY
lists and an SSDT are written at the offsets of a published build's profile. What was written
is kept (``processes``, ``drivers``, ``services``) as the truth tests check against.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.cpu import Registers
from vmwatch.cpu import PagingMode
from vmwatch.os.windows import kdbg as kdbg_mod
from vmwatch.os.windows.profiles import BUILTIN
from vmwatch.testing.fakeguest import FakeGuest

KERNEL_VA = 0xFFFFF80002A00000
KERNEL_PA = 0x2000000
POOL_VA = 0xFFFFFA8000000000
POOL_PA = 0x1000000
SPARE_RVA = 0x58400
"""Free bytes in the page of Wine's small .rsrc section: the KDBG block and list heads go here."""
KDBG_RVA, KEYS_RVA, HEADS_RVA, SSDT_RVA = SPARE_RVA, SPARE_RVA + 0x400, SPARE_RVA + 0x500, SPARE_RVA + 0x600
PRCBS_RVA = SPARE_RVA + 0x700
"""KiProcessorBlock: the KPRCB pointer of each processor, then a null."""
THREAD_APC_PROCESS, PRCB_CURRENT_THREAD = 0x70, 0x8
"""KTHREAD.ApcState.Process and KPRCB.CurrentThread on Windows 7 SP1 x64 (ApcState 0x50 + 0x20)."""
EPROCESS_IN_BLOCK = 0x80
"""_POOL_HEADER 0x10, optional headers 0x40, _OBJECT_HEADER 0x30, then the EPROCESS body."""
FAKE_DRIVER = ("fakedrv.sys", KERNEL_VA + 0x1000000, 0x7000, "\\??\\C:\\evil\\fakedrv.sys")
KEYS = (0x1F2E3D4C5B6A7988, 0x0123456789ABCDEF)
"""KiWaitNever, KiWaitAlways of the encoded variant."""


@attrs.frozen
class Proc:
    pid: int
    ppid: int
    name: bytes
    dtb: int
    create_time: int
    peb: int
    address: int = 0


def load_pe(data: bytes) -> tuple[bytearray, int]:
    """The image as the loader maps it (sections at their RVAs); returns (image, SizeOfImage)."""
    lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    n_sections, opt_size = struct.unpack_from("<H", data, lfanew + 6)[0], struct.unpack_from("<H", data, lfanew + 0x14)[0]
    size_of_image, size_of_headers = struct.unpack_from("<II", data, lfanew + 0x18 + 56)
    image = bytearray(size_of_image)
    image[:size_of_headers] = data[:size_of_headers]
    for i in range(n_sections):
        _name, vsize, rva, raw_size, raw_ptr = struct.unpack_from("<8sIIII", data, lfanew + 0x18 + opt_size + 40 * i)
        n = min(vsize, raw_size)
        image[rva:rva + n] = data[raw_ptr:raw_ptr + n]
    return image, size_of_image


class WindowsGuest:
    """Physical memory of a Windows x64 guest with a real ntoskrnl.

    Args:
        ntoskrnl: the bytes of a PE32+ ntoskrnl.exe.
        build: NtBuildNumber to write (its built-in profile gives the offsets).
        encoded: encode the KDBG block as Windows 8+ does.
        hal: optionally the bytes of hal.dll, mapped after the kernel.
        memory_size: bytes of physical memory.
    """

    def __init__(self, ntoskrnl: bytes, *, build: int = 7601, encoded: bool = False, hal: bytes | None = None,
                 memory_size: int = 64 << 20, seed: int = 0) -> None:
        from vmwatch.os.windows import pe

        self.fake = FakeGuest(PagingMode.LEVEL4, seed=seed, memory_size=memory_size, writable=True)
        self.buffer = self.fake.buffer
        self.profile = BUILTIN[build]
        self.build = build
        self.encoded = encoded
        image, self.kernel_size = load_pe(ntoskrnl)
        self.exports = pe.read_exports(lambda a, n: bytes(image[a:a + n]), pe.parse_headers(lambda a, n: bytes(image[a:a + n]), 0)).rvas
        self.buffer[KERNEL_PA:KERNEL_PA + len(image)] = image
        self.map_range(KERNEL_VA, KERNEL_PA, self.kernel_size)
        self._pool_next = 0
        self.put_u32(self.ksym("NtBuildNumber"), 0xF0000000 | build)
        self.processes: list[Proc] = []
        self.drivers: list[tuple[str, int, int, str]] = [("ntoskrnl.exe", KERNEL_VA, self.kernel_size,
                                                          "\\SystemRoot\\system32\\ntoskrnl.exe")]
        if hal is not None:
            hal_image, hal_size = load_pe(hal)
            hal_va, hal_pa = KERNEL_VA + 0x400000, KERNEL_PA + 0x400000
            self.buffer[hal_pa:hal_pa + len(hal_image)] = hal_image
            self.map_range(hal_va, hal_pa, hal_size)
            self.drivers.append(("hal.dll", hal_va, hal_size, "\\SystemRoot\\system32\\hal.dll"))
        self.idtr_base = self.pool(0x1000)
        self.idt_handler = KERNEL_VA + 0x1000 + 0x1234
        self.set_gate(0, self.idt_handler)
        self.services: list[int] = []

    # -- memory -------------------------------------------------------------------------------

    def map_range(self, vaddr: int, paddr: int, size: int) -> None:
        for off in range(0, (size + 0xFFF) & ~0xFFF, 0x1000):
            self.fake.map(vaddr + off, paddr + off, 0x1000)

    def pool(self, size: int) -> int:
        """A zeroed, mapped kernel-pool allocation; returns its virtual address."""
        size = (size + 0xFFF) & ~0xFFF
        va, pa = POOL_VA + self._pool_next, POOL_PA + self._pool_next
        self._pool_next += size
        self.buffer[pa:pa + size] = bytes(size)
        self.map_range(va, pa, size)
        return va

    def paddr(self, vaddr: int) -> int:
        if KERNEL_VA <= vaddr < KERNEL_VA + 0x800000:
            return KERNEL_PA + vaddr - KERNEL_VA
        if POOL_VA <= vaddr < POOL_VA + self._pool_next:
            return POOL_PA + vaddr - POOL_VA
        raise ValueError(f"{vaddr:#x} is not mapped by this builder")

    def put(self, vaddr: int, data: bytes) -> None:
        pa = self.paddr(vaddr)
        self.buffer[pa:pa + len(data)] = data

    def put_u64(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<Q", value & ((1 << 64) - 1)))

    def put_u32(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<I", value))

    def ksym(self, name: str) -> int:
        return KERNEL_VA + self.exports[name]

    def set_gate(self, vector: int, handler: int) -> None:
        gate = struct.pack("<HHBBHIi", handler & 0xFFFF, 0x10, 0, 0x8E, handler >> 16 & 0xFFFF, handler >> 32, 0)
        self.put(self.idtr_base + 16 * vector, gate)

    # -- kernel objects -----------------------------------------------------------------------

    @property
    def process_head(self) -> int:
        return KERNEL_VA + HEADS_RVA

    @property
    def module_head(self) -> int:
        return KERNEL_VA + HEADS_RVA + 0x10

    @property
    def kdbg_vaddr(self) -> int:
        return KERNEL_VA + KDBG_RVA

    def add_process(self, pid: int, ppid: int, name: bytes, *, dtb: int | None = None) -> Proc:
        """An EPROCESS in its pool block: _POOL_HEADER (tag ``Proc``, or ``Pro\\xe3`` with the
        protected bit Windows 7 sets), optional and object headers, then the body (Type 3)."""
        o = self.profile.eprocess
        block = self.pool(0x1000)
        tag = b"Pro\xe3" if self.build == 7601 else b"Proc"
        self.put(block, struct.pack("<BBBB4sQ", 0, 2, 0x100 // 16, 0, tag, 0))
        address = block + EPROCESS_IN_BLOCK
        self.put(address, b"\x03")  # _DISPATCHER_HEADER.Type: ProcessObject
        dtb = self.fake.cr3 if dtb is None else dtb
        proc = Proc(pid, ppid, name, dtb, 132_000_000_000_000_000 + pid, 0x7FF000000000 + pid * 0x1000 if pid > 4 else 0,
                    address)
        self.put_u64(address + o["DirectoryTableBase"], dtb)
        self.put_u64(address + o["UniqueProcessId"], pid)
        self.put_u64(address + o["InheritedFromUniqueProcessId"], ppid)
        self.put(address + o["ImageFileName"], name[:15].ljust(15, b"\0"))
        self.put_u64(address + o["CreateTime"], proc.create_time)
        self.put_u64(address + o["Peb"], proc.peb)
        self.processes.append(proc)
        return proc

    def link(self, head: int, nodes: list[int]) -> None:
        """A circular LIST_ENTRY list: head -> nodes... -> head (Flink and Blink)."""
        chain = [head, *nodes, head]
        for prev, node, nxt in zip(chain, chain[1:], chain[2:]):
            self.put_u64(node, nxt)
            self.put_u64(node + 8, prev)
        self.put_u64(head, chain[1])
        self.put_u64(head + 8, chain[-2])

    def unicode_string(self, at: int, text: str) -> None:
        raw = text.encode("utf-16-le")
        buffer = self.pool(len(raw) + 2)
        self.put(buffer, raw)
        self.put(at, struct.pack("<HHIQ", len(raw), len(raw) + 2, 0, buffer))

    def build_objects(self, processes=((4, 0, b"System"), (256, 4, b"smss.exe"), (348, 256, b"csrss.exe"),
                                       (1236, 348, b"explorer.exe")), *, clean: bool = False) -> None:
        """Processes, drivers, SSDT, KDBG: the default guest, with a driver loaded from outside the
        system directories and an SSDT entry hooked into it; ``clean``: neither."""
        if not clean:
            self.drivers.append(FAKE_DRIVER)
        for pid, ppid, name in processes:
            self.add_process(pid, ppid, name, dtb=None if pid == 4 else 0x3000000 + pid * 0x1000)
        links = self.profile.eprocess["ActiveProcessLinks"]
        self.link(self.process_head, [p.address + links for p in self.processes])
        self.put_u64(self.ksym("PsInitialSystemProcess"), self.processes[0].address)
        entries = []
        for name, base, size, path in self.drivers:
            entry = self.pool(0x100)
            self.put_u64(entry + 0x30, base)
            self.put_u32(entry + 0x40, size)
            self.unicode_string(entry + 0x48, path)
            self.unicode_string(entry + 0x58, name)
            entries.append(entry)
        self.link(self.module_head, entries)
        self.write_ssdt(["NtClose", "NtCreateFile", "KeBugCheckEx"], hooked=None if clean else KERNEL_VA + 0x1001230)
        self.kpcr = self.pool(0x1000)
        """Processor 0's KPCR: Self, CurrentPrcb (its embedded KPRCB at 0x180) and IdtBase, as x64 lays it out."""
        self.put(self.kpcr + 0x18, struct.pack("<QQ", self.kpcr, self.kpcr + 0x180))
        self.put_u64(self.kpcr + 0x38, self.idtr_base)
        self.put(KERNEL_VA + PRCBS_RVA, struct.pack("<QQ", self.kpcr + 0x180, 0))
        self.run_on_cpu(self.processes[0].pid)
        self.write_kdbg()

    def run_on_cpu(self, pid: int) -> int:
        """Make a thread of process ``pid`` processor 0's current thread (KPRCB.CurrentThread,
        its KTHREAD.ApcState.Process at the offsets the KDBG block states); returns the ETHREAD."""
        proc = next(p for p in self.processes if p.pid == pid)
        thread = self.pool(0x1000)
        self.put_u64(thread + THREAD_APC_PROCESS, proc.address)
        self.put_u64(self.kpcr + 0x180 + PRCB_CURRENT_THREAD, thread)
        return thread

    def unlink(self, pid: int) -> Proc:
        """Take process ``pid`` off ActiveProcessLinks the way DKOM rootkits do (FU): its
        neighbours skip it and its own links point to itself; the EPROCESS stays in its pool block."""
        links = self.profile.eprocess["ActiveProcessLinks"]
        proc = next(p for p in self.processes if p.pid == pid)
        node = proc.address + links
        flink, blink = struct.unpack("<QQ", bytes(self.buffer[self.paddr(node):self.paddr(node) + 16]))
        self.put_u64(blink, flink)
        self.put_u64(flink + 8, blink)
        self.put_u64(node, node)
        self.put_u64(node + 8, node)
        return proc

    def write_ssdt(self, names: list[str], hooked: int | None = None) -> None:
        table = KERNEL_VA + SSDT_RVA
        targets = [self.ksym(n) for n in names] + ([hooked] if hooked is not None else [])
        for i, target in enumerate(targets):
            self.put(table + 4 * i, struct.pack("<i", (target - table) << 4 | 2))
        self.put(self.ksym("KeServiceDescriptorTable"), struct.pack("<QQI", table, 0, len(targets)))
        self.services = targets

    def write_kdbg(self, size: int = 0x340) -> None:
        """The KDBG block; its header says ``size`` (0x340 bytes are written whatever it says)."""
        raw = bytearray(0x340)
        raw[0x10:0x18] = kdbg_mod.TAG + struct.pack("<I", size)
        struct.pack_into("<Q", raw, 0x18, KERNEL_VA)
        struct.pack_into("<Q", raw, 0x48, self.module_head)
        struct.pack_into("<Q", raw, 0x50, self.process_head)
        struct.pack_into("<Q", raw, 0x218, KERNEL_VA + PRCBS_RVA)
        struct.pack_into("<H", raw, 0x2A0, THREAD_APC_PROCESS)   # OffsetKThreadApcProcess
        struct.pack_into("<H", raw, 0x2B4, PRCB_CURRENT_THREAD)  # OffsetPrcbCurrentThread
        struct.pack_into("<H", raw, 0x2E6, 0x180)                # OffsetPcrContainedPrcb
        if self.encoded:
            never, always = KEYS
            self.put_u64(KERNEL_VA + KEYS_RVA, never)
            self.put_u64(KERNEL_VA + KEYS_RVA + 8, always)
            self.put(KERNEL_VA + KEYS_RVA + 0x10, b"\x01")
            raw = bytearray(kdbg_mod.encode(bytes(raw), never, always, KERNEL_VA + KEYS_RVA + 0x10))
        self.put(self.kdbg_vaddr, bytes(raw))

    def isf(self) -> dict:
        """A Volatility 3 style Windows ISF for this guest: _EPROCESS types and the KDBG keys."""
        o = self.profile.eprocess
        fields = {k: {"offset": v, "type": {"kind": "base", "name": "unsigned long long"}}
                  for k, v in o.items() if k != "DirectoryTableBase"}
        fields["Pcb"] = {"offset": 0, "type": {"kind": "struct", "name": "_KPROCESS"}}
        return {"metadata": {"format": "6.2.0", "windows": {"pdb": {"GUID": "test", "age": 1,
                                                                    "database": "ntkrnlmp.pdb"}}},
                "base_types": {}, "enums": {},
                "user_types": {"_EPROCESS": {"kind": "struct", "size": 0x800, "fields": fields},
                               "_KPROCESS": {"kind": "struct", "size": 0x100, "fields": {
                                   "DirectoryTableBase": {"offset": o["DirectoryTableBase"],
                                                          "type": {"kind": "base", "name": "unsigned long long"}}}}},
                "symbols": {"KiWaitNever": {"address": KEYS_RVA}, "KiWaitAlways": {"address": KEYS_RVA + 8},
                            "KdpDataBlockEncoded": {"address": KEYS_RVA + 0x10},
                            "KdDebuggerDataBlock": {"address": KDBG_RVA}}}

    @property
    def registers(self) -> Registers:
        return attrs.evolve(self.fake.registers, idtr_base=self.idtr_base, idtr_limit=0xFFF)

    def raw(self) -> bytes:
        return bytes(self.buffer)

    BUGCHECK = (0xE2, (0x11, 0x22, 0x33, 0x44))
    """MANUALLY_INITIATED_CRASH; its parameters (zero on Windows) distinct so tests see each in place."""

    def crashdump(self, *, kdbg: bool = True, lists: bool = True) -> bytes:
        """A full 64-bit crash dump of this memory: build, DirectoryTableBase, processors, bugcheck,
        KdDebuggerDataBlock and the list heads (``kdbg``/``lists`` False leave the PAGE filler)."""
        from vmwatch.testing.imagebuilders import windows_crashdump

        out = bytearray(windows_crashdump([(0, bytes(self.buffer))], dtb=self.fake.cr3))
        struct.pack_into("<II", out, 0x8, 15, self.build)
        struct.pack_into("<III", out, 0x30, 0x8664, 1, self.BUGCHECK[0])
        struct.pack_into("<4Q", out, 0x40, *self.BUGCHECK[1])
        if kdbg:
            struct.pack_into("<Q", out, 0x80, self.kdbg_vaddr)
        if lists:
            struct.pack_into("<QQ", out, 0x20, self.module_head, self.process_head)
        return bytes(out)

    def triage_dump(self, pid: int | None = None, **options) -> bytes:
        """A triage (DumpType 4) dump of this guest: its driver list (saved names are the paths),
        the EPROCESS of ``pid`` (default: the last process) as the current process's copy, and
        the KDBG block; ``options`` go to ``imagebuilders.windows_triage_dump``."""
        from vmwatch.testing.imagebuilders import windows_triage_dump

        proc = next(p for p in self.processes if p.pid == pid) if pid is not None else self.processes[-1]
        pa = self.paddr(proc.address)
        kd = self.paddr(self.kdbg_vaddr)
        options.setdefault("drivers", [(path, base, size) for _name, base, size, path in self.drivers])
        return windows_triage_dump(build=self.build, dtb=self.fake.cr3, kdbg_vaddr=self.kdbg_vaddr,
                                   process=bytes(self.buffer[pa:pa + 0xA00]), kdbg=bytes(self.buffer[kd:kd + 0x340]),
                                   **options)

    def write_raw(self, path, size: int, at: int, *, sparse: bool = True) -> int:
        """Write this guest as a raw image of ``size`` bytes with its memory moved up to physical
        ``at`` (page aligned): every physical address it holds (page-table entries, the EPROCESS
        DirectoryTableBases) is moved with it; the bytes below ``at`` are zeros, a hole when
        ``sparse``. Returns the moved CR3 (kernel base, KDBG and lists keep their virtual addresses)."""
        buf = bytearray(self.buffer)
        mask = 0x000FFFFFFFFFF000

        def move(table: int, level: int) -> None:
            for ea in range(table, table + 0x1000, 8):
                entry = int.from_bytes(buf[ea:ea + 8], "little")
                if not entry & 1:
                    continue
                buf[ea:ea + 8] = (entry + at).to_bytes(8, "little")
                if level > 1 and not entry & 0x80:
                    move(entry & mask, level - 1)

        move(self.fake.cr3, 4)
        dtb = self.profile.eprocess["DirectoryTableBase"]
        for proc in self.processes:
            pa = self.paddr(proc.address) + dtb
            buf[pa:pa + 8] = (proc.dtb + at).to_bytes(8, "little")
        with open(path, "wb") as f:
            f.truncate(size)
            if not sparse:
                zeros = bytes(64 << 20)
                for start in range(0, at, len(zeros)):
                    f.write(zeros[:min(len(zeros), at - start)])
            f.seek(at)
            f.write(buf)
        return self.fake.cr3 + at
