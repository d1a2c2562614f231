"""Kernel symbols of a Windows guest: ntoskrnl exports, KDBG fields and profile symbols."""

from __future__ import annotations

import bisect

from vmwatch.errors import SymbolError


class WindowsSymbols:
    """name -> virtual address, and address -> nearest export.

    Args:
        exports: ntoskrnl's named exports, already relocated to the kernel base.
        extra: KDBG fields and profile symbols (names the exports lack).
    """

    def __init__(self, exports: dict[str, int], extra: dict[str, int]) -> None:
        self.exports = dict(exports)
        self._all = {**extra, **self.exports}
        first: dict[int, str] = {}
        for name, address in sorted(self.exports.items()):
            first.setdefault(address, name)  # aliases (NtClose/ZwClose): the first name wins
        pairs = sorted(first.items())
        self._addresses = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def __getitem__(self, name: str) -> int:
        try:
            return self._all[name]
        except KeyError:
            raise SymbolError(f"no kernel symbol {name!r} (not an ntoskrnl export, KDBG field or profile "
                              "symbol)", name=name) from None

    def get(self, name: str, default: int | None = None) -> int | None:
        """The address of ``name``, or ``default`` (as ``LinuxSymbols.get``: rules resolve either)."""
        return self._all.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._all

    def __len__(self) -> int:
        return len(self._all)

    def items(self):
        return self._all.items()

    def lookup(self, address: int) -> tuple[str, int] | None:
        """The export at or below ``address`` and the distance to it, or None."""
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return None
        return self._names[i], address - self._addresses[i]
