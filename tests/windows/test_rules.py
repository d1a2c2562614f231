"""The security pack's Windows rules on guests built around the real ntoskrnl: clean is quiet, each
tamper (on the image file, or in memory between two ticks) gives its one alert."""

from __future__ import annotations

import struct

import pytest
import trio

from vmwatch.engine import Engine, ImageSource, ListSink, SyntheticSource
from vmwatch.events import Tick
from vmwatch.images import open_image
from vmwatch.memory import BufferMemory
from vmwatch.rules import RuleSet, Severity
from vmwatch.testing.windowsguest import FAKE_DRIVER, KERNEL_VA, SSDT_RVA, WindowsGuest

WINDOWS_RULES = ("security.ssdt", "security.windows_idt", "security.driver_allowlist", "security.unlinked_process")
ROOTKIT = 0xFFFFFA8000100000
"""Pool memory no driver image covers: where an injected hook lives."""
TRAMPOLINE = KERNEL_VA + 0x2000000
"""Outside every driver, but within the +-128 MiB an x64 SSDT entry (28 bits << 4) reaches."""
STRICT = {"allow": ["ntoskrnl.exe", "hal.dll"], "trust_start": False}


@pytest.fixture
def guest(ntoskrnl, wine_pe) -> WindowsGuest:
    g = WindowsGuest(ntoskrnl, hal=wine_pe["hal.dll"])
    g.build_objects(clean=True)
    return g


def _ruleset(strict: bool = False) -> RuleSet:
    rs = RuleSet.load(["security"])
    if strict:
        rs.configure("security.driver_allowlist", **STRICT)
    return rs


def _watch_file(path, guest: WindowsGuest, strict: bool = False):
    async def main():
        with open_image(path) as image:
            sink = ListSink()
            engine = Engine(ImageSource(image, cpus=(guest.registers,)), _ruleset(strict), [sink])
            summary = await engine.run()
            return summary, sink.alerts

    return trio.run(main)


def _image(guest: WindowsGuest, tmp_path, patches=()) -> object:
    """The guest as a raw image file (file offset = physical address), with ``patches`` applied
    to the file: (virtual address, bytes)."""
    path = tmp_path / "win.raw"
    path.write_bytes(guest.raw())
    with open(path, "r+b") as f:
        for vaddr, data in patches:
            f.seek(guest.paddr(vaddr))
            f.write(data)
    return path


def _loud(alerts):
    return [(a.rule, a.message) for a in alerts if a.severity >= Severity.WARNING]


def _gate(handler: int) -> bytes:
    return struct.pack("<HHBBHIi", handler & 0xFFFF, 0x10, 0, 0x8E, handler >> 16 & 0xFFFF, handler >> 32, 0)


class TestImage:
    def test_clean_image_is_quiet(self, guest, tmp_path):
        """Clean guest, strict driver list: no warning, no rule error; the Linux rules stand aside."""
        summary, alerts = _watch_file(_image(guest, tmp_path), guest, strict=True)
        assert not summary.rule_errors, summary
        assert _loud(alerts) == []

    def test_ssdt_entry_outside_ntoskrnl(self, guest, tmp_path):
        """SSDT[1] rewritten in the file to pool memory: one critical alert naming it."""
        table = KERNEL_VA + SSDT_RVA
        path = _image(guest, tmp_path, [(table + 4, struct.pack("<i", (TRAMPOLINE - table) << 4 | 2))])
        summary, alerts = _watch_file(path, guest)
        assert not summary.rule_errors, summary
        assert _loud(alerts) == [("security.ssdt", f"SSDT[1] points outside ntoskrnl: {TRAMPOLINE:#x}, "
                                                   "outside every loaded driver")]

    def test_idt_gate_outside_every_driver(self, guest, tmp_path):
        """IDT vector 0 rewritten in the file to pool memory: one critical alert for vCPU 0."""
        path = _image(guest, tmp_path, [(guest.idtr_base, _gate(ROOTKIT))])
        summary, alerts = _watch_file(path, guest)
        assert not summary.rule_errors, summary
        assert _loud(alerts) == [("security.windows_idt",
                                  f"vCPU 0 IDT vector 0 points outside every loaded driver: {ROOTKIT:#x}")]

    def test_driver_not_in_the_allowlist(self, ntoskrnl, wine_pe, tmp_path):
        """An image with fakedrv.sys loaded, checked against ntoskrnl+hal: a warning with its path."""
        g = WindowsGuest(ntoskrnl, hal=wine_pe["hal.dll"])
        g.build_objects()  # fakedrv.sys loaded, and SSDT[3] hooked into it
        summary, alerts = _watch_file(_image(g, tmp_path), g, strict=True)
        assert not summary.rule_errors, summary
        name, base, _size, path = FAKE_DRIVER
        assert _loud(alerts) == [
            ("security.ssdt", f"SSDT[3] points outside ntoskrnl: {base + 0x1230:#x} in {name}"),
            ("security.driver_allowlist", f"driver {name} loaded (not in the allowlist) at {base:#x}: {path}"),
        ]

    def test_unlinked_process(self, guest, tmp_path):
        """csrss.exe taken off ActiveProcessLinks (FU's DKOM): ps misses it, the pool scan finds it."""
        hidden = guest.unlink(348)
        summary, alerts = _watch_file(_image(guest, tmp_path), guest)
        assert not summary.rule_errors, summary
        assert _loud(alerts) == [("security.unlinked_process",
                                  f"hidden process: pid 348 (csrss.exe) is alive in pool memory at "
                                  f"{hidden.address:#x} but not on ActiveProcessLinks")]
        assert [a.pid for a in alerts if a.rule == "security.unlinked_process"] == [348]

    def test_idt_gate_on_a_crash_dump(self, guest, tmp_path):
        """A crash dump (no IDTR): the rule reads processor 0's IDT through its KPCR and catches the gate."""
        guest.set_gate(0, ROOTKIT)
        path = tmp_path / "win.dmp"
        path.write_bytes(guest.crashdump())

        async def main():
            with open_image(path) as image:
                sink = ListSink()
                summary = await Engine(ImageSource(image, cpus=tuple(image.cpus)), _ruleset(), [sink]).run()
                return summary, sink.alerts

        summary, alerts = trio.run(main)
        assert not summary.rule_errors, summary
        assert _loud(alerts) == [("security.windows_idt",
                                  f"vCPU 0 IDT vector 0 points outside every loaded driver: {ROOTKIT:#x}")]

    def test_running_unlinked_process_over_a_gdbstub(self, guest, tmp_path):
        """explorer.exe unlinked and running on processor 0, memory a gdbstub (no pool scan): the
        KPRCB's current thread shows it; the Idle process (pid 0, never listed) running is quiet."""
        class GdbLike(BufferMemory):
            slow_bulk_reads = True

        hidden = guest.unlink(1236)
        guest.run_on_cpu(1236)

        async def main(memory):
            sink = ListSink()
            source = SyntheticSource([Tick(seq=1)], memory=memory, registers={0: guest.registers})
            summary = await Engine(source, _ruleset(), [sink]).run()
            return summary, sink.alerts

        summary, alerts = trio.run(main, GdbLike(guest.buffer))
        assert not summary.rule_errors, summary
        assert _loud(alerts) == [("security.unlinked_process", "hidden process: pid 1236 (explorer.exe) runs on "
                                                               "processor 0 but is not on ActiveProcessLinks")]
        assert alerts[-1].details["eprocess"] == hex(hidden.address)
        idle = guest.add_process(0, 0, b"Idle")
        guest.run_on_cpu(idle.pid)
        guest.link(guest.process_head, [p.address + guest.profile.eprocess["ActiveProcessLinks"]
                                        for p in guest.processes if p.pid not in (0,)])
        summary, alerts = trio.run(main, GdbLike(guest.buffer))
        assert not summary.rule_errors and _loud(alerts) == [], (summary, alerts)

    def test_linux_rules_stand_aside(self, guest, tmp_path):
        """On a Windows guest the Linux-only rules are reported inactive, not failed."""
        async def main():
            with open_image(_image(guest, tmp_path)) as image:
                engine = Engine(ImageSource(image, cpus=(guest.registers,)), _ruleset(), [ListSink()])
                await engine.run()
                return engine

        engine = trio.run(main)
        inactive = " ".join(engine.summary.inactive)
        assert "security.syscall_table" in inactive and "runs Windows, not Linux" in inactive
        assert not any(name in inactive for name in WINDOWS_RULES)


class TestChanges:
    """Tampers between two ticks, as on a live guest (the source's memory is the guest's)."""

    def _run(self, guest: WindowsGuest, tamper):
        def events():
            yield Tick(seq=1)
            tamper()
            engine.guest.on_resume()  # the guest ran (a live source says so): cached pages are stale
            yield Tick(seq=2)

        async def main():
            summary = await engine.run()
            return summary, sink.alerts

        sink = ListSink()
        source = SyntheticSource(events(), memory=BufferMemory(guest.buffer, volatile=True),
                                 registers={0: guest.registers}, batch=1)
        engine = Engine(source, _ruleset(), [sink])

        summary, alerts = trio.run(main)
        assert not summary.rule_errors, summary
        return _loud(alerts)

    def test_quiet_without_a_change(self, guest):
        """Two ticks over an untouched guest: nothing."""
        assert self._run(guest, lambda: None) == []

    def test_ssdt_entry_changed(self, guest):
        """SSDT[1] (NtCreateFile) redirected while watched: changed, old and new described."""
        table = KERNEL_VA + SSDT_RVA
        alerts = self._run(guest, lambda: guest.put(table + 4, struct.pack("<i", (TRAMPOLINE - table) << 4)))
        old = guest.ksym("NtCreateFile")
        assert len(alerts) == 1 and alerts[0][0] == "security.ssdt"
        assert alerts[0][1].startswith("SSDT[1] changed: ") and alerts[0][1].endswith(
            f"({old:#x}) -> {TRAMPOLINE:#x}, outside every loaded driver")

    def test_idt_gate_changed(self, guest):
        """Vector 0 pointed at another ntoskrnl address: a change, though still inside ntoskrnl."""
        new = KERNEL_VA + 0x3000
        alerts = self._run(guest, lambda: guest.set_gate(0, new))
        assert len(alerts) == 1 and alerts[0][0] == "security.windows_idt"
        assert alerts[0][1].startswith("vCPU 0 IDT vector 0 handler changed: ") and f"({new:#x})" in alerts[0][1]

    def test_driver_loaded_while_watched(self, guest):
        """A driver linked onto PsLoadedModuleList after the start: a warning (start's drivers trusted)."""
        def load():
            guest.drivers.append(FAKE_DRIVER)
            entry = guest.pool(0x100)
            guest.put_u64(entry + 0x30, FAKE_DRIVER[1])
            guest.put_u32(entry + 0x40, FAKE_DRIVER[2])
            guest.unicode_string(entry + 0x48, FAKE_DRIVER[3])
            guest.unicode_string(entry + 0x58, FAKE_DRIVER[0])
            nodes = []
            node = struct.unpack("<Q", bytes(guest.buffer[guest.paddr(guest.module_head):][:8]))[0]
            while node != guest.module_head:
                nodes.append(node)
                node = struct.unpack("<Q", bytes(guest.buffer[guest.paddr(node):][:8]))[0]
            guest.link(guest.module_head, nodes + [entry])

        assert self._run(guest, load) == [
            ("security.driver_allowlist", f"driver fakedrv.sys loaded (not in the allowlist) at "
                                          f"{FAKE_DRIVER[1]:#x}: {FAKE_DRIVER[3]}")]
