"""What the arm64 lab guest and its QEMU say about themselves, for tests to compare vmwatch against.

Truth here never goes through vmwatch's readers: symbol addresses come from the guest's own
``/proc/kallsyms`` (over its serial console), registers and memory words from QEMU's HMP
(``info registers``, ``x``: QEMU's own MMU), on the lab's private QMP monitor.
"""

from __future__ import annotations

import re

import trio

VA_BITS = 48
THREAD_SIZE = 16 << 10


def kallsyms(guest, *names: str) -> dict[str, int]:
    """Addresses of ``names`` in the guest's /proc/kallsyms (pointers exposed for the read)."""
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict", check=True)
    pattern = " ".join(f"-e ' {n}$'" for n in names)
    lines = guest.shell(f"grep {pattern} /proc/kallsyms", check=True, timeout=60).splitlines()
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in lines) if len(parts) == 3}


def kernel_text_paddr(guest, vaddr: int) -> int:
    """The physical address of kernel text at ``vaddr``: /proc/iomem's "Kernel code" starts at ``_stext``."""
    code = next(int(line.split("-")[0], 16) for line in guest.shell("cat /proc/iomem", check=True).splitlines()
                if line.endswith(": Kernel code"))
    return code + vaddr - kallsyms(guest, "_stext")["_stext"]


def parse_hmp_registers(text: str) -> dict[str, int]:
    """PC, SP, X00..X30 and PSTATE from QEMU's aarch64 ``info registers``."""
    return {name: int(value, 16) for name, value in re.findall(r"\b(PC|SP|X\d\d|PSTATE)=([0-9a-f]+)", text)}


def hmp(guest, command: str) -> str:
    return guest.qmp().execute("human-monitor-command", {"command-line": command})


def hmp_registers(guest) -> dict[str, int]:
    """The vCPU's registers as QEMU shows them (the guest must be stopped for them to hold)."""
    return parse_hmp_registers(hmp(guest, "info registers"))


def hmp_words(guest, vaddr: int, count: int, unit: str = "g", *, physical: bool = False) -> list[int]:
    """``count`` words (``g``: 64-bit, ``w``: 32-bit) at virtual ``vaddr`` through QEMU's own MMU (``x /Nxg``),
    or at a physical address (``xp``)."""
    words: list[int] = []
    for line in hmp(guest, f"{'xp' if physical else 'x'} /{count}x{unit} {vaddr:#x}").splitlines():
        if ":" in line:
            words += [int(w, 16) for w in line.split(":", 1)[1].split()]
    assert len(words) == count, (vaddr, count, words)
    return words


def pac_stripped(value: int, va_bits: int = VA_BITS) -> int:
    """A kernel code pointer with its PAC bits replaced by ones (bit 55 is set in every kernel address)."""
    return value | (~((1 << va_bits) - 1) & 0xFFFFFFFFFFFFFFFF)


def has_pac(value: int, va_bits: int = VA_BITS) -> bool:
    return pac_stripped(value, va_bits) != value


def stack_words(sp: int, most: int = 128) -> int:
    """Words of the kernel stack from ``sp`` to its top, at most ``most`` (past the top is a guard page)."""
    return min(most, (((sp | (THREAD_SIZE - 1)) + 1) - sp) // 8)


def paused_dump(guest, path):
    """A dump taken paused in EL1, with what QEMU says at that moment: ``(path, gdbstub registers (with
    SP_EL0), HMP registers, the stack words from SP to its top (at most 1 KiB))``."""
    from vmwatch.live.qemu import attach_qemu

    async def take():
        async with attach_qemu(str(guest.qmp_path)) as vm:
            for _ in range(50):  # an idle guest is nearly always in EL1; a stop may land in EL0
                await vm.pause()
                regs = await vm.registers()
                if regs.el == 1:
                    break
                await vm.resume()
            hmp_regs = hmp_registers(guest)
            stack = hmp_words(guest, hmp_regs["SP"], stack_words(hmp_regs["SP"]))
            dumped = guest.dump(path)
            await vm.resume()
            return dumped, regs, hmp_regs, stack

    return trio.run(take)
