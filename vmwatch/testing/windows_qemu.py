"""A real QEMU whose RAM is a Windows memory image: the Windows layer through the live backend.

No Windows is booted (there is no installation image here). ``qemu-system-x86_64 -S`` gets the
image as its ``memory-backend-file`` (share=on, as vmwatch's live backend expects) and the vCPU
state the image needs, each part by the one way QEMU 7.2 takes it:

* CR0, CR3, CR4 and EFER: gdbstub register writes (``P`` packets, vmwatch's own
  ``QemuVM.set_registers``; target/i386/gdbstub.c calls cpu_x86_update_cr0/3/4 and
  cpu_load_efer). While CS is not a 64-bit segment the stub takes 4 bytes of each, so the
  values must be below 4 GiB (the builders' are).
* IDTR and a halted vCPU: neither the gdbstub nor QMP/HMP writes them. QEMU's own migration
  stream carries both: a loader QEMU (the same command line) saves its state with
  ``x-ignore-shared`` (RAM stays in the file), the ``cpu`` section's ``halted`` and IDT fields
  are patched (:func:`patch_cpu_state`), and the QEMU vmwatch attaches to loads it
  (``-incoming defer``). The vCPU is halted with interrupts off (EFLAGS 0x2), so when a watch
  lets the guest run it executes no instruction: nothing can wake it and nothing touches RAM.

The guest keeps a second QMP monitor of its own (``monitor()``), so ``qmp_path`` stays free for
vmwatch, as the lab guest does.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import struct
import subprocess
import time
from pathlib import Path

from vmwatch.cpu import Registers
from vmwatch.errors import LabError
from vmwatch.lab.cache import new_runtime_dir
from vmwatch.lab.process import kill_qemu, launch
from vmwatch.live.qmp._sync import SyncQmp

EMULATOR = "qemu-system-x86_64"
START_TIMEOUT = 20.0
MAX_RAM = 3 << 30
"""A pc machine maps RAM past ~3 GiB above its PCI hole, where file offsets stop being
guest-physical addresses (the image opened as a file would be another memory)."""

_SEGMENT = struct.Struct(">IQII")
"""vmstate_segment: selector, base (target_ulong), limit, flags; migration streams are big-endian."""
_CRS = struct.Struct(">QQQQ")
"""env.cr[0], cr[2], cr[3], cr[4] as vmstate_x86_cpu saves them, one after the other."""
_SYSENTER = 4 + 8 + 8
"""sysenter_cs, sysenter_esp, sysenter_eip: between env.idt and env.cr[0]."""
_CR0_ET = 0x10
"""CR0.ET, which QEMU's cpu_x86_update_cr0 sets on every write."""
_RESET_TABLE = (0, 0, 0xFFFF, 0)
"""GDTR/IDTR of a reset x86 CPU (selector, base, limit, flags)."""


def _section(stream: bytes, name: bytes) -> int:
    """Offset of the first field of section ``name``, instance 0 (QEMU_VM_SECTION_FULL header:
    type 4, section id, name length and name, instance id, version id)."""
    marker = bytes([len(name)]) + name + bytes(4)
    at = stream.find(marker)
    if at < 5 or stream[at - 5] != 4 or stream.find(marker, at + 1) != -1:
        raise LabError(f"QEMU's migration stream has no single {name.decode()!r} instance 0 section")
    return at + len(marker) + 4


def patch_cpu_state(stream: bytes, registers: Registers) -> bytes:
    """``stream`` (one x86 vCPU, saved by qemu-system-x86_64) with that vCPU halted and its IDTR
    set to ``registers``' one.

    Section ``cpu_common`` begins with ``halted``; in section ``cpu`` (vmstate_x86_cpu) the
    IDT segment is the field before sysenter_cs/esp/eip, which precede cr[0]: the CR values
    ``registers`` has (written over the gdbstub before the save) find it, and the GDT and IDT
    must still hold their reset values, or nothing is patched.

    Raises:
        LabError: the stream does not look like that.
    """
    out = bytearray(stream)
    halted_at = _section(stream, b"cpu_common")
    if out[halted_at:halted_at + 4] != bytes(4):
        raise LabError("the 'cpu_common' section does not begin with a running vCPU's halted = 0")
    crs = _CRS.pack(registers.cr0 | _CR0_ET, 0, registers.cr3, registers.cr4)
    cpu_at = _section(stream, b"cpu")
    cr0_at = out.find(crs, cpu_at)
    if cr0_at < 0 or out.find(crs, cr0_at + 1) != -1:
        raise LabError("the 'cpu' section does not hold the control registers written over the gdbstub")
    idt_at = cr0_at - _SYSENTER - _SEGMENT.size
    gdt_at = idt_at - _SEGMENT.size
    if gdt_at < cpu_at or _SEGMENT.unpack_from(out, gdt_at) != _RESET_TABLE or \
            _SEGMENT.unpack_from(out, idt_at) != _RESET_TABLE:
        raise LabError("the 'cpu' section has no reset GDT/IDT before its sysenter and control registers")
    struct.pack_into(">I", out, halted_at, 1)
    _SEGMENT.pack_into(out, idt_at, 0, registers.idtr_base, registers.idtr_limit, 0)
    return bytes(out)


def qemu_argv(runtime: Path, ram: Path, size: int, *, incoming: bool) -> list[str]:
    """A pc machine with nothing but one vCPU and ``ram`` as its RAM, stopped (``-S``)."""
    argv = [EMULATOR, "-name", "vmwatch-windows-image", "-machine", "pc,memory-backend=ram",
            "-m", f"{size >> 20}M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg", "-S",
            "-object", f"memory-backend-file,id=ram,size={size >> 20}M,mem-path={ram},share=on",
            "-qmp", f"unix:{runtime / 'qmp.sock'},server=on,wait=off",
            "-chardev", f"socket,id=labqmp,path={runtime / 'lab-qmp.sock'},server=on,wait=off",
            "-mon", "chardev=labqmp,mode=control", "-pidfile", str(runtime / "qemu.pid")]
    return argv + ["-incoming", "defer"] if incoming else argv


class WindowsQemu:
    """A stopped ``qemu-system-x86_64`` holding a Windows memory image; ``start()`` makes one."""

    def __init__(self, runtime: Path, pid: int, process: subprocess.Popen[bytes] | None) -> None:
        self.runtime = runtime
        self.pid = pid
        self._process = process
        self.seconds: dict[str, float] = {}
        """How long each start-up step took (loader, registers, save, load)."""

    @property
    def qmp_path(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def target(self) -> str:
        return f"qemu:{self.qmp_path}"

    @property
    def ram_path(self) -> Path:
        """The RAM file (a copy of the image: the guest's writes, vmwatch's too, land here)."""
        return self.runtime / "ram"

    def monitor(self) -> SyncQmp:
        """A client on the guest's own QMP monitor (close it when done)."""
        return SyncQmp.connect(str(self.runtime / "lab-qmp.sock"))

    @classmethod
    def start(cls, image: Path, registers: Registers) -> "WindowsQemu":
        """QEMU with a copy of ``image`` (raw, file offset = guest physical; its size is the RAM
        size, a whole number of MiB) as RAM and ``registers``' CR0/CR3/CR4/EFER/IDTR loaded.

        Raises:
            LabError: QEMU is missing, fails to start, or does not take the state.
        """
        if shutil.which(EMULATOR) is None:
            raise LabError(f"{EMULATOR} is missing (install the Debian package qemu-system-x86)")
        size = image.stat().st_size
        if size % (1 << 20) or not 0 < size <= MAX_RAM:
            raise LabError(f"{image}: {size} bytes is not a whole number of MiB up to {MAX_RAM >> 30} GiB")
        runtime = new_runtime_dir("lab-win-")
        try:
            shutil.copyfile(image, runtime / "ram")
            return cls._start(runtime, size, registers)
        except BaseException:
            shutil.rmtree(runtime, ignore_errors=True)
            raise

    @classmethod
    def _start(cls, runtime: Path, size: int, registers: Registers) -> "WindowsQemu":
        seconds: dict[str, float] = {}
        t0 = time.monotonic()
        loader = runtime / "loader"
        loader.mkdir(mode=0o700)
        pid, process = _launch(qemu_argv(loader, runtime / "ram", size, incoming=False), loader)
        try:
            seconds["loader"] = time.monotonic() - t0
            _write_control_registers(loader / "qmp.sock", registers)
            seconds["registers"] = time.monotonic() - t0 - seconds["loader"]
            state = runtime / "cpu.state"
            with SyncQmp.connect(str(loader / "lab-qmp.sock")) as qmp:
                _ignore_shared(qmp)
                qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
                _wait_migration(qmp)
        finally:
            kill_qemu(pid, loader, process)
        seconds["save"] = time.monotonic() - t0 - sum(seconds.values())
        state.write_bytes(patch_cpu_state(state.read_bytes(), registers))
        pid, process = _launch(qemu_argv(runtime, runtime / "ram", size, incoming=True), runtime)
        guest = cls(runtime, pid, process)
        try:
            with guest.monitor() as qmp:
                _ignore_shared(qmp)
                qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
                _wait_migration(qmp)
                _check_loaded(qmp, registers)
        except BaseException:
            guest.stop()
            raise
        seconds["load"] = time.monotonic() - t0 - sum(seconds.values())
        guest.seconds = seconds
        return guest

    def stop(self) -> None:
        """Kill QEMU and remove its runtime directory (RAM file included)."""
        kill_qemu(self.pid, self.runtime, self._process)

    def __enter__(self) -> "WindowsQemu":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _launch(argv: list[str], runtime: Path) -> tuple[int, subprocess.Popen[bytes] | None]:
    """Start QEMU and wait for both its monitors."""
    pid, process = launch(argv, runtime, START_TIMEOUT, detached=False)
    deadline = time.monotonic() + START_TIMEOUT
    while not all(os.path.exists(runtime / s) for s in ("qmp.sock", "lab-qmp.sock")):
        if process is not None and process.poll() is not None or time.monotonic() > deadline:
            text = (runtime / "qemu.log").read_text(errors="replace").strip()
            kill_qemu(pid, runtime, process)
            raise LabError(f"QEMU did not start: {text[-600:]}")
        time.sleep(0.02)
    return pid, process


def _write_control_registers(qmp_path: Path, registers: Registers) -> None:
    """CR4 and EFER first, then CR3, then CR0 (PG with EFER.LME set is the switch to long mode)."""
    import trio

    from vmwatch.live.qemu import attach_qemu

    async def write() -> None:
        async with attach_qemu(str(qmp_path)) as vm:
            await vm.set_registers(0, cr4=registers.cr4, efer=registers.efer, cr3=registers.cr3, cr0=registers.cr0)

    trio.run(write)


def _ignore_shared(qmp: SyncQmp) -> None:
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


def _wait_migration(qmp: SyncQmp) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while (status := qmp.execute("query-migrate").get("status")) != "completed":
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise LabError(f"QEMU's state migration ended {status or 'never'}")
        time.sleep(0.02)


def _check_loaded(qmp: SyncQmp, registers: Registers) -> None:
    """HMP ``info registers`` shows the vCPU halted with the IDTR and CRs asked for."""
    from vmwatch.live.qemu_registers import parse_descriptor_tables

    text = qmp.execute("human-monitor-command", command_line="info registers")
    _gdt, _gdt_limit, idt, idt_limit = parse_descriptor_tables(text)
    cr3 = re.search(r"CR3=([0-9a-f]+)", text)
    if (idt, idt_limit) != (registers.idtr_base, registers.idtr_limit) or "HLT=1" not in text or \
            cr3 is None or int(cr3.group(1), 16) != registers.cr3:
        raise LabError(f"QEMU did not take the vCPU state: {text[:600]}")
