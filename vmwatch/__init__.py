"""vmwatch: virtual machine introspection from the outside.

Watch a running or saved virtual machine: read its memory and CPU state through a cached
address-translation layer, turn what happens inside it into events, and run rules over them.

The public API is re-exported here lazily, so ``import vmwatch`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "open_image": "vmwatch.images",
    "Image": "vmwatch.images",
    "Run": "vmwatch.images",
    "Registers": "vmwatch.cpu",
    "PagingMode": "vmwatch.cpu",
    "Aarch64Registers": "vmwatch.cpu_aarch64",
    "open_target": "vmwatch.target",
    "GuestMemory": "vmwatch.memory",
}
_EXPORTS.update({name: "vmwatch.errors" for name in (
    "VmwatchError", "ImageFormatError", "PhysicalReadError", "TranslationError", "PageNotPresent",
    "GuestDataError", "SymbolError", "LinkError", "LinkClosedError", "ProtocolError",
    "UnsupportedOperation", "LabError", "RecordingError", "RuleError",
    "PageNotRecorded", "DebugError", "TimelineError",
)})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmwatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
