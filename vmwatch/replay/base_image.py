"""The base image of a recording: the memory image a recording was made on top of, named by digest."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from vmwatch.errors import RecordingError

if TYPE_CHECKING:
    from vmwatch.replay.recording import Recording


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-256 of a whole file, hex (how a recording names its base image)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_base(recording: Recording, path: str | os.PathLike[str]) -> None:
    """Refuse a base image other than the one the recording was made on top of (if it names one)."""
    wanted = recording.meta.get("base")
    if not wanted:
        return
    if not isinstance(wanted, dict):
        raise RecordingError(f"{recording.path}: META base is not an object")
    size = os.path.getsize(path)
    if size != wanted.get("size") or file_digest(path) != wanted.get("blake2b"):
        raise RecordingError(f"{path} is not the base image this recording was made on "
                             f"(expected {wanted.get('size')} bytes, BLAKE2b {str(wanted.get('blake2b'))[:16]}...)")
