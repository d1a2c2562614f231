"""Physical memory with some bytes replaced: corrupt a real dump without touching the file."""

from __future__ import annotations


class Overlay:
    """Wraps an image; ``patch(paddr, data)`` changes what reads return."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.patches: list[tuple[int, bytes]] = []
        self.volatile = False
        self.writable = False

    @property
    def runs(self):
        return self.inner.runs

    @property
    def size(self):
        return self.inner.size

    def patch(self, paddr: int, data: bytes) -> None:
        self.patches.append((paddr, bytes(data)))

    def read(self, paddr: int, size: int, *, pad: bool = False) -> bytes:
        data = bytearray(self.inner.read(paddr, size, pad=pad))
        for start, patch in self.patches:
            lo, hi = max(start, paddr), min(start + len(patch), paddr + size)
            if lo < hi:
                data[lo - paddr:hi - paddr] = patch[lo - start:hi - start]
        return bytes(data)

    def read_into(self, paddr: int, buf, *, pad: bool = False) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self.read(paddr, len(view), pad=pad)

    def read_many(self, requests):
        out = []
        for paddr, size in requests:
            try:
                out.append(self.read(paddr, size))
            except Exception:  # noqa: BLE001 - mirror the images' None for unmapped
                out.append(None)
        return out
