"""Volatility 3 on vmwatch's physical memory: a data layer, a ready context, a plugin runner.

Volatility cannot open live QEMU guests, VirtualBox cores or standalone .vmsn files; vmwatch can.
:class:`PhysicalLayer` hands Volatility vmwatch's guest-physical reads (a hole raises Volatility's
``InvalidAddressException``, never zeros), and :func:`linux_context` puts Volatility's own
``LinuxIntel32e`` layer on it with the page-table root and KASLR slide vmwatch already found, so no
banner scan runs. The symbol table is the ISF ``symbols export`` builds from the guest's BTF and
kallsyms, cached by kernel build. volatility3 is imported lazily: it stays an optional extra.

    from vmwatch.images import open_image
    from vmwatch.os.linux.kernel import Linux
    from vmwatch.bridges.volatility import linux_context
    with open_image("dump.elf") as image:
        context, layer, table = linux_context(image, Linux.from_memory(image, tuple(image.cpus)))
"""

from __future__ import annotations

import bisect
import hashlib
import json
import lzma
import os
from typing import Sequence

from vmwatch.errors import PhysicalReadError, SymbolError, VolatilityError


def _volatility():
    try:
        import volatility3.framework  # noqa: F401
    except ImportError as exc:
        raise VolatilityError("volatility3 is not installed (pip install 'vmwatch[volatility]')") from exc
    import volatility3.framework as framework

    framework.require_interface_version(2, 0, 0)
    return framework


def physical_layer_class():
    """The DataLayerInterface subclass over a vmwatch physical memory (built on first use)."""
    from volatility3.framework import exceptions, interfaces

    class PhysicalLayer(interfaces.layers.DataLayerInterface):
        """Guest-physical memory read through vmwatch; unbacked ranges are invalid, not zeros."""

        def __init__(self, context, config_path, name, phys, metadata=None) -> None:
            super().__init__(context, config_path, name, metadata)
            self._phys = phys
            self._runs = sorted((run.start, run.size) for run in phys.runs)
            self._starts = [start for start, _ in self._runs]

        @classmethod
        def get_requirements(cls):
            return []

        @property
        def minimum_address(self) -> int:
            return self._runs[0][0] if self._runs else 0

        @property
        def maximum_address(self) -> int:
            return self._runs[-1][0] + self._runs[-1][1] - 1 if self._runs else 0

        @property
        def dependencies(self):
            return []

        def _run_end(self, offset: int) -> int | None:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i < 0 or offset >= self._runs[i][0] + self._runs[i][1]:
                return None
            return self._runs[i][0] + self._runs[i][1]

        def is_valid(self, offset: int, length: int = 1) -> bool:
            while length > 0:
                end = self._run_end(offset)
                if end is None:
                    return False
                length -= end - offset
                offset = end
            return True

        def read(self, offset: int, length: int, pad: bool = False) -> bytes:
            try:
                return self._phys.read(offset, length, pad=pad)
            except PhysicalReadError as exc:
                raise exceptions.InvalidAddressException(self.name, offset, str(exc)) from exc

        def write(self, offset: int, data: bytes) -> None:
            raise exceptions.LayerException(self.name, "vmwatch gives Volatility read-only memory")

        @property
        def mapping_runs(self):
            return self._runs

        def mapping(self, offset: int, length: int, ignore_errors: bool = False):
            """Volatility's scanners ask for (offset, length, mapped offset, mapped length, layer)."""
            for start, size in self._runs:
                lo, hi = max(start, offset), min(start + size, offset + length)
                if lo < hi:
                    yield lo, hi - lo, lo, hi - lo, self.name

    return PhysicalLayer


def isf_path(linux) -> str:
    """The ISF of this kernel built from its BTF + kallsyms, cached under the profile cache by banner."""
    from vmwatch.os.linux._cache import cache_dir
    from vmwatch.os.linux.btf import BtfProfile
    from vmwatch.os.linux.isf import export_isf

    banner = linux.memory.cstring(linux.symbols["linux_banner"], 512).encode() + b"\0"
    key = hashlib.sha256(b"isf-2" + banner + linux.kernel.slide.to_bytes(8, "little")).hexdigest()[:24]
    directory = cache_dir() / "isf"
    path = directory / f"{key}.json.xz"
    if path.exists():
        return str(path)
    if not isinstance(linux.types, BtfProfile):
        raise SymbolError("this kernel has no BTF: pass Volatility's own ISF with --symbols")
    doc = export_isf(linux.types, linux.symbols, slide=linux.kernel.slide, banner=banner)
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    with lzma.open(partial, "wt") as out:
        json.dump(doc, out, separators=(",", ":"))
    os.replace(partial, path)
    return str(path)


def linux_context(phys, linux, isf: str | None = None):
    """A Volatility context over ``phys`` for the kernel ``linux`` found in it.

    Returns ``(context, layer_name, symbol_table_name)``: the layer is Volatility's LinuxIntel32e on
    vmwatch's physical memory, ready for ``linux.*`` plugins (``kernel.layer_name`` etc.).
    ``isf`` overrides the ISF built from the guest (a path or file:// URL).
    """
    framework = _volatility()
    from volatility3.framework import contexts
    from volatility3.framework.layers import intel
    from volatility3.framework.symbols import linux as vol_linux

    url = isf or isf_path(linux)
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    framework.import_files(vol_linux, True)
    context = contexts.Context()
    physical = physical_layer_class()(context, "vmwatch.memory", "memory_layer", phys)
    context.add_layer(physical)
    config = "vmwatch.IntelLayer"
    context.config[f"{config}.memory_layer"] = physical.name
    context.config[f"{config}.page_map_offset"] = linux.kernel.kernel_cr3
    context.config[f"{config}.kernel_virtual_offset"] = linux.kernel.slide
    layer = intel.LinuxIntel32e(context, config_path=config, name="kernel_layer", metadata={"os": "Linux"})
    context.add_layer(layer)
    # Volatility's addresses are 48-bit on this layer: the symbol finder masks symbols the same way.
    context.config["vmwatch.symbols.symbol_mask"] = layer.address_mask  # before: the delegate reads it at init
    table = vol_linux.LinuxKernelIntermedSymbols(context, "vmwatch.symbols", name="kernel_symbols", isf_url=url,
                                                 symbol_mask=layer.address_mask)
    context.symbol_space.append(table)
    return context, layer.name, table.name


def plugin_class(name: str):
    """The Volatility plugin class named like ``linux.pslist`` or ``linux.pslist.PsList``."""
    framework = _volatility()
    import volatility3.plugins

    framework.import_files(volatility3.plugins, True)
    plugins = framework.list_plugins()
    found = plugins.get(name) or [cls for key, cls in plugins.items() if key.lower().startswith(name.lower() + ".")]
    if isinstance(found, list):
        if len(found) != 1:
            raise VolatilityError(f"unknown Volatility plugin {name!r}" if not found else
                                  f"ambiguous Volatility plugin {name!r}")
        found = found[0]
    return found


def run_plugin(context, layer_name: str, table_name: str, name: str, options: dict | None = None):
    """Run plugin ``name`` on the kernel layer; returns its TreeGrid (populated by rendering)."""
    from volatility3.framework import automagic, exceptions, interfaces, plugins

    cls = plugin_class(name)
    base = "plugins"
    path = interfaces.configuration.path_join(base, cls.__name__)
    for req in cls.get_requirements():
        if isinstance(req, interfaces.configuration.ConstructableRequirementInterface) and req.name == "kernel":
            # Volatility reads a requirement's sub-config (kernel.layer_name.kernel_virtual_offset, ...).
            layer = context.layers[layer_name]
            context.config.splice(f"{path}.kernel.layer_name", layer.build_configuration())
            context.config.splice(f"{path}.kernel.symbol_table_name",
                                  context.symbol_space[table_name].build_configuration())
            context.config[f"{path}.kernel.layer_name"] = layer_name
            context.config[f"{path}.kernel.symbol_table_name"] = table_name
            context.config[f"{path}.kernel.offset"] = layer.config["kernel_virtual_offset"]
    for key, value in (options or {}).items():
        context.config[f"{path}.{key}"] = value
    chosen = automagic.choose_automagic(automagic.available(context), cls)
    try:
        plugin = plugins.construct_plugin(context, chosen, cls, base, None, _no_files())
        return plugin.run()
    except exceptions.UnsatisfiedException as exc:
        raise VolatilityError(f"{name}: unsatisfied requirements {', '.join(sorted(exc.unsatisfied))}") from exc


def plugin_options(name: str, argv: Sequence[str]) -> dict:
    """Plugin arguments like Volatility's CLI (``--pid 1 2``, ``--dump``) parsed from its requirements."""
    import argparse

    from volatility3.framework.configuration import requirements

    parser = argparse.ArgumentParser(prog=name, add_help=False, exit_on_error=False)
    for req in plugin_class(name).get_requirements():
        flag = "--" + req.name.replace("_", "-")
        if isinstance(req, requirements.BooleanRequirement):
            parser.add_argument(flag, dest=req.name, action="store_true", default=None)
        elif isinstance(req, requirements.ListRequirement):
            parser.add_argument(flag, dest=req.name, nargs="+", type=req.element_type)
        elif isinstance(req, (requirements.IntRequirement, requirements.StringRequirement, requirements.URIRequirement)):
            parser.add_argument(flag, dest=req.name, type=int if isinstance(req, requirements.IntRequirement) else str)
    try:
        parsed, rest = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, ValueError) as exc:
        raise VolatilityError(f"{name}: {exc}") from exc
    if rest:
        raise VolatilityError(f"{name}: unknown plugin argument {rest[0]!r}")
    return {key: value for key, value in vars(parsed).items() if value is not None}



def _no_files():
    """A file handler that refuses: through vmwatch vol, plugin output goes to stdout only."""
    from volatility3.framework import interfaces

    class NoFiles(interfaces.plugins.FileHandlerInterface):
        def __init__(self, filename: str) -> None:
            raise VolatilityError(f"this plugin writes files ({filename}); not supported through vmwatch vol")

    return NoFiles
