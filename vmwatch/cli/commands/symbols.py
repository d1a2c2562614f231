"""``vmwatch symbols export TARGET -o FILE``: the guest's own symbols and types for other tools.

``--format isf`` (the default for ``.json``/``.json.xz``): a Volatility 3 ISF from BTF + kallsyms.
``--format elf`` (the default for ``.sym``/``.elf``): an ELF symbol file for gdb's ``symbol-file``,
kallsyms with the KASLR slide applied; needs no BTF.
"""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import with_linux

HELP = ("export a Linux guest's own symbols: a Volatility 3 ISF (BTF + kallsyms) or an ELF symbol "
        "file for gdb (kallsyms, KASLR applied)")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = sub.add_parser("export", help=HELP, description=HELP)
    export.add_argument("target", metavar="TARGET", help="memory image path, or qemu:/path/to/qmp.sock")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="where to write it (.json or .json.xz: ISF; .sym or .elf: ELF for gdb)")
    export.add_argument("--format", choices=("isf", "elf"),
                        help="isf (Volatility 3) or elf (gdb symbol-file); default from the file's suffix")
    export.add_argument("--symbols", metavar="FILE", help="symbol file for kernels without BTF")


def run(args: argparse.Namespace, env) -> int:
    fmt = args.format or ("elf" if args.output.endswith((".sym", ".elf")) else "isf")
    return _export_elf(args, env) if fmt == "elf" else _export_isf(args, env)


def _export_elf(args: argparse.Namespace, env) -> int:
    from vmwatch.os.linux.elfsyms import export_elf
    from vmwatch.text import shown

    def work(linux, _registers):
        return export_elf(linux.symbols, aarch64=linux.arch == "aarch64"), len(linux.symbols), linux.kernel

    data, count, kernel = with_linux(args, work)
    with open(args.output, "wb") as out:
        out.write(data)
    env.stdout.write(f"{args.output}: {count} symbols for {shown(kernel.release)} (KASLR slide {kernel.slide:#x}); "
                     f"in gdb: symbol-file {args.output}\n")
    return 0


def _export_isf(args: argparse.Namespace, env) -> int:
    import json
    import lzma

    from vmwatch.errors import SymbolError
    from vmwatch.os.linux.btf import BtfProfile
    from vmwatch.os.linux.isf import export_isf

    def work(linux, _registers):
        if not isinstance(linux.types, BtfProfile):
            raise SymbolError("ISF export needs the kernel's BTF (this profile came from a symbol file)")
        banner = linux.memory.cstring(linux.symbols["linux_banner"], 512).encode() + b"\0"
        return export_isf(linux.types, linux.symbols, slide=linux.kernel.slide, banner=banner), linux.kernel

    doc, kernel = with_linux(args, work)
    opener = lzma.open if args.output.endswith(".xz") else open
    with opener(args.output, "wt") as out:
        json.dump(doc, out, separators=(",", ":"))
    from vmwatch.text import shown

    env.stdout.write(f"{args.output}: {len(doc['user_types'])} types, {len(doc['enums'])} enums, "
                     f"{len(doc['symbols'])} symbols for {shown(kernel.release)}\n")  # the guest's banner
    return 0
