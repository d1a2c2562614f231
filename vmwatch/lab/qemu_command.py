"""What a lab guest is made of (LabConfig) and the QEMU command line that boots it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs

from vmwatch.errors import LabError
from vmwatch.lab.kernel import ARCHES, KernelPackage

_SIZE = re.compile(r"^[1-9][0-9]*[KMGT]?$")


@attrs.frozen
class Board:
    """The machine QEMU emulates for a lab arch: what differs between x86 and arm64 guests."""

    machine: str
    console: str
    """The kernel's name for the serial port that ``-serial`` connects."""
    cpu_model: str | None
    """``-cpu`` when the config names none (None: QEMU's default)."""
    debian_package: str
    """Where the emulator comes from, for the error when it is missing."""


_X86 = Board("pc", "ttyS0", None, "qemu-system-x86")
BOARDS = {
    "amd64": _X86, "686": _X86, "686-pae": _X86,
    # virt's PL011 UART is ttyAMA0. ``max`` has pointer authentication (the Debian kernel uses it);
    # its architected QARMA5 hash is slow under TCG (8.4 s to the shell against 3.3 s measured
    # here), so pauth-impdef=on swaps in QEMU's cheap hash: PAC bits are still signed and checked.
    "arm64": Board("virt", "ttyAMA0", "max,pauth-impdef=on", "qemu-system-arm"),
}  # fmt: skip


def _check_memory(_: Any, __: Any, value: str) -> None:
    if not _SIZE.match(value):
        raise LabError(f"memory size {value!r} is not like 256M or 1G")


def _check_arch(_: Any, __: Any, value: str) -> None:
    if value not in ARCHES:
        raise LabError(f"unknown lab arch {value!r} (choose from {', '.join(ARCHES)})")


@attrs.frozen(kw_only=True)
class LabConfig:
    arch: str = attrs.field(default="amd64", validator=_check_arch)
    memory: str = attrs.field(default="256M", validator=_check_memory)
    cpus: int = 1
    cpu_model: str | None = None
    """QEMU ``-cpu`` model, e.g. ``qemu64,+la57`` for 5-level paging; the board's default if None."""
    accel: str = "tcg"
    """``tcg`` or ``kvm`` (falls back to TCG, with a warning, where KVM does not work)."""
    shared_ram: bool = True
    """Guest RAM in a ``memory-backend-file`` (share=on) that the host can mmap."""
    kaslr: bool = True
    """Boot vmlinuz as Debian does (KASLR on). False boots the uncompressed vmlinux through its PVH
    entry: several seconds faster under TCG, kernel at its link address (no KASLR). On arm64 the
    same Image boots with ``nokaslr``."""
    machine: str | None = None
    """QEMU ``-machine``; the board's (``pc``, ``virt``) if None."""
    append: str = ""
    """Extra kernel command-line words."""

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.cpus <= 64:
            raise LabError(f"cpus must be 1..64, not {self.cpus}")
        if self.accel not in ("tcg", "kvm"):
            raise LabError(f"accel must be tcg or kvm, not {self.accel!r}")

    @property
    def board(self) -> Board:
        return BOARDS[self.arch]

    @property
    def memory_bytes(self) -> int:
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(self.memory[-1], 1)
        return int(self.memory.rstrip("KMGT")) * unit


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def qemu_command(config: LabConfig, kernel: KernelPackage, initrd: Path, runtime: Path,
                 accel: str) -> list[str]:
    """The QEMU command line for a lab guest (pure, for tests and for ``vmwatch lab start --dry-run``)."""
    emulator = ARCHES[config.arch][2]
    board = config.board
    machine = (config.machine or board.machine) + (",memory-backend=ram" if config.shared_ram else "")
    argv = [emulator, "-name", "vmwatch-lab", "-machine", machine, "-m", config.memory,
            "-smp", str(config.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot"]
    argv += ["-accel", "kvm", "-accel", "tcg"] if accel == "kvm" else ["-accel", "tcg"]
    if config.cpu_model or board.cpu_model:
        argv += ["-cpu", config.cpu_model or board.cpu_model]
    if config.shared_ram:
        argv += ["-object", f"memory-backend-file,id=ram,size={config.memory},"
                            f"mem-path={runtime / 'ram'},share=on"]
    append = f"console={board.console} quiet loglevel=1 panic=-1 {config.append}".strip()
    if config.arch == "arm64":
        # QEMU loads the arm64 Image (Debian's vmlinuz is one, uncompressed) straight at its entry:
        # there is no decompressor to skip, so KASLR off is a kernel option here.
        image = kernel.vmlinuz
        append += "" if config.kaslr else " nokaslr"
    else:
        image = kernel.vmlinuz if config.kaslr else kernel.vmlinux()
    argv += ["-kernel", str(image), "-initrd", str(initrd), "-append", append,
             "-chardev", f"socket,id=serial0,path={runtime / 'serial.sock'},server=on,wait=off",
             "-serial", "chardev:serial0",
             "-qmp", f"unix:{runtime / 'qmp.sock'},server=on,wait=off",
             # A second monitor for LabGuest itself: a QMP socket serves one client at a time, and
             # qmp.sock must stay free for vmwatch's backends (and users).
             "-chardev", f"socket,id=labqmp,path={runtime / 'lab-qmp.sock'},server=on,wait=off",
             "-mon", "chardev=labqmp,mode=control",
             "-pidfile", str(runtime / "qemu.pid")]
    return argv
