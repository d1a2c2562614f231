"""Translation on real QEMU guests, checked against QEMU's own ``gva2gpa`` (outside vmwatch).

Each guest is paused, dumped with ``dump-guest-memory``, and vmwatch translates kernel
addresses of the dump with the dump's saved CR3; QEMU translates the same addresses with the
paused vCPU's page tables. The amd64 guest uses 4-level paging; with ``-cpu qemu64,+la57`` the
same kernel uses 5-level paging, which Volatility 3 cannot read. Debian's i386 kernels give
32-bit paging with 4 MiB pages (``linux-image-686``) and PAE (``linux-image-686-pae``).

The lab guest cannot boot i386 userspace yet, so the i386 kernels are booted here without an
initramfs: they set up their page tables, fail to mount a root and stay in ``panic()`` with
interrupts off, which is all a paging test needs.
"""

from __future__ import annotations

import random
import re
import subprocess
import time

import pytest

from vmwatch.cpu import CR4_LA57, PagingMode
from vmwatch.errors import TranslationError
from vmwatch.images import open_image
from vmwatch.memory import GuestMemory

pytestmark = pytest.mark.guest


def hmp(guest, command: str) -> str:
    return guest.qmp().execute("human-monitor-command", {"command-line": command})


def gva2gpa(guest, vaddr: int) -> int | None:
    """QEMU's own translation with the current vCPU's page tables (None when unmapped)."""
    out = hmp(guest, f"gva2gpa {vaddr:#x}").strip()
    match = re.fullmatch(r"gpa: (0x[0-9a-f]+)", out)
    if match:
        return int(match.group(1), 16)
    assert "Unmapped" in out, out
    return None


def qemu_control_registers(guest) -> dict[str, int]:
    text = hmp(guest, "info registers")
    return {name.lower(): int(value, 16) for name, value in re.findall(r"\b(CR[034]|EFER)=([0-9a-f]+)", text)}


class PanickedKernel:
    """An i386 Debian kernel booted with no root file system, halted in panic()."""

    def __init__(self, flavour: str, workdir) -> None:
        from vmwatch.lab.kernel import ensure_kernel
        from vmwatch.live.qmp._sync import SyncQmp

        kernel = ensure_kernel(flavour)
        assert kernel.package.endswith(f"-{flavour}"), kernel.package
        serial, qmp = workdir / "serial.log", workdir / "qmp.sock"
        argv = ["qemu-system-i386", "-m", "128M", "-nodefaults", "-no-user-config", "-display", "none",
                "-accel", "tcg", "-kernel", str(kernel.vmlinuz), "-append", "console=ttyS0 panic=0",
                "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while b"Kernel panic" not in (serial.read_bytes() if serial.exists() else b""):
                assert self.process.poll() is None, "QEMU exited before the kernel panicked"
                assert time.monotonic() < deadline, "the i386 kernel did not reach panic() in time"
                time.sleep(0.2)
            self._qmp = SyncQmp.connect(str(qmp))
        except BaseException:
            self.stop()
            raise

    def qmp(self):
        return self._qmp

    def dump(self, path):
        self._qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{path}", timeout=60)
        return path

    def stop(self) -> None:
        if getattr(self, "_qmp", None) is not None:
            self._qmp.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module", params=["4-level", "5-level", "32-bit", "pae"])
def paused_dump(request, tmp_path_factory):
    """(mode, guest, QEMU's control registers, dump path) for a paused guest; resumed afterwards."""
    own = True
    if request.param == "4-level":
        guest = request.getfixturevalue("lab_guest")
        own = False
    elif request.param == "5-level":
        guest = request.getfixturevalue("lab_guest_factory")(cpu_model="qemu64,+la57")
    else:
        flavour = "686" if request.param == "32-bit" else "686-pae"
        guest = PanickedKernel(flavour, tmp_path_factory.mktemp(flavour))
    guest.qmp().execute("stop")
    try:
        regs = qemu_control_registers(guest)
        path = guest.dump(tmp_path_factory.mktemp("dumps") / f"{request.param}.elf")
        yield request.param, guest, regs, path
    finally:
        if own:
            guest.stop()
        else:
            guest.qmp().execute("cont")


KERNEL_HALF = {
    PagingMode.LEVEL4: (0xFFFF_8000_0000_0000, 1 << 64),
    PagingMode.LEVEL5: (0xFF00_0000_0000_0000, 1 << 64),
    PagingMode.PAE: (0xC000_0000, 1 << 32),
    PagingMode.BITS32: (0xC000_0000, 1 << 32),
}
KERNEL_TEXT = {PagingMode.LEVEL4: 0xFFFF_FFFF_8000_0000, PagingMode.LEVEL5: 0xFFFF_FFFF_8000_0000,
               PagingMode.PAE: 0xC000_0000, PagingMode.BITS32: 0xC000_0000}
LARGE_PAGE = {PagingMode.LEVEL4: 0x20_0000, PagingMode.LEVEL5: 0x20_0000,
              PagingMode.PAE: 0x20_0000, PagingMode.BITS32: 0x40_0000}


def _sample(mem: GuestMemory, count: int, seed: int) -> list[int]:
    """Kernel-half addresses on distinct physical frames (4 KiB and large pages alike), plus
    addresses that are probably unmapped."""
    rng = random.Random(seed)
    low, high = KERNEL_HALF[mem.mode]
    frames = {}
    for m in mem.mappings(start=low):
        frames.setdefault(m.paddr, m)
    chosen = rng.sample(sorted(frames.values(), key=lambda m: m.vaddr), min(count, len(frames)))
    chosen += [m for m in frames.values() if m.size > 0x1000][:count // 4]
    out = [m.vaddr + rng.randrange(m.size) for m in chosen]
    out += [low + rng.randrange(high - low) for _ in range(count // 4)]
    return out


class TestRealGuests:
    def test_mode_from_saved_registers(self, paused_dump):
        """The dump's saved CR3/CR4 match QEMU's, and select the expected paging mode."""
        mode, guest, regs, path = paused_dump
        with open_image(path) as image:
            saved = image.cpus[0]
            assert saved.cr3 == regs["cr3"] and saved.cr4 == regs["cr4"]
            assert bool(saved.cr4 & CR4_LA57) == (mode == "5-level")
            assert GuestMemory(image, registers=saved).mode.value == mode

    def test_translate_matches_qemu(self, paused_dump):
        """vmwatch translate() on the dump agrees with QEMU gva2gpa on a few hundred addresses."""
        mode, guest, regs, path = paused_dump
        with open_image(path) as image:
            mem = GuestMemory(image, registers=image.cpus[0])
            addrs = _sample(mem, 200, seed=len(mode))
            mapped = 0
            for vaddr in addrs:
                want = gva2gpa(guest, vaddr)
                try:
                    got = mem.translate(vaddr)
                except TranslationError:
                    got = None
                assert got == want, f"{vaddr:#x}: vmwatch {got!r} QEMU {want!r}"
                mapped += want is not None
            assert mapped >= 150
            sizes = {mem.lookup(vaddr).size for vaddr in addrs if gva2gpa(guest, vaddr) is not None}
            assert {0x1000, LARGE_PAGE[mem.mode]} <= sizes
            if mode == "5-level":
                assert any(vaddr >> 47 not in (0, 0x1FFFF) and mem.translate(vaddr) for vaddr in addrs[:200])

    def test_banner_virtual_equals_physical(self, paused_dump):
        """The Linux banner found by a physical scan reads the same through the kernel's text mapping."""
        mode, guest, regs, path = paused_dump
        with open_image(path) as image:
            mem = GuestMemory(image, registers=image.cpus[0])
            data = image.read(0, min(image.runs[0].size, 512 << 20))
            kernel = list(mem.mappings(start=KERNEL_TEXT[mem.mode]))
            # Copies of the banner may lie around (page cache, a shell's `cat /proc/version`):
            # take the first one the kernel's own mapping covers.
            paddr = data.find(b"Linux version ")
            while paddr >= 0:
                text = [m for m in kernel if m.paddr <= paddr < m.paddr + m.size]
                if text:
                    break
                paddr = data.find(b"Linux version ", paddr + 1)
            assert paddr > 0, "no kernel-text mapping covers a banner"
            vaddr = text[0].vaddr + paddr - text[0].paddr
            assert gva2gpa(guest, vaddr) == paddr
            assert mem.read(vaddr, 200) == image.read(paddr, 200)
            assert mem.cstring(vaddr, 200).startswith("Linux version 6.")
            assert not text[0].user
