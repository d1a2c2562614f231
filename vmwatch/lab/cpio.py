"""A minimal writer of the newc cpio format the kernel unpacks as an initramfs.

Written in Python so device nodes and root ownership can be recorded without being root.
"""

from __future__ import annotations

import stat

import attrs

_TRAILER = "TRAILER!!!"


@attrs.frozen
class Entry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def newc(entries: list[Entry], *, mtime: int = 0) -> bytes:
    """The archive bytes (uncompressed); ``mtime`` fixed so builds are reproducible."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry(_TRAILER, 0)], start=1):
        name = entry.name.lstrip("/").encode() + b"\0"
        fields = (
            ino if entry.name != _TRAILER else 0, entry.mode, entry.uid, entry.gid,
            2 if stat.S_ISDIR(entry.mode) else 1, mtime, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + name
        out += b"\0" * (-len(out) % 4)
        out += entry.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)
