"""WindowsGuest: a Windows x64 or x86 test guest built around a real ntoskrnl.exe PE file.

The real image (Wine's PE32+ or PE32 ntoskrnl, with its real export table) is laid out section
by section at a kernel virtual address in page tables the builder writes (4-level for x64; PAE
or plain 32-bit paging for x86); a KDBG block (plain, or encoded the way KdEncodeDataBlock does
it on x64; on x86 its 64-bit fields hold sign-extended 32-bit pointers), EPROCESS and
KLDR_DATA_TABLE_ENTRY lists and an SSDT are written at the offsets of a published build's
profile. What was written is kept (``processes``, ``drivers``, ``services``) as the truth tests
check against.
"""

from __future__ import annotations

import struct

import attrs

from vmwatch.cpu import Registers
from vmwatch.cpu import PagingMode
from vmwatch.os.windows import kdbg as kdbg_mod
from vmwatch.os.windows.processors import KPCR_X86, PRCB_IN_PCR
from vmwatch.os.windows.profiles import BUILTIN, BUILTIN_X86, Profile
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
class Arch:
    """Where a test guest of one architecture puts things, and the layouts it writes them in."""

    bits: int
    kernel_va: int
    pool_va: int
    spare_rva: int
    """Free bytes in ntoskrnl's image (the page of Wine's small .rsrc section)."""
    profiles: dict[int, Profile]
    kpcr: tuple[int, int, int, int]
    """KPCR: embedded KPRCB, Self, CurrentPrcb, IdtBase."""
    thread_apc_process: int
    prcb_current_thread: int
    eprocess_in_block: int
    machine: int


X64 = Arch(64, KERNEL_VA, POOL_VA, SPARE_RVA, BUILTIN, (PRCB_IN_PCR, 0x18, 0x20, 0x38), THREAD_APC_PROCESS,
           PRCB_CURRENT_THREAD, EPROCESS_IN_BLOCK, 0x8664)
X86 = Arch(32, 0x82A00000, 0x85000000, 0x57400, BUILTIN_X86, KPCR_X86, 0x50, 0x4, 0x30, 0x14C)
"""Windows 7 SP1 x86: ntoskrnl near 0x82a00000 and nonpaged pool above it as the real one lays
them out; KTHREAD.ApcState (0x40) .Process (+0x10) and KPRCB.CurrentThread 0x4 from the public
PDB (ntdiff Win7_SP1/x86 _KTHREAD.h, _KPCR.h); _POOL_HEADER 8, optional headers 0x10 and
_OBJECT_HEADER 0x18 bytes before the EPROCESS body."""


def sign_extend(value: int) -> int:
    """A 32-bit pointer as an x86 KDBG field holds it."""
    return value | 0xFFFFFFFF00000000 if value & 0x80000000 else value


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
    """Physical memory of a Windows guest with a real ntoskrnl.

    Args:
        ntoskrnl: the bytes of a PE32+ (x64) or PE32 (x86) ntoskrnl.exe; its Magic picks the layouts.
        build: NtBuildNumber to write (its built-in profile gives the offsets).
        encoded: encode the KDBG block as Windows 8+ x64 does.
        hal: optionally the bytes of hal.dll, mapped after the kernel.
        memory_size: bytes of physical memory.
        pae: for an x86 kernel, PAE paging (else plain 32-bit paging with 4 KiB pages).
    """

    def __init__(self, ntoskrnl: bytes, *, build: int = 7601, encoded: bool = False, hal: bytes | None = None,
                 memory_size: int = 64 << 20, seed: int = 0, pae: bool = True) -> None:
        from vmwatch.os.windows import pe

        image, self.kernel_size = load_pe(ntoskrnl)
        headers = pe.parse_headers(lambda a, n: bytes(image[a:a + n]), 0)
        self.arch = X64 if headers.bits == 64 else X86
        if encoded and self.arch.bits == 32:
            raise ValueError("only x64 Windows encodes its KDBG block")
        mode = PagingMode.LEVEL4 if self.arch.bits == 64 else PagingMode.PAE if pae else PagingMode.BITS32
        self.fake = FakeGuest(mode, seed=seed, memory_size=memory_size, writable=True)
        self.buffer = self.fake.buffer
        self.profile = self.arch.profiles[build]
        self.build = build
        self.encoded = encoded
        self.kernel_va = self.arch.kernel_va
        self.ptr_size = self.arch.bits // 8
        self.exports = pe.read_exports(lambda a, n: bytes(image[a:a + n]), headers).rvas
        self.buffer[KERNEL_PA:KERNEL_PA + len(image)] = image
        self.map_range(self.kernel_va, KERNEL_PA, self.kernel_size)
        self._pool_next = 0
        self.put_u32(self.ksym("NtBuildNumber"), 0xF0000000 | build)
        self.processes: list[Proc] = []
        self.drivers: list[tuple[str, int, int, str]] = [("ntoskrnl.exe", self.kernel_va, self.kernel_size,
                                                          "\\SystemRoot\\system32\\ntoskrnl.exe")]
        if hal is not None:
            hal_image, hal_size = load_pe(hal)
            hal_va, hal_pa = self.kernel_va + 0x400000, KERNEL_PA + 0x400000
            self.buffer[hal_pa:hal_pa + len(hal_image)] = hal_image
            self.map_range(hal_va, hal_pa, hal_size)
            self.drivers.append(("hal.dll", hal_va, hal_size, "\\SystemRoot\\system32\\hal.dll"))
        self.idtr_base = self.pool(0x1000)
        self.idt_handler = self.kernel_va + 0x1000 + 0x1234
        self.set_gate(0, self.idt_handler)
        self.services: list[int] = []

    # -- memory -------------------------------------------------------------------------------

    def map_range(self, vaddr: int, paddr: int, size: int) -> None:
        for off in range(0, (size + 0xFFF) & ~0xFFF, 0x1000):
            self.fake.map(vaddr + off, paddr + off, 0x1000)

    def pool(self, size: int) -> int:
        """A zeroed, mapped kernel-pool allocation; returns its virtual address."""
        size = (size + 0xFFF) & ~0xFFF
        va, pa = self.arch.pool_va + self._pool_next, POOL_PA + self._pool_next
        self._pool_next += size
        self.buffer[pa:pa + size] = bytes(size)
        self.map_range(va, pa, size)
        return va

    def paddr(self, vaddr: int) -> int:
        if self.kernel_va <= vaddr < self.kernel_va + 0x800000:
            return KERNEL_PA + vaddr - self.kernel_va
        if self.arch.pool_va <= vaddr < self.arch.pool_va + self._pool_next:
            return POOL_PA + vaddr - self.arch.pool_va
        raise ValueError(f"{vaddr:#x} is not mapped by this builder")

    def put(self, vaddr: int, data: bytes) -> None:
        pa = self.paddr(vaddr)
        self.buffer[pa:pa + len(data)] = data

    def put_u64(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<Q", value & ((1 << 64) - 1)))

    def put_u32(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<I", value))

    def put_ptr(self, vaddr: int, value: int) -> None:
        """A pointer-sized value: 8 bytes on x64, 4 on x86."""
        (self.put_u64 if self.ptr_size == 8 else self.put_u32)(vaddr, value & ((1 << 8 * self.ptr_size) - 1))

    def ptr_at(self, vaddr: int) -> int:
        pa = self.paddr(vaddr)
        return int.from_bytes(self.buffer[pa:pa + self.ptr_size], "little")

    def ksym(self, name: str) -> int:
        return self.kernel_va + self.exports[name]

    def rva(self, offset: int) -> int:
        """The virtual address of the spare bytes at ``offset`` (KDBG_RVA... relative to x64's spare RVA)."""
        return self.kernel_va + offset - SPARE_RVA + self.arch.spare_rva

    def set_gate(self, vector: int, handler: int) -> None:
        """An interrupt gate (present, DPL 0, selector 0x10 x64 / 0x8 x86): 16 bytes on x64, 8 on x86."""
        if self.ptr_size == 8:
            gate = struct.pack("<HHBBHIi", handler & 0xFFFF, 0x10, 0, 0x8E, handler >> 16 & 0xFFFF, handler >> 32, 0)
        else:
            gate = struct.pack("<HHBBH", handler & 0xFFFF, 0x8, 0, 0x8E, handler >> 16)
        self.put(self.idtr_base + len(gate) * vector, gate)

    # -- kernel objects -----------------------------------------------------------------------

    @property
    def process_head(self) -> int:
        return self.rva(HEADS_RVA)

    @property
    def module_head(self) -> int:
        return self.rva(HEADS_RVA) + 0x10

    @property
    def kdbg_vaddr(self) -> int:
        return self.rva(KDBG_RVA)

    @property
    def processor_block(self) -> int:
        """KiProcessorBlock's address."""
        return self.rva(PRCBS_RVA)

    def add_process(self, pid: int, ppid: int, name: bytes, *, dtb: int | None = None) -> Proc:
        """An EPROCESS in its pool block: _POOL_HEADER (tag ``Proc``, or ``Pro\\xe3`` with the
        protected bit Windows 7 sets), optional and object headers, then the body (Type 3)."""
        o = self.profile.eprocess
        block = self.pool(0x1000)
        tag = b"Pro\xe3" if self.build == 7601 else b"Proc"
        header = struct.pack("<BBBB4sQ", 0, 2, 0x100 // 16, 0, tag, 0) if self.ptr_size == 8 else \
            struct.pack("<HH4s", 0, 0x100 // 8 | 1 << 9, tag)  # x86: BlockSize in 8-byte units, NonPagedPool
        self.put(block, header)
        address = block + self.arch.eprocess_in_block
        self.put(address, b"\x03")  # _DISPATCHER_HEADER.Type: ProcessObject
        dtb = self.fake.cr3 if dtb is None else dtb
        peb = (0x7FF000000000 if self.ptr_size == 8 else 0x7FF00000) + pid * 0x1000 if pid > 4 else 0
        proc = Proc(pid, ppid, name, dtb, 132_000_000_000_000_000 + pid, peb, address)
        self.put_ptr(address + o["DirectoryTableBase"], dtb)  # a ULONG on x86, ULONGLONG on x64
        self.put_ptr(address + o["UniqueProcessId"], pid)
        self.put_ptr(address + o["InheritedFromUniqueProcessId"], ppid)
        self.put(address + o["ImageFileName"], name[:15].ljust(15, b"\0"))
        self.put_u64(address + o["CreateTime"], proc.create_time)
        self.put_ptr(address + o["Peb"], proc.peb)
        self.processes.append(proc)
        return proc

    def link(self, head: int, nodes: list[int]) -> None:
        """A circular LIST_ENTRY list: head -> nodes... -> head (Flink and Blink)."""
        chain = [head, *nodes, head]
        size = self.ptr_size
        for prev, node, nxt in zip(chain, chain[1:], chain[2:]):
            self.put_ptr(node, nxt)
            self.put_ptr(node + size, prev)
        self.put_ptr(head, chain[1])
        self.put_ptr(head + size, chain[-2])

    def unicode_string(self, at: int, text: str) -> None:
        raw = text.encode("utf-16-le")
        buffer = self.pool(len(raw) + 2)
        self.put(buffer, raw)
        layout = "<HHIQ" if self.ptr_size == 8 else "<HHI"
        self.put(at, struct.pack(layout, len(raw), len(raw) + 2, *((0, buffer) if self.ptr_size == 8 else (buffer,))))

    def build_objects(self, processes=((4, 0, b"System"), (256, 4, b"smss.exe"), (348, 256, b"csrss.exe"),
                                       (1236, 348, b"explorer.exe")), *, clean: bool = False) -> None:
        """Processes, drivers, SSDT, KDBG: the default guest, with a driver loaded from outside the
        system directories and an SSDT entry hooked into it; ``clean``: neither."""
        if not clean:
            self.drivers.append(self.fake_driver)
        for pid, ppid, name in processes:
            self.add_process(pid, ppid, name, dtb=None if pid == 4 else 0x3000000 + pid * 0x1000)
        links = self.profile.eprocess["ActiveProcessLinks"]
        self.link(self.process_head, [p.address + links for p in self.processes])
        self.put_ptr(self.ksym("PsInitialSystemProcess"), self.processes[0].address)
        self.link(self.module_head, [self.add_driver_entry(*driver) for driver in self.drivers])
        self.write_ssdt(["NtClose", "NtCreateFile", "KeBugCheckEx"],
                        hooked=None if clean else self.kernel_va + 0x1001230)
        self.kpcr = self.pool(0x1000)
        """Processor 0's KPCR: Self, CurrentPrcb (its embedded KPRCB) and IdtBase, as the arch lays it out."""
        in_pcr, self_at, prcb_at, idt_at = self.arch.kpcr
        self.put_ptr(self.kpcr + self_at, self.kpcr)
        self.put_ptr(self.kpcr + prcb_at, self.kpcr + in_pcr)
        self.put_ptr(self.kpcr + idt_at, self.idtr_base)
        self.put_ptr(self.processor_block, self.kpcr + in_pcr)
        self.put_ptr(self.processor_block + self.ptr_size, 0)
        self.run_on_cpu(self.processes[0].pid)
        self.write_kdbg()

    @property
    def fake_driver(self) -> tuple[str, int, int, str]:
        """The driver loaded from outside the system directories (FAKE_DRIVER, at this arch's addresses)."""
        name, base, size, path = FAKE_DRIVER
        return name, base - KERNEL_VA + self.kernel_va, size, path

    def add_driver_entry(self, name: str, base: int, size: int, path: str) -> int:
        """A KLDR_DATA_TABLE_ENTRY at the profile's offsets (not linked); returns its address."""
        o = self.profile.ldr
        entry = self.pool(0x100)
        self.put_ptr(entry + o["DllBase"], base)
        self.put_u32(entry + o["SizeOfImage"], size)
        self.unicode_string(entry + o["FullDllName"], path)
        self.unicode_string(entry + o["BaseDllName"], name)
        return entry

    def run_on_cpu(self, pid: int) -> int:
        """Make a thread of process ``pid`` processor 0's current thread (KPRCB.CurrentThread,
        its KTHREAD.ApcState.Process at the offsets the KDBG block states); returns the ETHREAD."""
        proc = next(p for p in self.processes if p.pid == pid)
        thread = self.pool(0x1000)
        self.put_ptr(thread + self.arch.thread_apc_process, proc.address)
        self.put_ptr(self.kpcr + self.arch.kpcr[0] + self.arch.prcb_current_thread, thread)
        return thread

    def unlink(self, pid: int) -> Proc:
        """Take process ``pid`` off ActiveProcessLinks the way DKOM rootkits do (FU): its
        neighbours skip it and its own links point to itself; the EPROCESS stays in its pool block."""
        links = self.profile.eprocess["ActiveProcessLinks"]
        proc = next(p for p in self.processes if p.pid == pid)
        node = proc.address + links
        size = self.ptr_size
        flink, blink = self.ptr_at(node), self.ptr_at(node + size)
        self.put_ptr(blink, flink)
        self.put_ptr(flink + size, blink)
        self.put_ptr(node, node)
        self.put_ptr(node + size, node)
        return proc

    def write_ssdt(self, names: list[str], hooked: int | None = None) -> None:
        """KiServiceTable and KeServiceDescriptorTable: x64 entries are offsets from the table
        (<< 4, low bits the argument count); x86 entries are absolute addresses."""
        table = self.rva(SSDT_RVA)
        targets = [self.ksym(n) for n in names] + ([hooked] if hooked is not None else [])
        for i, target in enumerate(targets):
            entry = struct.pack("<i", (target - table) << 4 | 2) if self.ptr_size == 8 else struct.pack("<I", target)
            self.put(table + 4 * i, entry)
        descriptor = struct.pack("<QQI", table, 0, len(targets)) if self.ptr_size == 8 else \
            struct.pack("<III", table, 0, len(targets))
        self.put(self.ksym("KeServiceDescriptorTable"), descriptor)
        self.services = targets

    def write_kdbg(self, size: int = 0x340) -> None:
        """The KDBG block; its header says ``size`` (0x340 bytes are written whatever it says).
        On x86 its 64-bit pointer fields are sign-extended, as Windows writes them."""
        raw = bytearray(0x340)
        raw[0x10:0x18] = kdbg_mod.TAG + struct.pack("<I", size)
        wide = (lambda v: v) if self.ptr_size == 8 else sign_extend
        struct.pack_into("<Q", raw, 0x18, wide(self.kernel_va))
        struct.pack_into("<Q", raw, 0x48, wide(self.module_head))
        struct.pack_into("<Q", raw, 0x50, wide(self.process_head))
        struct.pack_into("<Q", raw, 0x218, wide(self.processor_block))
        struct.pack_into("<H", raw, 0x2A0, self.arch.thread_apc_process)   # OffsetKThreadApcProcess
        struct.pack_into("<H", raw, 0x2B4, self.arch.prcb_current_thread)  # OffsetPrcbCurrentThread
        struct.pack_into("<H", raw, 0x2E6, self.arch.kpcr[0])               # OffsetPcrContainedPrcb
        if self.encoded:
            never, always = KEYS
            keys = self.rva(KEYS_RVA)
            self.put_u64(keys, never)
            self.put_u64(keys + 8, always)
            self.put(keys + 0x10, b"\x01")
            raw = bytearray(kdbg_mod.encode(bytes(raw), never, always, keys + 0x10))
        self.put(self.kdbg_vaddr, bytes(raw))

    def isf(self) -> dict:
        """A Volatility 3 style Windows ISF for this guest: _EPROCESS types and the KDBG keys."""
        o = self.profile.eprocess
        spare = self.arch.spare_rva - SPARE_RVA
        fields = {k: {"offset": v, "type": {"kind": "base", "name": "unsigned long long"}}
                  for k, v in o.items() if k != "DirectoryTableBase"}
        fields["Pcb"] = {"offset": 0, "type": {"kind": "struct", "name": "_KPROCESS"}}
        return {"metadata": {"format": "6.2.0", "windows": {"pdb": {"GUID": "test", "age": 1,
                                                                    "database": "ntkrnlmp.pdb"}}},
                "base_types": {"pointer": {"kind": "int", "size": self.ptr_size, "signed": False,
                                           "endian": "little"}}, "enums": {},
                "user_types": {"_EPROCESS": {"kind": "struct", "size": 0x800, "fields": fields},
                               "_KPROCESS": {"kind": "struct", "size": 0x100, "fields": {
                                   "DirectoryTableBase": {"offset": o["DirectoryTableBase"],
                                                          "type": {"kind": "base", "name": "unsigned long long"}}}}},
                "symbols": {"KiWaitNever": {"address": spare + KEYS_RVA}, "KiWaitAlways": {"address": spare + KEYS_RVA + 8},
                            "KdpDataBlockEncoded": {"address": spare + KEYS_RVA + 0x10},
                            "KdDebuggerDataBlock": {"address": spare + KDBG_RVA}}}

    @property
    def registers(self) -> Registers:
        return attrs.evolve(self.fake.registers, idtr_base=self.idtr_base, idtr_limit=0xFFF)

    def raw(self) -> bytes:
        return bytes(self.buffer)

    BUGCHECK = (0xE2, (0x11, 0x22, 0x33, 0x44))
    """MANUALLY_INITIATED_CRASH; its parameters (zero on Windows) distinct so tests see each in place."""

    def crashdump(self, *, kdbg: bool = True, lists: bool = True, dump_type: int = 1) -> bytes:
        """A full (or ``dump_type`` 5/6 bitmap) crash dump of this memory, with the header of its
        arch (``PAGEDU64``, or ``PAGEDUMP`` with PaeEnabled): build, DirectoryTableBase,
        processors, bugcheck, KdDebuggerDataBlock and the list heads (``kdbg``/``lists`` False
        leave the PAGE filler)."""
        from vmwatch.testing.imagebuilders import windows_crashdump

        bits = self.arch.bits
        out = bytearray(windows_crashdump([(0, bytes(self.buffer))], bits=bits, dtb=self.fake.cr3,
                                          dump_type=dump_type))
        struct.pack_into("<II", out, 0x8, 15, self.build)
        if bits == 64:
            struct.pack_into("<III", out, 0x30, 0x8664, 1, self.BUGCHECK[0])
            struct.pack_into("<4Q", out, 0x40, *self.BUGCHECK[1])
        else:
            struct.pack_into("<III4I", out, 0x20, 0x14C, 1, self.BUGCHECK[0], *self.BUGCHECK[1])
            out[0x5C] = self.fake.mode is PagingMode.PAE
        kdbg_at, lists_at, word = (0x80, 0x20, "Q") if bits == 64 else (0x60, 0x18, "I")
        if kdbg:
            struct.pack_into("<" + word, out, kdbg_at, self.kdbg_vaddr)
        if lists:
            struct.pack_into("<" + 2 * word, out, lists_at, self.module_head, self.process_head)
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
        options.setdefault("bits", self.arch.bits)
        return windows_triage_dump(build=self.build, dtb=self.fake.cr3, kdbg_vaddr=self.kdbg_vaddr,
                                   process=bytes(self.buffer[pa:pa + 0xA00]), kdbg=bytes(self.buffer[kd:kd + 0x340]),
                                   **options)

    def write_raw(self, path, size: int, at: int, *, sparse: bool = True) -> int:
        """Write this guest as a raw image of ``size`` bytes with its memory moved up to physical
        ``at`` (page aligned): every physical address it holds (page-table entries, the EPROCESS
        DirectoryTableBases) is moved with it; the bytes below ``at`` are zeros, a hole when
        ``sparse``. Returns the moved CR3 (kernel base, KDBG and lists keep their virtual addresses)."""
        buf = bytearray(self.buffer)
        spec = self.fake.spec
        width = spec.entry_size

        def move(table: int, depth: int) -> None:
            level = spec.levels[depth]
            for ea in range(table, table + (width << level.bits), width):
                entry = int.from_bytes(buf[ea:ea + width], "little")
                if not entry & 1:
                    continue
                buf[ea:ea + width] = (entry + at).to_bytes(width, "little")
                if depth + 1 < len(spec.levels) and not (level.large and entry & 0x80):
                    move(entry & spec.addr_mask, depth + 1)

        move(self.fake.cr3, 0)
        dtb = self.profile.eprocess["DirectoryTableBase"]
        for proc in self.processes:
            pa = self.paddr(proc.address) + dtb
            buf[pa:pa + self.ptr_size] = (proc.dtb + at).to_bytes(self.ptr_size, "little")
        with open(path, "wb") as f:
            f.truncate(size)
            if not sparse:
                zeros = bytes(64 << 20)
                for start in range(0, at, len(zeros)):
                    f.write(zeros[:min(len(zeros), at - start)])
            f.seek(at)
            f.write(buf)
        return self.fake.cr3 + at
