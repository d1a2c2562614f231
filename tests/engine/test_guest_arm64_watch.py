"""The shipped packs (security, timeline) watching the live arm64 lab guest (TCG, gdbstub breakpoints and
watchpoints only), against what the guest itself shows: its shell's pids and exit statuses,
/proc/modules, /proc/kallsyms, and what a syscall returns while its table entry is changed.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from vmwatch.engine import SqliteSink
from vmwatch.rules import Severity
from vmwatch.testing.arm64truth import hmp_words, kallsyms, kernel_text_paddr

from test_guest_live import SLOW, Watcher, tampered

pytestmark = pytest.mark.guest

X86_RULES = ("security.idt", "security.control_register_state", "security.syscall_msr")
NR_GETPID = 172
"""asm-generic/unistd.h, which arm64 uses: getpid 172, getppid 173."""
FTRACE_ENTRY = 0xAA1E03E9
"""``mov x9, x30``: the first word of every ftrace-patched function while tracing is off."""


@pytest.fixture(scope="module")
def arm64_watcher(arm64_guest, tmp_path_factory):
    # kallsyms reads below expose pointers (kptr_restrict 0): make that the baseline, not a finding
    arm64_guest.shell("scenario unmodule 2>/dev/null; scenario busy stop 2>/dev/null; "
                      "echo 0 > /proc/sys/kernel/kptr_restrict", timeout=SLOW)
    db = tmp_path_factory.mktemp("arm64-watch") / "timeline.db"
    w = Watcher(arm64_guest, [SqliteSink(db, batch=1)])
    w.db = db
    w.start()
    yield w
    summary = w.stop()
    assert summary is not None and not summary.rule_errors, summary


def test_x86_rules_set_aside_in_one_line_each(arm64_watcher, arm64_guest) -> None:
    """IDT, CR0/CR4 and MSR rules: one inactive line each naming aarch64; no x86 sensor planned; the
    sensors' functions keep their own code (gdbstub breakpoints, no inline hook patched them)."""
    inactive = arm64_watcher.engine.summary.inactive
    for name in X86_RULES:
        lines = [line for line in inactive if line.startswith(f"rule {name}:")]
        assert len(lines) == 1 and "x86 only, the guest is aarch64" in lines[0], inactive
    assert not [line for line in inactive if line.startswith(("register:", "interrupt:", "exception:"))]
    entries = kallsyms(arm64_guest, "wake_up_new_task", "begin_new_exec", "do_exit", "do_init_module")
    assert len(entries) == 4
    words = [hmp_words(arm64_guest, kernel_text_paddr(arm64_guest, address), 1, "w", physical=True)[0]
             for address in entries.values()]
    assert words == [FTRACE_ENTRY] * 4


def test_program_start_exec_exit_and_module_load(arm64_watcher, arm64_guest) -> None:
    """A program the guest runs: its start (parent = its own $PPID), exec of /bin/busybox, exit status 7
    as the shell saw it; the scenario's modules with /proc/modules' bases and sizes; the same rows in
    the SQLite timeline."""
    w = arm64_watcher
    mark = w.mark()
    out = arm64_guest.shell("sh -c 'echo child $$ $PPID; exec /bin/busybox sh -c \"exit 7\"'; echo status $?",
                            timeout=SLOW)
    facts = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()}
    (child, parent), (status,) = map(int, facts["child"]), map(int, facts["status"])
    assert status == 7
    arm64_guest.shell("scenario module", timeout=SLOW, check=True)
    try:
        proc_modules = {f[0]: (int(f[1]), int(f[5], 16)) for f in
                        (line.split() for line in arm64_guest.shell("cat /proc/modules", check=True).splitlines())}
        w.wait_for("timeline.module_load", mark, severity=Severity.INFO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alerts = [a for a in w.sink.alerts[mark:] if a.pid == child or a.rule == "timeline.module_load"]
            if {"timeline.process_start", "timeline.process_exec", "timeline.process_exit"} <= {a.rule for a in alerts} \
                    and len([a for a in alerts if a.rule == "timeline.module_load"]) >= 2:
                break
            time.sleep(0.2)
    finally:
        arm64_guest.shell("scenario unmodule", timeout=SLOW)
    by_rule = {a.rule: a for a in alerts}
    assert by_rule["timeline.process_start"].details["ppid"] == parent
    assert "/bin/busybox" in [a.details["filename"] for a in alerts if a.rule == "timeline.process_exec"]
    assert by_rule["timeline.process_exit"].message.endswith(f"exited with status {status}")
    loads = {a.details["module"]: (a.details["size"], int(a.details["base"], 16)) for a in alerts
             if a.rule == "timeline.module_load"}
    assert loads == {name: proc_modules[name] for name in ("tcp_vegas", "tcp_yeah")}
    rows = sqlite3.connect(w.db).execute("SELECT kind, details FROM events WHERE pid = ?", (child,)).fetchall()
    assert {"ProcessStart", "Exec", "ProcessExit"} <= {kind for kind, _ in rows}
    exits = [json.loads(details) for kind, details in rows if kind == "ProcessExit"]
    assert [e["exit_code"] >> 8 for e in exits] == [status]
    allowlist = [a.message for a in w.serious_since(mark) if a.rule == "security.module_allowlist"]
    assert sorted(allowlist) == ["module tcp_vegas loaded (not in the allowlist)",
                                 "module tcp_yeah loaded (not in the allowlist)"]


def test_syscall_table_entry_changed_from_outside(arm64_watcher, arm64_guest) -> None:
    """sys_call_table[getpid] pointed at getppid's handler (the guest's own $$ then equals its $PPID):
    a critical alert naming both handlers at /proc/kallsyms' addresses; restored, the guest is itself again."""
    w = arm64_watcher
    truth = kallsyms(arm64_guest, "__arm64_sys_getpid", "__arm64_sys_getppid")
    slot = lambda linux, source: linux.memory.translate(linux.symbols["sys_call_table"] + 8 * NR_GETPID)  # noqa: E731
    hook = lambda linux, original: truth["__arm64_sys_getppid"].to_bytes(8, "little")  # noqa: E731
    mark = w.mark()
    with tampered(w, slot, 8, hook):
        seen = arm64_guest.shell("sh -c 'echo $$ $PPID'", timeout=SLOW).split()
        hits = w.wait_for("security.syscall_table", mark, severity=Severity.CRITICAL)
    restored = arm64_guest.shell("sh -c 'echo $$ $PPID'", timeout=SLOW).split()
    assert seen[0] == seen[1] and restored[0] != restored[1]
    message = hits[0].message
    assert message.startswith(f"sys_call_table[{NR_GETPID}] changed: ")
    assert f"__arm64_sys_getpid ({truth['__arm64_sys_getpid']:#x})" in message
    assert f"__arm64_sys_getppid ({truth['__arm64_sys_getppid']:#x})" in message


def test_security_sysctls_weakened(arm64_watcher, arm64_guest) -> None:
    """dmesg_restrict and mmap_min_addr lowered, the modprobe helper redirected (variables found from
    their ctl_table entries, kallsyms has no data; mmap_min_addr's entry names dac_mmap_min_addr):
    warnings with the values the guest's /proc/sys showed, and no sysctl check set aside."""
    w = arm64_watcher
    assert not [line for line in w.engine.summary.inactive if "sysctl" in line or "mmap_min_addr" in line], \
        w.engine.summary.inactive
    files = {"dmesg_restrict": "/proc/sys/kernel/dmesg_restrict", "mmap_min_addr": "/proc/sys/vm/mmap_min_addr",
             "modprobe": "/proc/sys/kernel/modprobe"}
    old = {name: arm64_guest.shell(f"cat {path}", check=True).strip() for name, path in files.items()}
    assert int(old["dmesg_restrict"]) > 0 and int(old["mmap_min_addr"]) > 0, old
    mark = w.mark()
    arm64_guest.shell(f"echo 0 > {files['dmesg_restrict']}; echo 0 > {files['mmap_min_addr']}; "
                      f"echo /tmp/.x/modprobe > {files['modprobe']}", check=True)
    try:
        new = {name: arm64_guest.shell(f"cat {path}", check=True).strip() for name, path in files.items()}
        w.wait_for("security.security_sysctl", mark)
        messages = w.serious_messages("security.security_sysctl", mark, 3)  # strings: once two checks agree
    finally:
        arm64_guest.shell(f"echo {old['dmesg_restrict']} > {files['dmesg_restrict']}; "
                          f"echo {old['mmap_min_addr']} > {files['mmap_min_addr']}; "
                          f"echo {old['modprobe']} > {files['modprobe']}", check=True)
    assert new["mmap_min_addr"] == "0", new
    assert sorted(messages) == [f"sysctl kernel.dmesg_restrict weakened: {old['dmesg_restrict']} -> {new['dmesg_restrict']}",
                        f"sysctl kernel.modprobe weakened: '{old['modprobe']}' -> '{new['modprobe']}'",
                        f"sysctl vm.mmap_min_addr weakened: {old['mmap_min_addr']} -> {new['mmap_min_addr']}"]

