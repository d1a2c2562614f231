"""The lab guest boots for real; truth comes from inside it (its /proc, over the serial console)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmwatch.errors import LabError
from vmwatch.lab import apt as apt_mod
from vmwatch.lab import kernel as kernel_mod
from vmwatch.lab.initramfs import build_initramfs

pytestmark = pytest.mark.guest


def test_shell_reports_the_kernel_we_unpacked(lab_guest):
    assert lab_guest.shell("uname -r").strip() == lab_guest.kernel_release
    version = lab_guest.shell("cat /proc/version")
    assert version.startswith(f"Linux version {lab_guest.kernel_release} ")
    assert (lab_guest.kernel_dir / "boot" / f"vmlinuz-{lab_guest.kernel_release}").is_file()


def test_ps_shows_init_and_the_shell(lab_guest):
    lines = lab_guest.shell("ps -o pid,comm").splitlines()
    assert lines[0].split() == ["PID", "COMMAND"]
    comms = {int(pid): comm for pid, comm in (line.split(None, 1) for line in lines[1:])}
    assert comms[1] == "init"
    assert "sh" in comms.values()


def test_shell_exit_status_output_and_errors(lab_guest):
    assert lab_guest.shell_status("printf 'a\\nb'; false") == (1, "a\nb")
    assert lab_guest.shell_status("echo one\necho two") == (0, "one\ntwo\n")
    status, output = lab_guest.shell_status("if then fi")  # syntax error: an answer, not a hang
    assert status != 0 and "syntax error" in output
    with pytest.raises(LabError, match="exited with 3"):
        lab_guest.shell("(exit 3)", check=True)
    # The shell survives and still answers.
    assert lab_guest.shell("echo $((6 * 7))") == "42\n"


def test_printk_does_not_break_the_markers(lab_guest):
    # Kernel messages at a loud log level go to the console between our markers' lines.
    out = lab_guest.shell("dmesg -n 8; echo vmwatch-test > /dev/kmsg; echo after; dmesg -n 1")
    assert out.rstrip().endswith("after")


def test_qmp_status_and_runtime_permissions(lab_guest):
    assert lab_guest.status() == "running"
    assert stat.S_IMODE(lab_guest.runtime_dir.stat().st_mode) == 0o700
    for sock in (lab_guest.qmp_path, lab_guest.lab_qmp_path, lab_guest.serial_path):
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_qemu_listens_on_no_tcp_socket(lab_guest):
    inodes = set()
    for fd in Path(f"/proc/{lab_guest.pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    assert inodes, "QEMU should hold its unix sockets"
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        rows = Path(table).read_text().splitlines()[1:]
        assert not inodes & {row.split()[9] for row in rows}, table


def test_ram_file_holds_the_kernel_banner(lab_guest):
    banner = lab_guest.shell("cat /proc/version").strip().encode()
    assert lab_guest.ram_path.stat().st_size == 256 << 20
    with open(lab_guest.ram_path, "rb") as ram:
        assert banner in ram.read()


def test_dump_writes_an_elf_core(lab_guest, tmp_path):
    path = lab_guest.dump(tmp_path / "guest.elf")
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF"
        assert lab_guest.kernel_release.encode() in f.read()


def test_scenario_actions_are_visible_inside(lab_guest):
    out = lab_guest.shell("scenario procs 3")
    assert out == "scenario procs 6\n"
    pid = int(lab_guest.shell("scenario sleeper 30").split()[-1])
    assert lab_guest.shell(f"cat /proc/{pid}/comm") == "sleep\n"
    lab_guest.shell(f"kill {pid}")
    count, cs = lab_guest.shell("scenario writes 2000").split()[2::2]
    assert count == "2000" and int(cs) >= 0
    # The guest is shared by the session: start from the hardened baseline, put back what we found.
    found = lab_guest.shell("cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/modprobe").split()
    lab_guest.shell("echo 1 > /proc/sys/kernel/kptr_restrict")
    try:
        assert lab_guest.shell("scenario module", check=True) == "scenario module tcp_yeah\n"
        lsmod = lab_guest.shell("cat /proc/modules")
        assert "tcp_yeah " in lsmod and "tcp_vegas " in lsmod
        assert "scenario sysctl kptr_restrict 1->0" in lab_guest.shell("scenario sysctl")
        assert lab_guest.shell("cat /proc/sys/kernel/modprobe") == "/tmp/.x/modprobe\n"
        assert lab_guest.shell("scenario creds") == "scenario creds 1000\n"
        assert lab_guest.shell("scenario dropper; ls /tmp/.x") == "scenario dropper /tmp/.x/sh\nsh\n"
    finally:
        lab_guest.shell("scenario unmodule; scenario unsysctl")
        assert lab_guest.shell("cat /proc/sys/kernel/kptr_restrict") == "1\n"
        lab_guest.shell(f"echo {found[0]} > /proc/sys/kernel/kptr_restrict; echo {found[1]} > /proc/sys/kernel/modprobe")
    assert "tcp_yeah" not in lab_guest.shell("cat /proc/modules")


def test_second_provisioning_is_a_cache_hit(lab_guest, monkeypatch):
    def no_apt(*args, **kwargs):
        raise AssertionError("apt was asked again: the kernel cache missed")

    monkeypatch.setattr(apt_mod.Apt, "resolve", no_apt)
    monkeypatch.setattr(kernel_mod, "_download_and_unpack", no_apt)
    kernel = kernel_mod.ensure_kernel("amd64")
    assert kernel.root == lab_guest.kernel_dir
    initrd = build_initramfs(kernel, Path("/bin/busybox"))
    before = initrd.stat().st_mtime_ns
    assert build_initramfs(kernel, Path("/bin/busybox")) == initrd
    assert initrd.stat().st_mtime_ns == before


@pytest.mark.slow
def test_smp_and_five_level_paging_guest(lab_guest_factory):
    guest = lab_guest_factory(cpus=2, cpu_model="qemu64,+la57")
    try:
        assert guest.shell("nproc") == "2\n"
        flags = guest.shell("grep -m1 '^flags' /proc/cpuinfo").split()
        assert "la57" in flags
        assert guest.status() == "running"
    finally:
        guest.stop()
    assert not guest.runtime_dir.exists()


@pytest.mark.slow
def test_32_bit_pae_guest_without_kaslr(lab_guest_factory):
    guest = lab_guest_factory(arch="686-pae", kaslr=False)
    try:
        assert guest.kernel_release.endswith("-686-pae")
        assert guest.shell("uname -r").strip() == guest.kernel_release
        assert guest.shell("uname -m") == "i686\n"
        assert "pae" in guest.shell("grep -m1 '^flags' /proc/cpuinfo").split()
        # The uncompressed kernel booted through PVH sits at its link address: no KASLR.
        guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict")
        assert guest.shell("grep -w _text /proc/kallsyms").split()[0] == "c1000000"
        assert guest.shell("scenario module", check=True) == "scenario module tcp_yeah\n"
    finally:
        guest.stop()


def test_large_output_arrives_whole(lab_guest):
    # ~110 kB: more than a socket buffer; the emulated UART moves only some 30 kB/s under TCG.
    out = lab_guest.shell("seq 1 20000", timeout=120)
    assert out == "".join(f"{i}\n" for i in range(1, 20001))


@pytest.mark.slow
def test_kvm_request_falls_back_to_tcg_where_kvm_does_not_work(lab_guest_factory, monkeypatch):
    from vmwatch.lab import vm

    monkeypatch.setattr(vm, "KVM_GRACE", 8.0)
    guest = lab_guest_factory(accel="kvm", kaslr=False)
    try:
        kvm_on = guest.qmp().execute("query-kvm")["enabled"]
        assert guest.accel == ("kvm" if kvm_on else "tcg")
        assert guest.shell("echo up") == "up\n"
    finally:
        guest.stop()


@pytest.mark.slow
def test_a_killed_owner_leaves_no_guest_running(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from vmwatch.lab import process

    code = ("import os, signal\nfrom vmwatch.lab import LabConfig, LabGuest\n"
            "g = LabGuest.start(LabConfig(kaslr=False))\n"
            "print(g.pid, g.runtime_dir, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    owner = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert owner.returncode == -signal.SIGKILL, owner.stderr
    pid, runtime = owner.stdout.splitlines()[-1].split()  # after structlog lines
    deadline = time.monotonic() + 10
    while process.is_our_qemu(int(pid), Path(runtime)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process.is_our_qemu(int(pid), Path(runtime)), "QEMU outlived the process that started it"
    assert (Path(runtime) / "ram").exists()  # nobody cleaned up: the next start does
    process.remove_stale_runtime_dirs(min_age=0)
    assert not Path(runtime).exists()


@pytest.mark.slow
def test_guest_started_from_a_short_lived_thread_survives_it(lab_guest_factory):
    import threading

    box = []
    thread = threading.Thread(target=lambda: box.append(lab_guest_factory(kaslr=False)))
    thread.start()
    thread.join()
    guest = box[0]
    try:
        assert guest.alive and guest.shell("echo still") == "still\n"
    finally:
        guest.stop()
