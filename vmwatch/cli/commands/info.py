"""``vmwatch info IMAGE``: what a memory image holds (format facts, runs, registers, tags)."""

from __future__ import annotations

import argparse
import json
import os

from vmwatch.cli.commands._os_facts import as_lines, os_facts
from vmwatch.text import shown

HELP = "show a memory image's (or a live QEMU's) format, physical runs, registers and metadata"

_REG_ORDER = ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9",
              "r10", "r11", "r12", "r13", "r14", "r15", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
              "fs_base", "gs_base", "kernel_gs_base", "gdtr_base", "gdtr_limit", "idtr_base",
              "idtr_limit")  # fmt: skip
HEXDUMP_LIMIT = 256


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="memory image (format detected by content) or qemu:/path/to/qmp.sock")
    parser.add_argument("--verbose", "-v", action="store_true", help="hexdump tags longer than 8 bytes")
    parser.add_argument("--dump-dir", metavar="DIR", help="write the screenshot (PNG) and saved config here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--vmem", metavar="PATH", help="VMware: the file holding RAM (default: IMAGE.vmem)")
    parser.add_argument("--os", action="store_true",
                        help="also find the guest kernel (Linux or Windows) and say how each fact was found "
                             "(on by default for Windows crash dumps)")
    parser.add_argument("--symbols", metavar="FILE", help="with --os: a symbol file or profile, as for ps")


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.target import QEMU_PREFIX

    if args.image.startswith(QEMU_PREFIX):
        import trio

        return trio.run(_run_live, args, env)
    from vmwatch.images import open_image

    with open_image(args.image, vmem=args.vmem) as image:
        facts = None
        if args.os or image.format == "windows-crashdump":
            facts = os_facts(image, image.cpus, args.symbols)
        _print(image, args, env, facts)
    return 0


def _print(image, args: argparse.Namespace, env, facts: dict | None = None) -> None:
    dumped = dump_files(image, args.dump_dir) if args.dump_dir else []
    tables = kernel_tables(image)
    if args.json:
        doc = as_json(image, verbose=args.verbose, dumped=dumped, tables=tables)
        if facts is not None:
            doc["kernel"] = facts
        json.dump(doc, env.stdout, indent=2)
        env.stdout.write("\n")
    else:
        text = as_text(image, verbose=args.verbose, dumped=dumped, tables=tables)
        if facts is not None:
            text += "\n" + "\n".join(as_lines(facts)) + "\n"
        env.stdout.write(text)


def kernel_tables(image) -> dict | None:
    """For an aarch64 image whose CPU notes lack TTBR1_EL1/TCR_EL1: the kernel tables a scan finds
    (``found_by: scan``) or the scan's error; also for an aarch64 core without CPU notes. None
    for every other image."""
    arm = [c for c in image.cpus if getattr(c, "arch", None) == "aarch64"]
    bare = not image.cpus and (getattr(image, "metadata", None) or {}).get("machine") == "aarch64"
    if not bare and not any(c.tcr_el1 is None for c in arm):
        return None
    from vmwatch.errors import VmwatchError
    from vmwatch.os.linux.swapper import find_kernel_tables

    try:
        found = find_kernel_tables(image)
    except VmwatchError as exc:
        return {"found_by": "scan", "error": str(exc)}
    return {"found_by": "scan", "ttbr1": found.ttbr1, "tcr": found.tcr, "granule": 1 << found.granule,
            "va_bits": found.va_bits, "swapper_pg_dir": found.vaddr, "text": found.describe()}


async def _run_live(args: argparse.Namespace, env) -> int:
    """A live QEMU: its RAM map and the registers of every vCPU, read while briefly paused."""
    from vmwatch.target import open_target

    async with open_target(args.image) as target:
        vm = target.live
        status = await vm.status()
        cpus = await target.cpu_state()
        facts = os_facts(target.memory, cpus, args.symbols) if args.os else None
        _print(_LiveView(target.spec, target.memory, cpus, status, vm.arch), args, env, facts)
    return 0


class _LiveView:
    """What ``info`` prints, for a live guest: same shape as an Image."""

    format = "qemu-live"

    def __init__(self, spec: str, memory, cpus, status: str, arch: str | None) -> None:
        self.path = spec
        self.runs = tuple(memory.runs)
        self.size = max((r.start + r.size for r in self.runs), default=0)
        self.cpus = tuple(cpus)
        backing = getattr(memory, "path", None)
        self.metadata = {"status": status, "arch": arch, "ram_file": backing,
                         "reads": "shared RAM file (mmap)" if backing else "gdbstub"}

    def summary(self) -> list[tuple[str, str]]:
        return [("Status", self.metadata["status"]), ("Arch", self.metadata["arch"] or "unknown"),
                ("vCPUs", str(len(self.cpus))),
                ("RAM", self.metadata["ram_file"] or "read through the gdbstub")]


def as_json(image, *, verbose: bool = False, dumped: list[str] = (), tables: dict | None = None) -> dict:
    out = {
        "format": image.format,
        "path": image.path,
        "size": image.size,
        "runs": [{"start": r.start, "size": r.size, "file_offset": r.file_offset} for r in image.runs],
        "cpus": len(image.cpus),
        "registers": [c.as_dict() for c in image.cpus],
        "summary": dict(image.summary()),
        "metadata": image.metadata,
    }
    if tables is not None:
        out["kernel_tables"] = tables
    tags = getattr(image, "tags", None)
    if tags is not None:
        out["tags"] = [_tag_json(image, t, verbose) for t in tags]
    if dumped:
        out["dumped"] = list(dumped)
    return out


def _tag_json(image, tag, verbose: bool) -> dict:
    entry = {"name": tag.path, "data_offset": tag.data_offset, "data_size": tag.size}
    value = image.tag_value(tag)
    if value is not None:
        entry["value"] = value
    elif verbose and not tag.compressed:
        entry["hex"] = image.tag_bytes(tag, HEXDUMP_LIMIT).hex()
    if tag.compressed:
        entry["compressed"] = True
        entry["memory_size"] = tag.mem_size
    return entry


def as_text(image, *, verbose: bool = False, dumped: list[str] = (), tables: dict | None = None) -> str:
    # what the file says (paths, versions, tag names, config text) is escaped: one line stays one line
    lines = [f"Image: {shown(str(image.path))}", f"Type: {image.format}"]
    for label, text in image.summary():
        text = shown(text)
        # vboxinfo prints the version line bare ("VirtualBox 6.1.0 (revision N)")
        lines.append(text if label == "Version" and text.startswith("VirtualBox") else f"{label}: {text}")
    lines.append(f"Physical size: {image.size:#x}")
    lines.append("")
    lines += _table(("File Offset", "PhysMem Offset", "Size"),
                    [("(zeros)" if r.file_offset is None else f"{r.file_offset:#018x}",
                      f"{r.start:#018x}", f"{r.size:#018x}") for r in image.runs])
    for cpu in image.cpus:
        lines.append("")
        lines.append(f"CPU {cpu.vcpu}:")
        regs = cpu.as_dict()
        if getattr(cpu, "arch", None) == "aarch64":
            lines += _aarch64_lines(regs)
            continue
        cells = [f"{name.upper():>14}: {regs[name]:#018x}" for name in _REG_ORDER if name in regs]
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            if name in regs:
                seg = regs[name]
                cells.append(f"{name.upper():>14}: {seg['selector']:#06x} base {seg['base']:#x} limit {seg['limit']:#x}")
        lines += ["  " + "  ".join(cells[i:i + 3]) for i in range(0, len(cells), 3)]
        for msr, value in sorted(cpu.msrs.items()):
            lines.append(f"  {msr.upper():>14}: {value:#018x}")
    if not image.cpus:
        lines += ["", "No saved CPU registers in this image."]
    if tables is not None:
        lines += ["", f"Kernel page tables: {tables.get('text') or 'not found by scanning: ' + tables['error']}"]
    if verbose:
        lines += ["", "Metadata:"] + _metadata_lines(image.metadata)
    tags = getattr(image, "tags", None)
    if tags is not None:
        lines.append("")
        lines += _tag_table(image, tags, verbose)
    for path in dumped:
        lines.append(f"Wrote {path}")
    return "\n".join(lines) + "\n"


def _aarch64_lines(regs: dict) -> list[str]:
    """x0..x30 four to a line, then pc, sp, PSTATE with its EL, then the system registers."""
    lines = ["  " + "  ".join(f"{f'X{i}':>4}: {regs[f'x{i}']:#018x}" for i in range(row, min(row + 4, 31)))
             for row in range(0, 31, 4) if "x0" in regs]
    cells = [f"{name.upper():>14}: {value:#018x}" for name, value in regs.items()
             if name not in ("vcpu", "el") and not (name[0] == "x" and name[1:].isdigit())]
    if "el" in regs:
        cells.append(f"{'EL':>14}: {regs['el']}")
    return lines + ["  " + "  ".join(cells[i:i + 3]) for i in range(0, len(cells), 3)]


def _metadata_lines(metadata: dict) -> list[str]:
    """Scalars on one line each; lists and multi-line text (VMCOREINFO, .vmx) indented below."""
    lines = []
    for key, value in metadata.items():
        if value is None or value == [] or key == "segments":
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            hexy = any(hint in key for hint in ("magic", "version", "base", "block", "code", "machine", "size"))
            lines.append(f"  {key}: {value:#x}" if hexy else f"  {key}: {value}")
        elif isinstance(value, str) and "\n" in value:
            lines.append(f"  {key}:")
            lines += [f"    {shown(line)}" for line in value.splitlines()]
        elif isinstance(value, list):
            lines.append(f"  {key}: {shown(', '.join(map(str, value)))}")
        else:
            lines.append(f"  {key}: {shown(str(value))}")
    return lines


def _tag_table(image, tags, verbose: bool) -> list[str]:
    lines = [f"{'DataOffset':>12} {'DataSize':>10} {'Name':<50} Value",
             f"{'-' * 12} {'-' * 10} {'-' * 50} -----"]
    for tag in tags:
        value = image.tag_value(tag)
        if value is not None:
            value_text = str(value) if tag.size <= 2 and value < 10000 else f"{value:#x}"
        else:
            value_text = "(compressed)" if tag.compressed else ""
        lines.append(f"{tag.data_offset:#012x} {tag.size:#10x} {shown(tag.path):<50} {value_text}".rstrip())
        if verbose and value is None and not tag.compressed and tag.size and tag.path != "memory/Memory[0][0]":
            data = image.tag_bytes(tag, HEXDUMP_LIMIT)
            for i in range(0, len(data), 16):
                row = data[i:i + 16]
                text = "".join(chr(b) if 32 < b < 127 else "." for b in row)
                lines.append(f"{tag.data_offset + i:#012x}  {row.hex(' '):<47}   {text}")
            if tag.size > HEXDUMP_LIMIT:
                lines.append("[snip]")
    return lines


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = " ".join(f"{{:<{w}}}" for w in widths)
    return [line.rstrip() for line in [fmt.format(*header), " ".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows]]


def dump_files(image, directory: str) -> list[str]:
    """Write what the image carries besides memory (VMware: screenshot PNG, .vmx config)."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.splitext(os.path.basename(image.path))[0]
    written = []
    screenshot = getattr(image, "screenshot", lambda: None)()
    if screenshot:
        path = os.path.join(directory, f"{base}.png")
        with open(path, "wb") as f:
            f.write(screenshot)
        written.append(path)
    config = getattr(image, "config", lambda: None)()
    if config:
        path = os.path.join(directory, f"{base}.vmx")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        written.append(path)
    return written
