"""The caches of the translation layer, as LibVMI has them, each with hit/miss counters.

- :class:`Tlb`: virtual page -> physical frame, keyed by (page-table root, virtual page).
- :class:`PidDtbCache`: pid -> page-table root, filled by a resolver the OS layer sets.
- :class:`SymbolCache`: symbol name -> address, filled by a resolver the OS layer sets.

(The page cache is :class:`vmwatch.memory.physical.CachedPhysicalMemory`.) Every cache is an
explicit object owned by one ``GuestMemory``: no global state, no ``functools.lru_cache``.
"""

from __future__ import annotations

from typing import Callable

from vmwatch.errors import SymbolError


class Tlb:
    """Translations of 4 KiB virtual pages, one dict per page-table root.

    ``sets[cr3][vaddr >> 12]`` is the physical frame address (low 12 bits clear). The dicts are
    public so ``GuestMemory.translate`` can probe them inline; a dict that grows past
    ``max_entries`` is dropped whole (cheaper than LRU bookkeeping on every hit), and so is the
    whole TLB past ``max_roots`` page-table roots.
    """

    def __init__(self, *, max_entries: int = 1 << 16, max_roots: int = 256) -> None:
        self.sets: dict[int, dict[int, int]] = {}
        self.max_entries = max_entries
        self.max_roots = max_roots
        self.hits = 0
        self.misses = 0

    def insert(self, cr3: int, vpage: int, frame: int) -> None:
        entries = self.sets.get(cr3)
        if entries is None:
            if len(self.sets) >= self.max_roots:
                self.sets.clear()
            entries = self.sets[cr3] = {}
        elif len(entries) >= self.max_entries:
            entries.clear()
        entries[vpage] = frame

    def flush(self) -> None:
        self.sets.clear()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": sum(map(len, self.sets.values()))}


class _ResolverCache:
    """A dict in front of a resolver callable that the OS layer plugs in."""

    what = "value"

    def __init__(self, resolver: Callable | None = None) -> None:
        self.resolver = resolver
        self._values: dict = {}
        self.hits = 0
        self.misses = 0

    def get(self, key):
        value = self._values.get(key)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        if self.resolver is None:
            raise SymbolError(f"no {self.what} resolver is set (the OS layer sets one): cannot look up {key!r}")
        value = self.resolver(key)
        self._values[key] = value
        return value

    def __getitem__(self, key):
        return self.get(key)

    def set(self, key, value: int) -> None:
        """Record a value known from elsewhere (e.g. a whole task list walk)."""
        self._values[key] = value

    def flush(self) -> None:
        self._values.clear()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._values)}


class PidDtbCache(_ResolverCache):
    """pid -> page-table root (CR3). Stale once a live guest runs (pids are reused)."""

    what = "pid->dtb"

    def get(self, pid: int) -> int:
        """The page-table root of process ``pid``.

        Raises:
            SymbolError: no resolver is set. Whatever the resolver raises for an unknown pid.
        """
        return super().get(pid)


class SymbolCache(_ResolverCache):
    """Symbol name -> virtual address. Kernel symbols do not move while the guest runs."""

    what = "symbol"

    def get(self, name: str) -> int:
        """The address of ``name``.

        Raises:
            SymbolError: unknown symbol, or no resolver is set.
        """
        return super().get(name)
