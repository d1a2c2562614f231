"""``vmwatch demo``: boot the lab guest, act inside it, and watch vmwatch catch what is suspicious.

The story on screen: provision and boot a small real Linux VM, attach to it from the outside,
run the shipped security and timeline packs, then play a scenario of benign actions (which must
stay quiet) and suspicious ones (each of which a rule should catch), showing alerts as they
arrive. It ends with a table step by step: what was done, what vmwatch said, and whether that is
what a defender would want. Everything also lands in the SQLite timeline.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import attrs

HELP = "boot the lab guest, run a benign+suspicious scenario, show vmwatch's alerts live, then a summary"


@attrs.frozen
class Step:
    title: str
    command: str | None
    """Run in the guest's root shell, or None for a tamper done from outside."""
    expect: str | None
    """The rule that should fire (``security.x``), or None: this step must stay quiet."""
    explain: str


STEPS = (
    Step("benign activity", "scenario benign", None,
         "short-lived processes, a sleeper, 1,000 write() calls: normal life, must raise nothing"),
    Step("drop a user to uid 1000", "scenario creds", None,
         "su from root to an ordinary user: a legitimate credential change, must stay quiet"),
    Step("load a kernel module", "scenario module", "security.module_allowlist",
         "tcp_vegas + tcp_yeah were not loaded at start: not in the allowlist"),
    Step("weaken security sysctls", "scenario sysctl", "security.security_sysctl",
         "kptr_restrict 1 -> 0 and the modprobe helper path redirected to /tmp"),
    Step("run a program from a hidden /tmp directory", "scenario dropper", "security.exec_from_scratch_dir",
         "a copy of busybox executed as /tmp/.x/sh, typical of droppers"),
    Step("hook a system call (simulated rootkit, from outside)", None, "security.syscall_table",
         "vmwatch overwrites sys_call_table[getpid] with another kernel function, then restores it"),
)


def default_store() -> Path:
    """The embedded default timeline: ``$VMWATCH_DB``, else ``$XDG_DATA_HOME/vmwatch/timeline.db``."""
    if explicit := os.environ.get("VMWATCH_DB"):
        return Path(explicit)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vmwatch"
    base.mkdir(parents=True, exist_ok=True)
    return base / "timeline.db"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="FILE", help="timeline database (default: the embedded store, "
                                                     "$VMWATCH_DB or ~/.local/share/vmwatch/timeline.db)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="S",
                        help="seconds to wait after each step for periodic checks (default 3)")


def run(args: argparse.Namespace, env) -> int:
    import trio

    from vmwatch.cli.alertview import make_console
    from vmwatch.lab import LabGuest

    console = make_console(env.stdout)
    db = Path(args.db) if args.db else default_store()
    console.print("[bold]vmwatch demo[/bold]: a real Linux VM watched from the outside, no agent inside.")
    console.print("1. provisioning and booting the lab guest (Debian kernel + busybox; first run downloads "
                  "and caches the kernel)...")
    with console.status("booting"):
        guest = LabGuest.start()
    try:
        console.print(f"   booted Linux {guest.kernel_release} in {guest.boot_seconds:.1f} s "
                      f"(QEMU {guest.accel.upper()}, {guest.config.memory} RAM)")
        outcome = trio.run(_demo, guest, console, db, args.settle)
    finally:
        guest.stop()
    return 0 if outcome else 1


async def _demo(guest, console, db: Path, settle: float) -> bool:
    import trio

    from vmwatch.cli.alertview import ScreenSink, print_summary
    from vmwatch.engine.pump import Engine
    from vmwatch.engine.sinks import SqliteSink
    from vmwatch.engine.sources import source_for
    from vmwatch.rules import RuleSet
    from vmwatch.target import open_target

    ruleset = RuleSet.load(["security", "timeline"])
    screen = ScreenSink(console)
    console.print(f"2. attaching to {guest.target} and arming the security and timeline packs "
                  f"({len(ruleset.active())} rules)...")
    marks: list[int] = []
    async with open_target(guest.target, writable=True) as target:
        engine = Engine(source_for(target), ruleset, [screen, SqliteSink(db)])
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await _wait_armed(engine)
            console.print(f"   armed {engine.summary.traps} traps; alerts appear below as they arrive "
                          "(info lines are the process timeline)")
            console.print("3. the scenario:")
            for number, step in enumerate(STEPS, 1):
                marks.append(len(screen.alerts))
                console.print(f"\n[bold]-- step {number}/{len(STEPS)}: {step.title}[/bold]  ({step.explain})")
                if step.command is not None:
                    await trio.to_thread.run_sync(guest.shell, step.command, 60.0)
                else:
                    await _hook_syscall(engine, target, console, settle)
                await trio.sleep(settle)
            marks.append(len(screen.alerts))
            await trio.to_thread.run_sync(guest.shell, "scenario unsysctl; scenario unmodule", 60.0)
            engine.stop()
    summary = engine.summary
    print_summary(console, summary, screen.alerts, db=str(db), title="demo summary")
    return _verdicts(console, screen.alerts, marks)


async def _wait_armed(engine) -> None:
    import trio

    while engine.summary.traps == 0 and not engine.summary.inactive:
        await trio.sleep(0.05)
    await trio.sleep(0.5)


async def _hook_syscall(engine, target, console, settle: float) -> None:
    """Overwrite sys_call_table[__NR_getpid] with the address of sys_getppid, wait, restore."""
    import trio

    linux = engine.guest.linux
    memory = linux.memory
    table = linux.symbols["sys_call_table"]
    nr_getpid = 39
    slot = table + 8 * nr_getpid
    original = memory.read(slot, 8)
    evil = linux.symbols["__x64_sys_getppid"].to_bytes(8, "little")
    console.print(f"   writing {int.from_bytes(evil, 'little'):#x} into sys_call_table[{nr_getpid}] "
                  f"at {slot:#x} (was {int.from_bytes(original, 'little'):#x})")
    async with engine.guest_stopped():
        memory.write(slot, evil)
    await trio.sleep(settle)
    async with engine.guest_stopped():
        memory.write(slot, original)
    console.print("   restored the original entry")


def _verdicts(console, alerts, marks: list[int]) -> bool:
    from rich.table import Table

    from vmwatch.rules import Severity

    table = Table(title="what happened, step by step")
    table.add_column("#", justify="right")
    table.add_column("action")
    table.add_column("vmwatch said (warning and above)")
    table.add_column("verdict")
    good = True
    for number, step in enumerate(STEPS, 1):
        window = alerts[marks[number - 1]:marks[number]]
        serious = [a for a in window if a.severity >= Severity.WARNING]
        said = "\n".join(sorted({f"{a.rule}: {a.message}" for a in serious})[:4]) or "nothing"
        if step.expect is None:
            ok = not serious
            verdict = "[green]quiet, as it should be[/green]" if ok else "[red]false alarm[/red]"
        else:
            ok = any(a.rule == step.expect for a in serious)
            verdict = "[green]detected[/green]" if ok else f"[red]missed ({step.expect} silent)[/red]"
        good &= ok
        table.add_row(str(number), step.title, said, verdict)
    console.print(table)
    console.print("[bold green]all suspicious steps detected, no false alarms[/bold green]" if good
                  else "[bold red]some steps did not go as expected (see above)[/bold red]")
    return good
