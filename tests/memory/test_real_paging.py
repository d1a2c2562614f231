"""Translation on real QEMU guests, checked against QEMU's own ``gva2gpa`` (outside vmwatch).

Each guest is paused, dumped with ``dump-guest-memory``, and vmwatch translates kernel
addresses of the dump with the dump's saved CR3; QEMU translates the same addresses with the
paused vCPU's page tables. The amd64 guest uses 4-level paging; with ``-cpu qemu64,+la57`` the
same kernel uses 5-level paging, which Volatility 3 cannot read.
"""

from __future__ import annotations

import random
import re

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


@pytest.fixture(scope="module", params=["4-level", "5-level"])
def paused_dump(request, tmp_path_factory):
    """(guest, QEMU's control registers, dump path) for a paused guest; resumed afterwards."""
    if request.param == "4-level":
        guest = request.getfixturevalue("lab_guest")
        own = False
    else:
        guest = request.getfixturevalue("lab_guest_factory")(cpu_model="qemu64,+la57")
        own = True
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


def _sample(mem: GuestMemory, count: int, seed: int) -> list[int]:
    """Kernel-half addresses on distinct physical frames, plus addresses that are probably unmapped."""
    rng = random.Random(seed)
    frames = {}
    for m in mem.mappings(start=1 << 63):
        frames.setdefault(m.paddr, m)
    chosen = rng.sample(sorted(frames.values(), key=lambda m: m.vaddr), min(count, len(frames)))
    out = [m.vaddr + rng.randrange(m.size) for m in chosen]
    top = 0xFF00_0000_0000_0000 if mem.mode is PagingMode.LEVEL5 else 0xFFFF_8000_0000_0000
    out += [top + rng.randrange((1 << 64) - top) for _ in range(count // 4)]
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
            if mode == "5-level":
                assert any(vaddr >> 47 not in (0, 0x1FFFF) and mem.translate(vaddr) for vaddr in addrs[:200])

    def test_banner_virtual_equals_physical(self, paused_dump):
        """The Linux banner found by a physical scan reads the same through the kernel's text mapping."""
        mode, guest, regs, path = paused_dump
        with open_image(path) as image:
            mem = GuestMemory(image, registers=image.cpus[0])
            data = image.read(0, min(image.runs[0].size, 512 << 20))
            paddr = data.find(b"Linux version ")
            assert paddr > 0
            text = [m for m in mem.mappings(start=0xFFFF_FFFF_8000_0000)
                    if m.paddr <= paddr < m.paddr + m.size]
            assert text, "no kernel-text mapping covers the banner"
            vaddr = text[0].vaddr + paddr - text[0].paddr
            assert gva2gpa(guest, vaddr) == paddr
            assert mem.read(vaddr, 200) == image.read(paddr, 200)
            assert mem.cstring(vaddr, 200).startswith("Linux version 6.")
            assert not text[0].writable and not text[0].user
