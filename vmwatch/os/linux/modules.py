"""Loaded modules: the ``modules`` list of ``struct module``.

The module's memory layout changed twice: ``module_core``/``core_size`` (< 4.5),
``core_layout``/``init_layout`` (4.5-6.3), ``mem[MOD_*]`` (6.4+). Base is the core text and
size is what /proc/modules prints (all layouts added up).
"""

from __future__ import annotations

import attrs

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.objects import StructReader, c_string, walk_list
from vmwatch.os.linux.tasks import Listing


@attrs.frozen
class Module:
    name: str
    base: int
    size: int
    address: int
    """Virtual address of the ``struct module``."""

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def walk_modules(linux) -> Listing:
    types, memory = linux.types, linux.memory
    module = StructReader(types, "module")
    link = module.offset("list")
    skipped: list[str] = []
    found = []
    layout = _layout(types, module)
    for address in walk_list(memory, linux.symbols["modules"], link, name="modules", skipped=skipped, limit=8192,
                             logged=linux.logged_breaks):
        try:
            buf = memory.read(address, module.size)
            base, size = layout(buf)
            found.append(Module(c_string(module.bytes(buf, "name")), base, size, address))
        except VmwatchError as exc:
            skipped.append(f"module at {address:#x}: {exc}")
    return Listing(found, skipped)


def _layout(types, module: StructReader):
    if module.has("core_layout"):
        def layout(buf):
            size = module.int(buf, "core_layout.size") + module.int(buf, "init_layout.size")
            return module.int(buf, "core_layout.base"), size
        return layout
    if module.has("mem"):
        mem = types.member("module", "mem")
        count = types.array(types.resolve(mem.type_id))[2]
        entry = StructReader(types, "module_memory")

        def layout(buf):
            entries = [buf[mem.offset + i * entry.size:mem.offset + (i + 1) * entry.size] for i in range(count)]
            return entry.int(entries[0], "base"), sum(entry.int(e, "size") for e in entries)
        return layout

    def layout(buf):
        return module.int(buf, "module_core"), module.int(buf, "core_size") + module.int(buf, "init_size")
    return layout
