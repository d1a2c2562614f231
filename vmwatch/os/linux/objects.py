"""Kernel objects read through the BTF profile: no struct offset is written in this code.

A :class:`StructReader` reads a whole struct once and decodes members from that one buffer,
so walking a task costs one translation and one page-cache slice, not one per field.
"""

from __future__ import annotations

import struct

import structlog

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux.btf import ENUM, ENUM64, INT, PTR, STRUCT, UNION, BtfProfile

log = structlog.get_logger(__name__)

_UNSIGNED = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_SIGNED = {1: "<b", 2: "<h", 4: "<i", 8: "<q"}

MAX_LIST = 1 << 16
"""No kernel list we walk is longer than this; a longer one is corrupt or cyclic."""


class StructReader:
    """Decode members of one struct type from raw bytes.

    Args:
        types: the kernel's type profile.
        name: struct name (``"task_struct"``).
    """

    def __init__(self, types: BtfProfile, name: str) -> None:
        self.types = types
        self.struct = types.struct(name)
        self.size = self.struct.size
        self.name = name
        self._decoders: dict[str, tuple[int, str | None, int, int]] = {}
        self._offsets: dict[str, int | None] = {}  # a walk asks the same few members of every struct
        self._spans: dict[str, tuple[int, int]] = {}

    def _offset(self, member: str) -> int | None:
        if member not in self._offsets:
            try:
                self._offsets[member] = self.types.member(self.name, member).offset
            except SymbolError:
                self._offsets[member] = None
        return self._offsets[member]

    def has(self, member: str) -> bool:
        return self._offset(member) is not None

    def offset(self, member: str) -> int:
        offset = self._offset(member)
        return self.types.member(self.name, member).offset if offset is None else offset  # None: raise its error

    def _decoder(self, member: str) -> tuple[int, str | None, int, int]:
        found = self._decoders.get(member)
        if found is None:
            m = self.types.member(self.name, member)
            tid = self.types.resolve(m.type_id)
            kind = self.types.kind(tid)
            size = self.types.size_of(tid)
            if kind == PTR:
                fmt = _UNSIGNED[self.types.pointer_size]
            elif kind == INT:
                fmt = (_SIGNED if self.types.int_encoding(tid)[0] & 1 else _UNSIGNED).get(size)
            elif kind in (ENUM, ENUM64, STRUCT, UNION):  # kuid_t and friends wrap one integer
                fmt = _UNSIGNED.get(size)
            else:
                fmt = None
            found = (m.offset, fmt, m.bit_size, m.bit_offset & 7)
            if m.bit_size:
                found = (m.bit_offset // 8, "<Q", m.bit_size, m.bit_offset & 7)
            self._decoders[member] = found
        return found

    def int(self, buf: bytes, member: str) -> int:
        """An integer, pointer, enum or bitfield member."""
        offset, fmt, bit_size, shift = self._decoder(member)
        if fmt is None:
            raise SymbolError(f"{self.name}.{member} is not a scalar", name=self.name, member=member)
        if bit_size:
            raw = int.from_bytes(buf[offset:offset + 8], "little")
            return (raw >> shift) & ((1 << bit_size) - 1)
        return struct.unpack_from(fmt, buf, offset)[0]

    def bytes(self, buf: bytes, member: str) -> bytes:
        """The raw bytes of a member (arrays such as ``comm``)."""
        span = self._spans.get(member)
        if span is None:
            m = self.types.member(self.name, member)
            span = self._spans[member] = (m.offset, m.offset + self.types.size_of(m.type_id))
        return buf[span[0]:span[1]]


def c_string(raw: bytes) -> str:
    """A NUL-terminated byte string as text (undecodable bytes escaped, never raising)."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "backslashreplace")


def warn_broken(logged: set | None, name: str, head: int, entries: int, why: str) -> None:
    """Log ``linux.list_broken``: the list, its head, the entries read before the break, why;
    once per problem when ``logged`` (``Linux.logged_breaks``, bounded) keeps what was said."""
    key = (name, head, entries, why)
    if logged is not None:
        if key in logged:
            return
        if len(logged) < 1024:
            logged.add(key)
    log.warning("linux.list_broken", list=name, head=hex(head), entries=entries, why=why)


def walk_list(memory, head: int, link_offset: int, *, name: str, limit: int = MAX_LIST,
              skipped: list[str] | None = None, log_broken: bool = True,
              logged: set | None = None) -> list[int]:
    """Addresses of the structs on a circular ``list_head`` list (the head itself excluded).

    Args:
        head: virtual address of the list head (``&init_task.tasks``, ``&modules``).
        link_offset: offset of the ``list_head`` member inside each struct (container_of).
        name: the list as a warning names it (``init_task.tasks``, ``modules``).
        skipped: a list that receives one line per problem (bad pointer, cycle, too long).
        log_broken: also log the problem as a warning (a caller walking many small lists logs a summary).
        logged: problems logged already (``Linux.logged_breaks``): a watch walks the same broken
            list every few seconds, and says so once.

    The walk stops at the first unreadable pointer, at a node seen before (a cycle that does
    not pass through the head) and after ``limit`` nodes; each is reported, none hangs.
    """
    problems = skipped if skipped is not None else []
    seen = {head}
    out: list[int] = []
    node = head

    def broken(why: str) -> list[int]:
        line = f"{name} list broken after {len(out)} entries: {why}"
        if log_broken:
            warn_broken(logged, name, head, len(out), why)
        problems.append(line)
        return out

    while True:
        try:
            node = memory.pointer(node)
        except VmwatchError:
            if out and node != head:
                out.pop()  # the node whose next pointer does not read is not a struct either
            return broken(f"unreadable pointer at {node:#x}")
        if node == head:
            return out
        if node in seen:
            return broken(f"cycle at {node:#x} not through the head {head:#x}")
        if len(out) == limit:
            return broken(f"more than {limit} entries")
        seen.add(node)
        out.append(node - link_offset)
