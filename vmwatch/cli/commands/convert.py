"""``vmwatch convert IMAGE -o OUT.raw``: a sparse raw image where file offset == physical address."""

from __future__ import annotations

import argparse
import mmap
import os
import time

HELP = "convert any memory image to a sparse raw image (file offset == physical address)"

CHUNK = 1 << 20
"""Copy and hole-detection granularity: a 1 MiB chunk of zeros becomes a hole."""
_ZEROS = bytes(CHUNK)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="memory image (format detected by content)")
    parser.add_argument("-o", "--output", required=True, help="raw image to write")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("--vmem", metavar="PATH", help="VMware: the file holding RAM (default: IMAGE.vmem)")


def run(args: argparse.Namespace, env) -> int:
    from vmwatch.errors import VmwatchError
    from vmwatch.images import open_image

    if os.path.exists(args.output) and not args.force:
        raise VmwatchError(f"{args.output} exists (use --force to overwrite)")
    with open_image(args.image, vmem=args.vmem) as image:
        if os.path.exists(args.output) and os.path.samefile(args.output, image.path):
            raise VmwatchError("the output would overwrite the input image")
        started = time.perf_counter()
        with _progress(env, sum(r.size for r in image.runs if r.file_offset is not None)) as advance:
            written = convert(image, args.output, advance)
        verify(image, args.output)
        elapsed = time.perf_counter() - started
    holes = image.size - written
    env.stdout.write(
        f"wrote {args.output}: {image.size:#x} bytes ({len(image.runs)} runs from {image.format}), "
        f"{written:#x} bytes of data, {holes:#x} left as holes; verified in {elapsed:.2f} s\n")
    return 0


def convert(image, output: str, advance=lambda n: None) -> int:
    """Write every file-backed run at its physical address; skip zero chunks. Returns bytes written."""
    written = 0
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for run in image.runs:
            if run.file_offset is None:  # reads as zeros: a hole in the output
                continue
            pos = run.start
            while pos < run.end:
                n = min(CHUNK, run.end - pos)
                chunk = image.read(pos, n)
                if chunk != _ZEROS[:n]:
                    os.pwrite(fd, chunk, pos)
                    written += n
                pos += n
                advance(n)
        os.ftruncate(fd, image.size)
    finally:
        os.close(fd)
    return written


def verify(image, output: str) -> None:
    """Compare the written file against what the API reads, run by run, chunk by chunk.

    Raises:
        VmwatchError: the first range that differs.
    """
    from vmwatch.errors import VmwatchError

    if image.size == 0:
        return
    with open(output, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as out:
        if len(out) != image.size:
            raise VmwatchError(f"verification failed: {output} is {len(out):#x} bytes, expected {image.size:#x}")
        for run in image.runs:
            for pos in range(run.start, run.end, CHUNK):
                n = min(CHUNK, run.end - pos)
                if out[pos:pos + n] != image.read(pos, n):
                    raise VmwatchError(f"verification failed: {output} differs from the image at {pos:#x}")


class _progress:
    """A rich progress bar on a terminal stderr; nothing otherwise (imported lazily)."""

    def __init__(self, env, total: int) -> None:
        self.env, self.total, self.bar = env, total, None

    def __enter__(self):
        if not self.env.stderr_isatty or not self.total:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self.bar = Progress(*Progress.get_default_columns()[:-1], BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), console=Console(file=self.env.stderr), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("converting", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
