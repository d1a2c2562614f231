"""The lab guest's initramfs: static busybox, an /init that gives a root shell on the serial console,
and /scenario, a script of named actions (benign and suspicious) that rules can observe.

Built in Python (newc cpio + gzip) and cached by content hash, so a second boot reuses it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from pathlib import Path

from vmwatch.errors import LabError
from vmwatch.lab import cpio
from vmwatch.lab.cache import cache_dir
from vmwatch.lab.fault_program import fault_program
from vmwatch.lab.kernel import ARCHES, KernelPackage

READY = "vmwatch-lab-ready"
"""Printed by the guest's shell once, right before its first prompt."""

SCENARIO_MODULE = "tcp_yeah"
"""Loaded by ``scenario module``: small, hardware-free, and it needs another module (tcp_vegas)."""

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Keep printk off the serial console: the host parses what the shell prints there.
dmesg -n 1
# A hardened baseline that `scenario sysctl` then weakens.
echo 1 > /proc/sys/kernel/kptr_restrict
echo 1 > /proc/sys/kernel/dmesg_restrict
hostname vmwatch-lab
export HOME=/root ENV=/etc/shrc
# setsid + cttyhack: the shell gets the serial port as its controlling terminal (job control, ^C).
while true; do setsid cttyhack sh; echo "vmwatch-lab: shell exited, restarting"; done
"""

_SHRC = rf"""# No echo and canonical input: busybox then reads plain lines (no line editor), and output
# bytes reach the host unchanged (no CR added).
stty -echo -onlcr 2>/dev/null
# No prompts: they would land between the host's output markers.
PS1='' PS2=''
if [ ! -e /run/lab-ready ]; then
    : > /run/lab-ready
    echo "{READY} $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
fi
"""

_SCENARIO = r"""#!/bin/sh
# Named actions of the vmwatch lab guest. Usage: scenario ACTION [ARG]
# Each prints one line "scenario ACTION ..." with what it did, so tests can check the truth.
mods=/lab/modules
action=${1:-help}
case "$action" in
procs)      # short-lived processes that start and exit
    n=${2:-10}; i=0
    while [ $i -lt $n ]; do /bin/true; sh -c 'exit 0'; i=$((i + 1)); done
    echo "scenario procs $((n * 2))" ;;
sleeper)    # a process that stays (prints its pid)
    sleep "${2:-600}" </dev/null >/dev/null 2>&1 &
    echo "scenario sleeper $!" ;;
writes)     # N one-byte write syscalls; prints the elapsed time in centiseconds
    n=${2:-100000}
    t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    dd if=/dev/zero of=/dev/null bs=1 count="$n" 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    echo "scenario writes $n cs $((t1 - t0))" ;;
busy)       # busy start|stop: an endless write loop in the background
    if [ "$2" = stop ]; then
        [ -e /run/busy.pid ] && kill "$(cat /run/busy.pid)" && rm /run/busy.pid
        echo "scenario busy stopped"
    else
        dd if=/dev/zero of=/dev/null bs=1 </dev/null >/dev/null 2>&1 &
        echo $! > /run/busy.pid
        echo "scenario busy $!"
    fi ;;
module)     # load a kernel module from the Debian package, dependencies first
    for ko in $(ls $mods); do insmod "$mods/$ko" || exit 1; done
    echo "scenario module $(ls $mods | tail -1 | sed 's/^[0-9]*-//; s/\.ko$//')" ;;
unmodule)
    for ko in $(ls $mods | sort -r); do rmmod "$(echo "$ko" | sed 's/^[0-9]*-//; s/\.ko$//')"; done
    echo "scenario unmodule" ;;
sysctl)     # weaken security sysctls: expose kernel pointers, hijack the modprobe helper path
    old=$(cat /proc/sys/kernel/kptr_restrict)
    echo 0 > /proc/sys/kernel/kptr_restrict
    echo /tmp/.x/modprobe > /proc/sys/kernel/modprobe
    echo "scenario sysctl kptr_restrict $old->$(cat /proc/sys/kernel/kptr_restrict) modprobe $(cat /proc/sys/kernel/modprobe)" ;;
unsysctl)
    echo 1 > /proc/sys/kernel/kptr_restrict
    echo /sbin/modprobe > /proc/sys/kernel/modprobe
    echo "scenario unsysctl" ;;
creds)      # a process that changes its credentials (root -> uid 1000)
    echo "scenario creds $(su -s /bin/sh lab -c 'id -u')" ;;
fault)      # fault ud|gp|pf: one CPU exception from user mode (vmwatch/lab/fault_program.py; amd64 only)
    /bin/fault "$2"
    echo "scenario fault $2 status $?" ;;
dropper)    # run a program copied to a hidden directory in /tmp
    mkdir -p /tmp/.x && cp /bin/busybox /tmp/.x/sh
    /tmp/.x/sh -c 'exit 0'
    echo "scenario dropper /tmp/.x/sh" ;;
benign)
    scenario procs 5 && scenario sleeper 1 && scenario writes 1000 ;;
suspicious)
    scenario module && scenario sysctl && scenario creds && scenario dropper ;;
*)
    echo "usage: scenario procs [N]|sleeper [S]|writes [N]|busy [start|stop]|module|unmodule|sysctl|unsysctl|creds|fault ud/gp/pf|dropper|benign|suspicious"
    exit 2 ;;
esac
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1000:lab:/home/lab:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
_GROUP = "root:x:0:\nlab:x:1000:\nnogroup:x:65534:\n"


def build_initramfs(kernel: KernelPackage, busybox: Path, *, cache: Path | None = None) -> Path:
    """The gzip'd newc initramfs for ``kernel`` (cached by the hash of everything inside)."""
    try:
        busybox_bytes = busybox.read_bytes()
    except OSError as exc:
        raise LabError(f"cannot read busybox at {busybox} (install busybox-static): {exc}") from exc
    if busybox_bytes[:4] != b"\x7fELF":
        raise LabError(f"{busybox} is not an ELF executable")
    modules = kernel.module_with_deps(SCENARIO_MODULE)
    entries = _entries(busybox_bytes, modules)
    if ARCHES[kernel.arch][1] == "amd64":
        entries.append(cpio.file("bin/fault", fault_program(), 0o755))
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(repr((entry.name, entry.mode, entry.rdev)).encode())
        digest.update(hashlib.sha256(entry.data).digest())
    out_dir = (cache or cache_dir()) / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kernel.release}-{digest.hexdigest()[:16]}.cpio.gz"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(gzip.compress(cpio.newc(entries), compresslevel=6, mtime=0))
        os.replace(tmp, path)
    return path


def _entries(busybox: bytes, modules: list[tuple[str, bytes]]) -> list[cpio.Entry]:
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "home", "lab", "lab/modules",
                                           "proc", "root", "run", "sys", "tmp")]
    entries[entries.index(cpio.directory("tmp"))] = cpio.directory("tmp", 0o1777)
    entries += [
        cpio.Entry("home/lab", stat.S_IFDIR | 0o755, uid=1000, gid=1000),
        # The kernel opens /dev/console for init before devtmpfs is mounted.
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, 0o666),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", _INIT.encode(), 0o755),
        cpio.file("bin/scenario", _SCENARIO.encode(), 0o755),
        cpio.symlink("scenario", "bin/scenario"),
        cpio.file("etc/shrc", _SHRC.encode()),
        cpio.file("etc/passwd", _PASSWD.encode()),
        cpio.file("etc/group", _GROUP.encode()),
    ]
    for index, (name, data) in enumerate(modules, start=1):
        entries.append(cpio.file(f"lab/modules/{index:02d}-{name}.ko", data))
    return entries
