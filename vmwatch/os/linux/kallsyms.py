"""Find and decode the kernel's own symbol table (kallsyms) in guest memory.

Theory of operation (scripts/kallsyms.c ``write_src``, kernel/kallsyms.c): the build emits,
in .rodata, each table behind an 8-byte aligned label (4 on 32-bit):

- ``kallsyms_num_syms`` (.long), then ``kallsyms_names``: per symbol a length byte (two bytes
  when the first has bit 7 set, since 6.1) and that many token indexes; the first expanded
  character is the nm type letter.
- ``kallsyms_markers``: offset in names of every 256th symbol (.long; pointer-sized before 4.20).
- ``kallsyms_token_table``: 256 NUL-terminated tokens; ``kallsyms_token_index``: 256 u16 offsets.
- ``kallsyms_offsets`` (s32 each) + ``kallsyms_relative_base`` (a relocated pointer, so it holds
  the runtime, KASLR-slid value): before ``num_syms`` up to 6.1, after ``token_index`` since.
  With absolute per-CPU symbols (x86_64 SMP) a non-negative offset is an absolute value (a
  per-CPU offset) and a negative one means ``relative_base - 1 - offset``.

Every character that occurs in a symbol keeps its own code as a one-character token, so the
token table contains ``"0\\x001\\x00...9\\x00"`` as ten consecutive tokens. The kernel image is
physically contiguous, so this pattern is searched in *physical* memory; each hit is validated
by rebuilding the token index, the markers and the names from it.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_right
from collections import Counter
from typing import Callable, Iterable

import attrs
import structlog

from vmwatch.errors import SymbolError
from vmwatch.os.linux import _cache

log = structlog.get_logger()

DIGITS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
_MAX_SYMS = 1 << 22
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@attrs.frozen
class KallsymsTables:
    """Where the tables were found, as offsets in the buffer they were decoded from."""

    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int
    """The runtime value of ``kallsyms_relative_base`` (KASLR applied)."""


class RelativeAddresses:
    """Addresses computed from ``kallsyms_offsets`` on demand (most runs need a dozen of 100,000)."""

    def __init__(self, offsets: array, base: int, pointer_size: int) -> None:
        self.offsets = offsets
        self.base = base
        self.mask = (1 << (8 * pointer_size)) - 1
        step = max(1, len(offsets) // 64)
        self.absolute_percpu = any(o < 0 for o in offsets[::step])

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> int:
        o = self.offsets[i]
        if self.absolute_percpu:
            return o if o >= 0 else (self.base - 1 - o) & self.mask
        return self.base + (o & 0xFFFFFFFF)

    def materialize(self) -> array:
        base, mask = self.base, self.mask
        if self.absolute_percpu:
            return array("Q", [o if o >= 0 else (base - 1 - o) & mask for o in self.offsets])
        return array("Q", [base + (o & 0xFFFFFFFF) for o in self.offsets])


class Symbols:
    """Kernel symbols: name -> virtual address, and address -> nearest symbol.

    Args:
        names: symbol names in table order (or one string of them joined by newlines).
        addresses: runtime addresses, same order (or a :class:`RelativeAddresses`).
        types: nm type letters (``T``, ``t``, ``D``, ``A``...), same order; may be empty.
        preferred: indexes of globals that must win over earlier statics of the same name
            (computed when not given; cached with decoded kallsyms).
        by_name: a ready name -> index map (from the cache).
    """

    def __init__(self, names: list[str] | str, addresses, types: str = "",
                 preferred: list[int] | None = None, by_name: dict[str, int] | None = None) -> None:
        self._names = names
        count = names.count("\n") + 1 if isinstance(names, str) else len(names)
        if isinstance(addresses, RelativeAddresses):
            self._addresses = addresses
        else:
            self._addresses = array("Q", addresses)
        self.types = types
        if len(self._addresses) != count or types and len(types) != count:
            raise SymbolError("symbol names, addresses and types differ in length")
        self._count = count
        self._by_name = by_name
        self._preferred = preferred
        self._sorted: tuple[array, list[int]] | None = None
        self.sizes: dict[str, int] = {}
        """Bytes of the objects whose size is known apart from the next symbol (arm64's recovered
        ``sys_call_table``, which kallsyms without data symbols cannot bound)."""

    @property
    def names(self) -> list[str]:
        if isinstance(self._names, str):
            self._names = self._names.split("\n")
        return self._names

    @property
    def addresses(self) -> array:
        if isinstance(self._addresses, RelativeAddresses):
            self._addresses = self._addresses.materialize()
        return self._addresses

    def __len__(self) -> int:
        return self._count

    def _index(self) -> dict[str, int]:
        if self._by_name is None:
            names = self.names
            by_name = dict(zip(reversed(names), range(len(names) - 1, -1, -1)))  # first one wins
            if self._preferred is None:
                self._preferred = preferred_globals(names, self.types) if len(by_name) != len(names) else []
            for i in self._preferred:
                by_name[names[i]] = i
            self._by_name = by_name
        return self._by_name

    def __contains__(self, name: str) -> bool:
        return name in self._index()

    def get(self, name: str) -> int | None:
        i = self._index().get(name)
        return None if i is None else self._addresses[i]

    def __getitem__(self, name: str) -> int:
        i = self._index().get(name)
        if i is None:
            raise SymbolError(f"kernel symbol {name!r} not found", name=name)
        return self._addresses[i]

    def type_of(self, name: str) -> str:
        i = self._index().get(name)
        return self.types[i] if i is not None and self.types else "?"

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """(name, offset) of the nearest symbol at or below ``vaddr`` (absolute ones excluded)."""
        if self._sorted is None:
            order = sorted((a, i) for i, a in enumerate(self.addresses)
                           if not self.types or self.types[i] not in "aAUu")
            self._sorted = (array("Q", (a for a, _ in order)), [i for _, i in order])
        addrs, idx = self._sorted
        k = bisect_right(addrs, vaddr) - 1
        if k < 0:
            return None
        return self.names[idx[k]], vaddr - addrs[k]

    def next_address(self, vaddr: int) -> int | None:
        """The lowest symbol address above ``vaddr``."""
        self.lookup(vaddr)
        addrs = self._sorted[0]
        k = bisect_right(addrs, vaddr)
        return addrs[k] if k < len(addrs) else None

    def items(self) -> Iterable[tuple[str, int]]:
        return zip(self.names, self.addresses)


def preferred_globals(names: list[str], types: str) -> list[int]:
    """Indexes of global symbols whose name an earlier local (static) symbol also has."""
    if not types:
        return []
    dups = {name for name, n in Counter(names).items() if n > 1}
    first: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        if name in dups:
            if name not in first:
                first[name] = i
            elif "A" <= types[i] <= "Z" and not "A" <= types[first[name]] <= "Z":
                out.append(i)
                first[name] = i
    return out


def find_token_tables(buf: bytes, start: int = 0) -> list[int]:
    """Offsets in ``buf`` where a kallsyms token table starts (checked against its index)."""
    found = []
    pos = buf.find(DIGITS, start)
    while pos >= 0:
        begin = _token_table_start(buf, pos)
        if begin is not None:
            found.append(begin)
        pos = buf.find(DIGITS, pos + 1)
    return found


def _token_table_start(buf: bytes, digit0: int) -> int | None:
    """Walk forward over tokens 0x30..0xff, then let the token index say where token 0 is.

    Walking backward is ambiguous (the byte before token 0 belongs to the markers), forward is not.
    """
    pos = digit0
    for _ in range(256 - 0x30):
        end = buf.find(b"\0", pos, pos + 256)
        if end <= pos:
            return None
        pos = end + 1
    for at in range(pos, min(pos + 16, len(buf) - 512)):
        if buf[at] == 0 and buf[at + 1] == 0:
            first = buf[at + 2 * 0x30] | buf[at + 2 * 0x30 + 1] << 8
            if 0 < first <= digit0:
                try:
                    tokens, end = _tokens(buf, digit0 - first)
                    if _token_index(buf, end, tokens) == at:
                        return digit0 - first
                except SymbolError:
                    continue
    return None


def decode(buf: bytes, token_table: int, *, pointer_size: int = 8) -> tuple[Symbols, KallsymsTables]:
    """Decode every table around a candidate token table in ``buf``.

    Raises:
        SymbolError: the candidate is not a kallsyms token table.
    """
    try:
        return _decode(buf, token_table, pointer_size)
    except (IndexError, struct.error) as exc:  # a table that runs off the buffer
        raise SymbolError(f"kallsyms tables at {token_table:#x} are truncated or corrupt ({exc})") from None


def _decode(buf: bytes, token_table: int, pointer_size: int) -> tuple[Symbols, KallsymsTables]:
    tokens, tt_end = _tokens(buf, token_table)
    token_index = _token_index(buf, tt_end, tokens)
    key = hashlib.blake2b(buf[token_table:token_index + 512], digest_size=16).hexdigest()
    layout = _cache.load("kallsyms-layout", key)
    if isinstance(layout, tuple) and len(layout) == 3 and _layout_holds(buf, token_table, *layout):
        # The search for markers and num_syms is the slow part: reuse where it found them.
        markers_at, names_at, num_syms = (token_table + layout[0], token_table + layout[1], layout[2])
        nm = (num_syms + 255) >> 8
        markers = list(struct.unpack_from(f"<{nm}I", buf, markers_at))
        layout = None
    else:
        markers_at, markers, count_hint = _markers(buf, token_table, pointer_size)
        names_at, num_syms = _names_start(buf, markers_at, markers, pointer_size, count_hint)
    names, types, names_end, preferred, by_name = _decode_names(buf, names_at, num_syms, tokens, markers)
    if not markers_at - 8 <= names_end <= markers_at:
        raise SymbolError(f"kallsyms names end at {names_end:#x}, markers start at {markers_at:#x}")
    offsets_at, base, addresses = _addresses(buf, names_at, num_syms, token_index, pointer_size)
    if layout is None:  # only a layout that decoded is worth remembering
        _cache.store("kallsyms-layout", key, (markers_at - token_table, names_at - token_table, num_syms))
    tables = KallsymsTables(num_syms=names_at - pointer_size if pointer_size == 4 else names_at - 8,
                            names=names_at, markers=markers_at, token_table=token_table,
                            token_index=token_index, offsets=offsets_at, relative_base=base)
    return Symbols(names, addresses, types, preferred, by_name), tables


def _layout_holds(buf: bytes, token_table: int, markers_rel: int, names_rel: int, count: int) -> bool:
    """A cached layout still fits this buffer: markers[0] is 0 and num_syms precedes the names."""
    markers_at, names_at = token_table + markers_rel, token_table + names_rel
    if not 8 <= names_at < markers_at < token_table or not 0 < count <= _MAX_SYMS:
        return False
    return (_U32.unpack_from(buf, markers_at)[0] == 0
            and count in (_U32.unpack_from(buf, names_at - 8)[0], _U32.unpack_from(buf, names_at - 4)[0]))


def _align(value: int, to: int) -> int:
    return (value + to - 1) & -to


def _tokens(buf: bytes, start: int) -> tuple[list[str], int]:
    tokens = []
    pos = start
    for _ in range(256):
        end = buf.find(b"\0", pos, pos + 256)
        if end <= pos:
            raise SymbolError(f"no kallsyms token table at {start:#x}")
        tokens.append(buf[pos:end].decode("latin-1"))
        pos = end + 1
    return tokens, pos


def _token_index(buf: bytes, tt_end: int, tokens: list[str]) -> int:
    expected, off = [], 0
    for token in tokens:
        expected.append(off)
        off += len(token) + 1
    want = struct.pack("<256H", *expected) if off < 0x10000 else None
    if want is None:
        raise SymbolError("kallsyms token table too large")
    for at in range(tt_end, tt_end + 16):
        if buf[at:at + 512] == want:
            return at
    raise SymbolError("kallsyms token index does not match the token table")


def _markers(buf: bytes, token_table: int, pointer_size: int = 8) -> tuple[int, list[int], int | None]:
    """Find ``kallsyms_markers``: right before the token table, or before ``kallsyms_seqs_of_names``
    (labels are aligned to the pointer size).

    Returns (offset, markers, symbol count if it was implied by the seqs table, else None).
    """
    for size, fmt in ((4, _U32), (8, _U64)):
        found = _walk_markers(buf, (token_table & -size) - size, size, fmt)
        if found:
            return found[0], found[1], None
    # 6.2-6.3 (and backports): markers, seqs_of_names (3 bytes per symbol), token_table.
    for count in range(1, min(_MAX_SYMS, token_table // 3)):
        nm = (count + 255) >> 8
        markers_at = token_table - _align(3 * count, pointer_size) - _align(4 * nm, pointer_size)
        if markers_at < 0:
            break
        if buf[markers_at:markers_at + 4] != b"\0\0\0\0" or nm > 1 and not (
                0 < _U32.unpack_from(buf, markers_at + 4)[0] <= 256 * 260):
            continue
        found = _walk_markers(buf, markers_at + 4 * (nm - 1), 4, _U32)
        if found and found[0] == markers_at and len(found[1]) == nm:
            return markers_at, found[1], count
    raise SymbolError(f"no kallsyms markers before the token table at {token_table:#x}")


def _walk_markers(buf: bytes, pos: int, size: int, fmt: struct.Struct) -> tuple[int, list[int]] | None:
    """Walk back over strictly decreasing values down to markers[0] == 0."""
    skipped = 0
    while pos >= 0 and fmt.unpack_from(buf, pos)[0] == 0 and skipped < 8:
        pos -= size
        skipped += size
    values: list[int] = []
    while pos >= 0:
        value = fmt.unpack_from(buf, pos)[0]
        if values and (value >= values[-1] or values[-1] - value > 256 * 260):
            return None
        values.append(value)
        if value == 0:
            break
        pos -= size
    if len(values) >= 2 and values[-1] == 0:
        return pos, values[::-1]
    return None


def _names_start(buf: bytes, markers_at: int, markers: list[int], pointer_size: int,
                 count_hint: int | None) -> tuple[int, int]:
    """Find ``kallsyms_names`` from the preceding ``num_syms`` whose value fits the markers."""
    lo_count, hi_count = (len(markers) - 1) * 256 + 1, len(markers) * 256
    if count_hint is not None:  # align8(3 * count) maps up to 3 counts to one layout
        lo_count, hi_count = count_hint, min(hi_count, count_hint + 2)
    last = markers[-1]
    # The last 1..256 symbols take 2..~260 bytes each after the last marker.
    hi = markers_at - last - 2
    lo = max(8, markers_at - last - 256 * 260 - 8)
    gaps = (8, 4) if pointer_size == 8 else (4,)  # num_syms is a .long right before the names label
    for names_at in range(hi & -4, lo, -4):
        for gap in gaps:
            count = _U32.unpack_from(buf, names_at - gap)[0]
            if lo_count <= count <= hi_count:
                return names_at, count
    raise SymbolError("kallsyms_num_syms not found before kallsyms_names")


def _decode_names(buf: bytes, start: int, count: int, tokens: list[str],
                  markers: list[int]) -> tuple[list[str] | str, str, int, list[int], None]:
    if count > _MAX_SYMS:
        raise SymbolError(f"absurd kallsyms_num_syms {count}")
    key = hashlib.blake2b(buf[start:start + 16] + count.to_bytes(4, "little")
                          + "".join(tokens).encode("latin-1"), digest_size=16)
    pos = start
    end_guess = start + markers[-1] + 256 * 260
    key.update(buf[start:min(end_guess, len(buf))])
    cached = _cache.load("kallsyms", key.hexdigest())
    if isinstance(cached, tuple) and len(cached) == 4:
        joined, types, end, preferred = cached
        # Split and index in Symbols: a marshalled name dict loads slower than it builds.
        return joined, types, end, preferred, None
    names: list[str] = []
    types: list[str] = []
    for i in range(count):
        if i & 0xFF == 0 and pos - start != markers[i >> 8]:
            raise SymbolError(f"kallsyms marker {i >> 8} does not match the names table")
        length = buf[pos]
        pos += 1
        if length & 0x80:
            length = (length & 0x7F) | (buf[pos] << 7)
            pos += 1
        if length == 0 or pos + length > len(buf):
            raise SymbolError(f"bad kallsyms name length at symbol {i}")
        text = "".join([tokens[b] for b in buf[pos:pos + length]])
        pos += length
        types.append(text[0])
        names.append(text[1:])
    joined_types = "".join(types)
    preferred = preferred_globals(names, joined_types)
    _cache.store("kallsyms", key.hexdigest(), ("\n".join(names), joined_types, pos, preferred))
    return names, joined_types, pos, preferred, None


def _addresses(buf: bytes, names_at: int, count: int, token_index: int,
               pointer_size: int) -> tuple[int, int, RelativeAddresses]:
    """Locate offsets + relative_base (before num_syms, or after token_index) and compute addresses."""
    gap = 8 if pointer_size == 8 else 4
    table_len = _align(4 * count, gap)
    candidates = [
        names_at - gap - gap - table_len,          # <= 6.1: offsets, relative_base, num_syms, names
        _align(token_index + 512, gap),             # >= 6.2: ..., token_index, offsets, relative_base
    ]
    fmt = _U64 if pointer_size == 8 else _U32
    kernel_floor = 0xFFFF800000000000 if pointer_size == 8 else 0xC0000000
    for offsets_at in candidates:
        if offsets_at < 0 or offsets_at + table_len + pointer_size > len(buf):
            continue
        base = fmt.unpack_from(buf, offsets_at + table_len)[0]
        if base < kernel_floor:
            continue
        offsets = array("i")
        offsets.frombytes(buf[offsets_at:offsets_at + 4 * count])
        return offsets_at, base, RelativeAddresses(offsets, base, pointer_size)
    raise SymbolError("kallsyms_offsets/kallsyms_relative_base not found")


def decode_at(read: Callable[[int, int], bytes], token_table: int, start: int, end: int,
              window_before: int = 12 << 20, window_after: int = 2 << 20,
              pointer_size: int = 8) -> tuple[Symbols, KallsymsTables, int]:
    """Decode the tables around a token table at physical ``token_table`` (within ``start..end``).

    Returns:
        (symbols, tables with offsets relative to the window, physical base of the window)
    """
    base = max(start, (token_table - window_before) & -4096)
    window = read(base, min(end, token_table + window_after) - base)
    symbols, tables = decode(window, token_table - base, pointer_size=pointer_size)
    return symbols, tables, base


def scan(read: Callable[[int, int], bytes], runs: Iterable[tuple[int, int]], *,
         chunk: int = 32 << 20, window_before: int = 12 << 20, window_after: int = 2 << 20,
         pointer_size: int = 8) -> tuple[Symbols, KallsymsTables, int]:
    """Search physical ranges for kallsyms and decode the first valid tables.

    Args:
        read: ``read(paddr, size) -> bytes`` of guest-physical memory (zero-padded holes).
        runs: ``(start, size)`` ranges to search, in the order to try them.

    Returns:
        (symbols, tables with offsets relative to the returned paddr base, base paddr of the window)

    Raises:
        SymbolError: no valid kallsyms tables anywhere.
    """
    errors = []
    for start, size in runs:
        pos = start
        end = start + size
        while pos < end:
            length = min(chunk + len(DIGITS), end - pos)
            data = read(pos, length)
            for offset in find_token_tables(data):
                try:
                    return decode_at(read, pos + offset, start, end, window_before, window_after, pointer_size)
                except SymbolError as exc:
                    log.debug("kallsyms.candidate_rejected", paddr=hex(pos + offset), reason=str(exc))
                    errors.append(f"{pos + offset:#x}: {exc}")
            pos += chunk
    detail = f" ({'; '.join(errors[:3])})" if errors else ""
    raise SymbolError(f"no kallsyms tables found in guest memory{detail}")
