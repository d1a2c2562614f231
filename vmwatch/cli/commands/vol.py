"""``vmwatch vol TARGET PLUGIN [ARGS...]``: a Volatility 3 plugin with vmwatch as its memory.

Any target vmwatch opens (live qemu: guests, VirtualBox cores, .vmsn, ...) becomes Volatility's
physical layer; for Linux guests the ISF comes from the guest's own BTF and kallsyms (cached).
"""

from __future__ import annotations

import argparse
import sys

from vmwatch.cli.commands._linux import with_linux

HELP = "run a Volatility 3 plugin (linux.pslist, ...) on any target vmwatch reads, live guests included"
RENDERERS = {"quick": "QuickTextRenderer", "pretty": "PrettyTextRenderer", "json": "JsonRenderer"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="memory image path, or qemu:/path/to/qmp.sock")
    parser.add_argument("plugin", metavar="PLUGIN", help="Volatility plugin, e.g. linux.pslist")
    parser.add_argument("plugin_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the plugin's own arguments (--pid 1 ...), and --renderer/--no-pause/--symbols")


def _own_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # Options may follow the plugin name (REMAINDER keeps them): pull out vmwatch's own.
    own = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    own.add_argument("--renderer", choices=tuple(RENDERERS), default="quick")
    own.add_argument("--no-pause", action="store_true")
    own.add_argument("--symbols")
    return own.parse_known_args(argv)


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.errors import VolatilityError

    try:
        own, plugin_argv = _own_options(args.plugin_args)
    except argparse.ArgumentError as exc:
        raise VolatilityError(str(exc)) from exc
    from vmwatch.bridges import volatility as bridge

    options = bridge.plugin_options(args.plugin, plugin_argv)  # bad plugin or args fail before the target opens
    args.symbols = own.symbols
    if own.no_pause and args.target.startswith("qemu:"):
        print("vmwatch: warning: reading a running guest: lists may change under the plugin", file=env.stderr)

    import logging
    import warnings

    logging.getLogger("volatility3").setLevel(logging.ERROR)  # its automagic chatter is not ours to print
    warnings.filterwarnings("ignore", category=FutureWarning, module="volatility3")

    def work(linux, _registers):
        isf = own.symbols if own.symbols and own.symbols.endswith((".json", ".json.xz")) else None
        context, layer, table = bridge.linux_context(linux.memory.phys, linux, isf)
        grid = bridge.run_plugin(context, layer, table, args.plugin, options)
        from volatility3.cli import text_renderer

        out, sys.stdout = sys.stdout, env.stdout  # Volatility's renderers print to sys.stdout
        try:
            getattr(text_renderer, RENDERERS[own.renderer])().render(grid)
        except VolatilityError:
            raise
        except Exception as exc:  # a plugin's failure surfaces while the grid is populated
            raise VolatilityError(f"{args.plugin} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.stdout = out
        return 0

    return with_linux(args, work, pause=not own.no_pause)
