"""``vmwatch lab start|stop|status|shell|symbols``: a small real Linux guest under QEMU to try vmwatch on.

``start`` leaves QEMU running in the background and records it in a state file in the per-user
runtime directory; the other actions find it there.
"""

from __future__ import annotations

import argparse
import json

HELP = "start, stop, inspect or run commands in the lab guest (QEMU + Debian kernel + busybox)"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    start = actions.add_parser("start", help="boot the lab guest in the background; prints its qemu: target")
    start.add_argument("--arch", default="amd64", choices=["amd64", "686", "686-pae", "arm64"],
                       help="guest kernel flavour (default amd64)")
    start.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    start.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    start.add_argument("--cpu-model", help="QEMU -cpu model, e.g. qemu64,+la57 for 5-level paging")
    start.add_argument("--accel", default="tcg", choices=["tcg", "kvm"],
                       help="tcg (default) or kvm (falls back to tcg where KVM does not work)")
    start.add_argument("--no-shared-ram", action="store_true",
                       help="plain guest RAM (vmwatch then reads memory through the gdbstub, slowly)")
    start.add_argument("--no-kaslr", action="store_true",
                       help="no KASLR (x86: the uncompressed kernel through PVH, faster under TCG; arm64: nokaslr)")
    start.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the boot")
    symbols = actions.add_parser("symbols", help="print the path of the lab kernel's -dbg vmlinux, for --symbols "
                                                "(downloaded once, ~760 MB; only the vmlinux is kept)")
    symbols.add_argument("--arch", default="686-pae", choices=["amd64", "686", "686-pae"],
                         help="guest kernel flavour (default 686-pae)")
    actions.add_parser("stop", help="stop the lab guest")
    status = actions.add_parser("status", help="show the running lab guest")
    status.add_argument("--json", action="store_true", help="print JSON")
    shell = actions.add_parser("shell", help="run a command in the guest's root shell")
    shell.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the command")
    shell.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.lab.vm import LabGuest, default_state_file

    state_file = default_state_file()
    if args.action == "start":
        return _start(args, env, state_file)
    if args.action == "symbols":
        from vmwatch.lab.kernel import ensure_kernel

        print(ensure_kernel(args.arch).debug_vmlinux(), file=env.stdout)
        return 0
    guest = LabGuest.attach(state_file)
    try:
        return _act(args, env, guest, state_file)
    finally:
        guest.close()


def _act(args: argparse.Namespace, env, guest, state_file) -> int:
    from vmwatch.errors import LabError

    if args.action == "stop":
        guest.stop()
        state_file.unlink(missing_ok=True)
        print(f"stopped lab guest (pid {guest.pid})", file=env.stdout)
        return 0
    if not guest.alive:
        state_file.unlink(missing_ok=True)
        raise LabError(f"the lab guest (pid {guest.pid}) is no longer running; state file removed")
    if args.action == "status":
        return _status(args, env, guest)
    if not args.command:
        raise LabError("lab shell needs a command, e.g. vmwatch lab shell cat /proc/version")
    status, output = guest.shell_status(" ".join(args.command), timeout=args.timeout)
    env.stdout.write(output)
    return status


def _start(args: argparse.Namespace, env, state_file) -> int:
    from vmwatch.errors import LabError
    from vmwatch.lab.vm import LabConfig, LabGuest, kvm_usable

    if state_file.exists():
        try:
            running = LabGuest.attach(state_file)
        except LabError:
            running = None
        if running is not None and running.alive:
            raise LabError(f"a lab guest is already running (pid {running.pid}, {running.target}); "
                           "stop it with: vmwatch lab stop")
        state_file.unlink(missing_ok=True)
    config = LabConfig(arch=args.arch, memory=args.memory, cpus=args.cpus, cpu_model=args.cpu_model,
                       accel=args.accel, shared_ram=not args.no_shared_ram, kaslr=not args.no_kaslr)
    if args.accel == "kvm" and (why := kvm_usable()):
        print(f"warning: KVM is not usable ({why}); falling back to TCG (slower)", file=env.stderr)
    guest = LabGuest.start(config, timeout=args.timeout, detached=True)
    if args.accel == "kvm" and guest.accel != "kvm" and not kvm_usable():
        print("warning: KVM did not run the guest here; it runs under TCG (slower)", file=env.stderr)
    guest.save_state(state_file)
    guest.detach()
    print(f"lab guest up in {guest.boot_seconds:.1f} s: kernel {guest.kernel_release}, pid {guest.pid}",
          file=env.stderr)
    print(guest.target, file=env.stdout)
    return 0


def _status(args: argparse.Namespace, env, guest) -> int:
    info = {
        "pid": guest.pid, "status": guest.status(), "target": guest.target, "accel": guest.accel,
        "arch": guest.config.arch, "memory": guest.config.memory, "cpus": guest.config.cpus,
        "cpu_model": guest.config.cpu_model or guest.config.board.cpu_model,
        "machine": guest.config.machine or guest.config.board.machine, "kernel_release": guest.kernel_release,
        "kernel_dir": str(guest.kernel_dir), "runtime_dir": str(guest.runtime_dir),
        "ram_file": str(guest.ram_path) if guest.ram_path else None,
    }
    if args.json:
        print(json.dumps(info, indent=1), file=env.stdout)
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}", file=env.stdout)
    return 0
