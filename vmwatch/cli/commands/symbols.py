"""``vmwatch symbols export TARGET -o FILE.json``: a Volatility 3 ISF built from the guest itself."""

from __future__ import annotations

import argparse

from vmwatch.cli.commands._linux import with_linux

HELP = "export a Volatility 3 symbol table (ISF JSON) from a Linux guest's own BTF and kallsyms"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = sub.add_parser("export", help=HELP, description=HELP)
    export.add_argument("target", metavar="TARGET", help="memory image path, or qemu:/path/to/qmp.sock")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="where to write the ISF (.json, or .json.xz to compress)")
    export.add_argument("--symbols", metavar="FILE", help="symbol file for kernels without BTF")


def run(args: argparse.Namespace, env) -> int:
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
