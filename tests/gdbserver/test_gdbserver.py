"""``vmwatch gdbserver``: the sans-IO server core byte for byte, and a real gdb on dumps and the live guest."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from vmwatch.gdbserver import _proto as p
from vmwatch.gdbserver.amd64 import LAYOUT, encode_registers, target_xml
from vmwatch.cpu import Registers, Segment
from vmwatch.images import open_image
from vmwatch.testing.cli import run_cli

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (Debian package gdb)")


def framed(payload: bytes) -> bytes:
    return b"$%s#%02x" % (payload, sum(payload) & 0xFF)


REQUESTS = [
    (b"g", p.ReadRegisters()),
    (b"p10", p.ReadRegister(0x10)),
    (b"mffffffff81000000,40", p.ReadMemory(0xFFFFFFFF81000000, 0x40)),
    (b"Hg2", p.SetThread("g", 2)),
    (b"Hc-1", p.SetThread("c", -1)),
    (b"T1", p.ThreadAlive(1)),
    (b"c", p.Resume(step=False)),
    (b"s", p.Resume(step=True)),
    (b"vCont;s:2;c", p.Resume(step=True, thread=2)),
    (b"Z0,ffffffff81001000,1", p.Point(True, 0, 0xFFFFFFFF81001000, 1)),
    (b"z2,ffff888000001000,8", p.Point(False, 2, 0xFFFF888000001000, 8)),
    (b"qSupported:multiprocess+;swbreak+", p.Query("qSupported", "multiprocess+;swbreak+")),
    (b"qXfer:features:read:target.xml:0,ffb", p.Query("qXfer", "features:read:target.xml:0,ffb")),
    (b"?", p.HaltReason()),
    (b"D;1", p.Detach()),
    (b"k", p.Detach()),
    (b"M1000,1:00", p.Write("M")),
    (b"vMustReplyEmpty", p.Unsupported(b"vMustReplyEmpty")),
]


class TestServerCore:
    @pytest.mark.parametrize(("payload", "request_"), REQUESTS)
    def test_parses_and_acks_each_packet(self, payload, request_):
        """Each packet, fed one byte at a time, becomes its request and is acked once."""
        core = p.ServerCore()
        for byte in framed(payload):
            assert core.next_request() is p.NEED_DATA
            core.receive_data(bytes([byte]))
        assert core.next_request() == request_
        assert core.data_to_send() == b"+"

    def test_bad_checksum_is_nacked_and_resent_reply_on_nack(self):
        """A corrupted packet gets '-'; gdb's '-' gets our last reply again."""
        core = p.ServerCore()
        core.receive_data(b"$g#00")
        assert core.next_request() is p.NEED_DATA and core.data_to_send() == b"-"
        core.receive_data(framed(b"?"))
        assert core.next_request() == p.HaltReason()
        core.reply(b"T05thread:1;")
        assert core.data_to_send() == b"+" + framed(b"T05thread:1;")
        core.receive_data(b"-")
        assert core.next_request() is p.NEED_DATA
        assert core.data_to_send() == framed(b"T05thread:1;")

    def test_no_ack_mode_after_ok(self):
        """After OK to QStartNoAckMode neither side acks."""
        core = p.ServerCore()
        core.receive_data(framed(b"QStartNoAckMode") + framed(b"g"))
        assert core.next_request() == p.Query("QStartNoAckMode")
        core.reply(b"OK")
        assert core.next_request() == p.ReadRegisters()
        assert core.data_to_send() == b"+" + framed(b"OK")

    def test_interrupt_between_packets_and_binary_reply_escaped(self):
        """0x03 between packets is an interrupt; '$#}*' in a reply are escaped."""
        core = p.ServerCore()
        core.receive_data(framed(b"c") + b"\x03")
        assert core.next_request() == p.Resume(step=False)
        assert isinstance(core.next_request(), p.Interrupt)
        core.data_to_send()
        core.reply(b"l<$#>")
        assert core.data_to_send() == framed(b"l<}\x04}\x03>")

    def test_hostile_bytes_are_a_protocol_error(self):
        """Bytes that are not packets, and malformed fields, raise RemoteProtocolError."""
        from vmwatch.errors import RemoteProtocolError

        for bad in (b"hello", framed(b"mzz,1"), framed(b"Z0,1")):
            core = p.ServerCore()
            core.receive_data(bad)
            with pytest.raises(RemoteProtocolError):
                core.next_request()


class TestRegisters:
    def test_unknown_registers_are_unavailable(self):
        """Known registers little-endian, the rest 'xx' (never a made-up zero)."""
        regs = Registers(rax=0x1122334455667788, rip=0xFFFFFFFF81000000, cs=Segment(selector=0x10), cr3=0x1000)
        packet = encode_registers(regs)
        assert len(packet) == 2 * sum(bits // 8 for _, bits, _ in LAYOUT)
        assert packet.startswith(b"8877665544332211" + b"xx" * 8)
        names = [name for name, _, _ in LAYOUT]
        offset = 2 * sum(bits // 8 for _, bits, _ in LAYOUT[: names.index("cs")])
        assert packet[offset:offset + 8] == b"10000000"
        assert b'name="cr3"' in target_xml()


def gdb(*commands: str, symbol_file=None) -> str:
    argv = ["gdb", "-batch", "-nx", "-ex", "set remotetimeout 60"]
    if symbol_file is not None:
        argv += ["-ex", f"symbol-file {symbol_file}"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return result.stdout + result.stderr


def remote(target: str) -> str:
    return f"target remote | {sys.executable} -m vmwatch gdbserver --stdio {target}"


def gdb_value(out: str, register: str) -> int:
    return int(re.search(rf"^{register}\s+(0x[0-9a-f]+)", out, re.M).group(1), 16)


@pytest.mark.guest
@needs_gdb
def test_gdb_reads_a_dump(lab_guest, tmp_path):
    """gdb on a lab dump: registers as saved, the stack as vmwatch reads it, the PC's function as
    the guest's /proc/kallsyms places it."""
    dump = tmp_path / "lab.elf"
    lab_guest.qmp().execute("stop")
    try:
        lab_guest.dump(dump)
    finally:
        lab_guest.qmp().execute("cont")
    with open_image(dump) as image:
        cpu = image.cpus[0]
    symbol_file = tmp_path / "kernel.sym"
    assert run_cli("symbols", "export", dump, "-o", symbol_file).status == 0
    out = gdb(remote(dump), "info registers rip rsp cr3", "x/2gx $rsp", "info symbol $pc",
              "info threads", "detach", symbol_file=symbol_file)
    assert gdb_value(out, "rip") == cpu.rip and gdb_value(out, "rsp") == cpu.rsp and gdb_value(out, "cr3") == cpu.cr3
    stack = run_cli("read", dump, hex(cpu.rsp), "--length", "16", "--json")
    raw = bytes.fromhex(json.loads(stack.stdout)["chunks"][0]["hex"])
    words = [int.from_bytes(raw[i:i + 8], "little") for i in (0, 8)]
    assert re.search(rf"{cpu.rsp:#x}(?: <[^>]*>)?:\s+{words[0]:#018x}\s+{words[1]:#018x}", out), out
    name = re.search(r"^(\w+) \+ (\d+) in section \.text", out, re.M)
    assert name, out
    kallsyms = lab_guest.shell(f"grep -w {name.group(1)} /proc/kallsyms")
    starts = [int(line.split()[0], 16) for line in kallsyms.splitlines() if line.split()[2:3] == [name.group(1)]]
    assert cpu.rip - int(name.group(2)) in starts, kallsyms


@pytest.mark.guest
@needs_gdb
def test_gdb_controls_the_live_guest(lab_guest):
    """gdb through vmwatch on the live guest: a breakpoint on a timer function stops there, a step
    moves, a watchpoint on jiffies fires, and after detach the guest runs on."""
    listing = lab_guest.shell("grep -w -e update_process_times -e jiffies /proc/kallsyms")
    where = {line.split()[2]: int(line.split()[0], 16) for line in listing.splitlines() if len(line.split()) == 3}
    out = gdb(remote(lab_guest.target), f"break *{where['update_process_times']:#x}", "continue", "p/x $pc",
              "stepi", "p/x $pc", "delete", f"watch *(long *){where['jiffies']:#x}", "continue", "info threads",
              "delete", "detach")
    pcs = [int(m, 16) for m in re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.M)]
    assert pcs[0] == where["update_process_times"], out
    assert pcs[1] != pcs[0], out
    assert re.search(r"Hardware watchpoint \d+: \*\(long \*\)", out), out
    assert "Old value" in out and "New value" in out, out
    assert "detached" in out, out
    assert lab_guest.shell("echo alive").strip() == "alive"


@pytest.mark.guest
@needs_gdb
def test_gdb_looks_at_a_guest_that_a_watch_runs(lab_guest, tmp_path):
    """``watch --gdb``: a real gdb reads the banner and registers of the guest the watch runs, its
    breakpoint is refused, its continue returns at once, and the watch still sees an exec after."""
    sock = tmp_path / "gdb.sock"
    watch = subprocess.Popen(
        [sys.executable, "-m", "vmwatch", "watch", lab_guest.target, "--rules", "timeline", "--json",
         "--duration", "40", "--gdb", f"unix:{sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert watch.poll() is None and time.monotonic() < deadline, watch.communicate()
            time.sleep(0.2)
        banner = int(lab_guest.shell("grep -w linux_banner /proc/kallsyms").split()[0], 16)
        version = lab_guest.shell("cat /proc/version").strip()
        out = gdb(f"target remote {sock}", "info registers rip cr3", f"x/s {banner:#x}",
                  f"break *{banner:#x}", "continue", "delete", "stepi", "info registers rip", "detach")
        assert version[:60] in out.replace("\\n", "\n"), out
        assert gdb_value(out, "cr3") != 0 and gdb_value(out, "rip") >> 47 == (1 << 17) - 1, out
        assert "Cannot insert breakpoint" in out, out
        assert "the watch runs this guest" in out, out
        pid = int(lab_guest.shell("sh -c 'echo $$; exec /bin/busybox true'", timeout=120).split()[0])
        stdout, stderr = watch.communicate(timeout=180)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert "/bin/busybox" in [x["details"]["filename"] for x in lines if x["event"] == "Exec" and x["pid"] == pid]
    assert lab_guest.qmp().execute("query-status")["status"] == "running"
