"""Emit kallsyms tables the way scripts/kallsyms.c lays them out, for decoder tests."""

from __future__ import annotations

import random
import struct


def _align(buf: bytearray, to: int = 8) -> None:
    buf += bytes(-len(buf) % to)


def build(symbols: list[tuple[str, str, int]], *, layout: str = "6.1", base: int = 0xFFFFFFFF81000000,
          absolute_percpu: bool = True) -> tuple[bytes, int]:
    """Tables for ``(name, type, address)`` symbols; returns (bytes, offset of the token table).

    layout: "6.1" (offsets first), "6.1-seqs" (6.2 order: seqs_of_names between markers and
    token table) or "6.4" (num_syms first, offsets after the token index).
    """
    texts = [t + n for n, t, _ in symbols]
    used = sorted({ord(c) for text in texts for c in text})
    pairs: dict[str, int] = {}
    counts: dict[str, int] = {}
    for text in texts:
        for i in range(len(text) - 1):
            counts[text[i:i + 2]] = counts.get(text[i:i + 2], 0) + 1
    free = [c for c in range(256) if c not in used]
    for pair, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:len(free)]:
        pairs[pair] = free[len(pairs)]
    tokens = [chr(c) if c in used else "" for c in range(256)]
    for pair, code in pairs.items():
        tokens[code] = pair
    tokens = [t or "~~" for t in tokens]  # unused codes still hold a token
    names = bytearray()
    markers = []
    for i, text in enumerate(texts):
        if i % 256 == 0:
            markers.append(len(names))
        encoded = bytearray()
        j = 0
        while j < len(text):
            code = pairs.get(text[j:j + 2])
            if code is not None and j + 1 < len(text):
                encoded.append(code)
                j += 2
            else:
                encoded.append(ord(text[j]))
                j += 1
        names.append(len(encoded))
        names += encoded
    offsets = bytearray()
    for name, kind, address in symbols:
        if absolute_percpu and kind in "aA":
            offsets += struct.pack("<i", address)
        elif absolute_percpu:
            offsets += struct.pack("<i", base - 1 - address)
        else:
            offsets += struct.pack("<I", address - base)
    token_table = b"".join(t.encode("latin-1") + b"\0" for t in tokens)
    index, pos = [], 0
    for t in tokens:
        index.append(pos)
        pos += len(t) + 1
    token_index = struct.pack("<256H", *index)
    seqs = b"".join(i.to_bytes(3, "big") for i in sorted(range(len(texts)), key=lambda k: texts[k][1:]))

    out = bytearray(b"\xcc" * 64)  # something before the tables
    _align(out)

    def offsets_block():
        out.extend(offsets)
        _align(out)
        out.extend(struct.pack("<Q", base))
        _align(out)

    if layout in ("6.1", "6.1-seqs"):
        offsets_block()
    out += struct.pack("<I", len(symbols))
    _align(out)
    out += names
    _align(out)
    out += b"".join(struct.pack("<I", m) for m in markers)
    _align(out)
    if layout == "6.1-seqs":
        out += seqs
        _align(out)
    tt = len(out)
    out += token_table
    _align(out)
    out += token_index
    _align(out)
    if layout == "6.4":
        offsets_block()
        out += seqs
        _align(out)
    out += b"\xcc" * 64
    return bytes(out), tt


def symbol_set(count: int = 700, seed: int = 1) -> list[tuple[str, str, int]]:
    """A plausible sorted symbol list: percpu absolutes, then text and data after ``_text``."""
    rng = random.Random(seed)
    base = 0xFFFFFFFF81000000
    syms = [("fixed_percpu_data", "A", 0), ("cpu_number", "A", 0x199E0), ("current_task", "A", 0x1FB80)]
    syms.append(("_text", "T", base))
    addr = base
    words = ["sys", "read", "write", "init", "task", "mm", "page", "lock", "irq", "net", "dev", "x64"]
    for i in range(count):
        addr += rng.randrange(16, 4096, 16)
        name = "_".join(rng.choice(words) for _ in range(rng.randrange(1, 4))) + str(i)
        syms.append((name, rng.choice("TtDdRrBb"), addr))
    syms.append(("linux_banner", "D", addr + 64))
    syms.append(("0123456789", "t", addr + 128))
    return syms
