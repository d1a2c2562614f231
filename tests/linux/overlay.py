"""Physical memory with some bytes replaced: corrupt a real dump without touching the file, or a copy of it."""

from __future__ import annotations

import shutil

from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux


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


def mutated(snap, mutate):
    """Open the dump and let ``mutate(linux, overlay)`` patch it: (image, overlay)."""
    image = open_image(snap.dump)
    overlay = Overlay(image)
    mutate(Linux.from_memory(overlay, image.cpus), overlay)
    return image, overlay


def corrupt_copy(snap, tmp_path, mutate) -> str:
    """A copy of the dump file with ``mutate``'s patches written at their file offsets."""
    image, overlay = mutated(snap, mutate)
    with image:
        runs, patches = image.runs, overlay.patches
    path = tmp_path / "corrupt.elf"
    shutil.copyfile(snap.dump, path)
    with open(path, "r+b") as out:
        for paddr, data in patches:
            run = next(r for r in runs if r.start <= paddr < r.start + r.size and r.file_offset is not None)
            out.seek(run.file_offset + paddr - run.start)
            out.write(data)
    return str(path)
