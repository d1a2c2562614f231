"""Register rules of the security pack on synthetic register-write events.

The lab guest cannot write LSTAR or clear SMEP on demand (no MSR driver inside, qemu64 has no
SMEP), so the rule logic is checked here with RegisterWrite events as the sensor emits them and a
real kallsyms ``Symbols`` table holding the kernel's entry points.
"""

from __future__ import annotations

from vmwatch.cpu import CR0_WP, CR4_SMAP, CR4_SMEP
from vmwatch.engine import Engine, ListSink, SyntheticSource
from vmwatch.events import RegisterWrite
from vmwatch.os.linux.kallsyms import Symbols
from vmwatch.rules import RuleSet, Severity

T = 0xFFFFFFFF81000000


class _Kernel:
    memory = None  # the register rules read symbols only
    symbols = Symbols(["_stext", "entry_SYSCALL_64", "entry_SYSENTER_compat", "evil_hook", "_etext"],
                      [T, T + 0x100, T + 0x200, T + 0x300, T + 0x10000], "TTTtT")


async def _run(events):
    rs = RuleSet.load(["security"])
    rs.disable("security")
    rs.enable("security.syscall_msr")
    rs.enable("security.control_register_write")
    sink = ListSink()
    summary = await Engine(SyntheticSource(events, honour_traps=False), rs, [sink], os_factory=lambda guest: _Kernel()).run()
    assert not summary.rule_errors, summary
    return [(a.severity, a.message) for a in sink.alerts]


async def test_syscall_msrs():
    """LSTAR/SYSENTER_EIP written with the kernel's entry are quiet; anything else is critical."""
    events = [
        RegisterWrite(seq=1, register="msr:lstar", old=None, new=T + 0x100, rip=T + 0x50),
        RegisterWrite(seq=2, register="msr:lstar", old=T + 0x100, new=0xFFFFC90000002000, rip=T + 0x50),
        RegisterWrite(seq=3, register="msr:sysenter_eip", old=None, new=T + 0x300, rip=T + 0x60),
        RegisterWrite(seq=4, register="msr:star", old=0x23001000000000, new=0x23001000000000),
        RegisterWrite(seq=5, register="msr:star", old=0x23001000000000, new=0x1),
    ]
    assert await _run(events) == [
        (Severity.CRITICAL, "LSTAR set to 0xffffc90000002000, outside kernel text, not entry_SYSCALL_64"),
        (Severity.CRITICAL, f"SYSENTER_EIP set to evil_hook ({T + 0x300:#x}), not entry_SYSENTER_compat"),
        (Severity.WARNING, "STAR changed 0x23001000000000 -> 0x1"),
    ]


async def test_control_register_bits():
    """Clearing WP, SMEP or SMAP is critical; setting them or other bits is quiet."""
    base4 = 0x3006F0 | CR4_SMEP | CR4_SMAP
    events = [
        RegisterWrite(seq=1, register="cr0", old=0x80050033, new=0x80050033 & ~CR0_WP, rip=T + 0x10),
        RegisterWrite(seq=2, register="cr0", old=0x80050033 & ~CR0_WP, new=0x80050033, rip=T + 0x10),
        RegisterWrite(seq=3, register="cr4", old=base4, new=base4 & ~CR4_SMEP & ~CR4_SMAP, rip=T + 0x20),
        RegisterWrite(seq=4, register="cr4", old=base4, new=base4 ^ 0x80, rip=T + 0x20),  # PGE toggle: TLB flush
        RegisterWrite(seq=5, register="cr4", old=None, new=0, rip=T + 0x20),
    ]
    messages = [m for _, m in await _run(events)]
    assert messages == [
        "CR0.WP cleared: the kernel can now write read-only memory",
        "CR4.SMEP cleared: the kernel may now execute user pages",
        "CR4.SMAP cleared: the kernel may now access user pages freely",
    ]
