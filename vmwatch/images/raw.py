"""Raw images (dd, ``.pgmphystofile``, ``.vmem``, ``vmwatch convert`` output): file offset == paddr."""

from __future__ import annotations

import os

from vmwatch.images.base import Image, Run, map_file


class RawImage(Image):
    """One run from physical 0 covering the whole file. Sparse holes read as the zeros they hold."""

    format = "raw"

    def __init__(self, path: str | os.PathLike) -> None:
        data, size = map_file(path)
        super().__init__(path, data=data, runs=[Run(0, size, 0)])
