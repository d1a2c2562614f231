"""gdb remote protocol target description: target.xml and the register layout of a ``g`` packet."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from typing import Callable

import attrs

from vmwatch.errors import RemoteProtocolError


# ---------------------------------------------------------------- target description


@attrs.frozen
class RegisterInfo:
    """One register of the target description."""

    name: str
    regnum: int
    bitsize: int
    offset: int
    """Byte offset in the ``g`` packet."""

    @property
    def size(self) -> int:
        return self.bitsize // 8


def _declare_xi(document: bytes) -> bytes:
    """QEMU's target.xml uses xi:include without declaring the prefix: declare it."""
    if b"xi:" in document and b"xmlns:xi" not in document:
        start = document.find(b"<target")
        if start >= 0:
            cut = start + len(b"<target")
            document = document[:cut] + b' xmlns:xi="http://www.w3.org/2001/XInclude"' + document[cut:]
    return document


def parse_target_xml(document: bytes) -> tuple[list[str], list[tuple[str, int, int | None]]]:
    """Parse one target-description document.

    Returns ``(included annexes, [(register name, bitsize, explicit regnum or None)])``.
    ElementTree drops XML comments, so commented-out registers never shift the offsets.
    Architecture and feature names are ignored; only ``reg`` and ``xi:include`` matter.

    Raises:
        RemoteProtocolError: not well-formed XML or a register without name/bitsize.
    """
    try:
        root = ElementTree.fromstring(_declare_xi(document))
    except ElementTree.ParseError as exc:
        raise RemoteProtocolError(f"bad gdb target description: {exc}") from None
    includes: list[str] = []
    regs: list[tuple[str, int, int | None]] = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "include" and el.get("href"):
            includes.append(el.get("href", ""))
        elif tag == "reg":
            try:
                name = el.attrib["name"]
                bitsize = int(el.attrib["bitsize"])
                regnum = int(el.attrib["regnum"]) if "regnum" in el.attrib else None
            except (KeyError, ValueError):
                raise RemoteProtocolError(f"bad register in target description: {el.attrib!r}") from None
            if bitsize <= 0 or bitsize % 8 or bitsize > 4096:
                raise RemoteProtocolError(f"register {name!r} has odd bitsize {bitsize}")
            regs.append((name, bitsize, regnum))
    return includes, regs


def target_architecture(document: bytes) -> str | None:
    """The ``<architecture>`` of a target description (``aarch64``, ``i386:x86-64``), or None."""
    try:
        root = ElementTree.fromstring(_declare_xi(document))
    except ElementTree.ParseError as exc:
        raise RemoteProtocolError(f"bad gdb target description: {exc}") from None
    found = root.find("architecture")
    return found.text.strip() if found is not None and found.text else None


def register_layout(fetch: Callable[[str], bytes], annex: str = "target.xml") -> list[RegisterInfo]:
    """Build the ``g`` packet layout by following ``xi:include`` from ``annex``.

    ``fetch(annex) -> document`` is supplied by the caller (the I/O side). Registers are numbered
    in document order unless ``regnum`` says otherwise; offsets accumulate in number order.
    """
    collected: list[tuple[str, int, int | None]] = []
    seen: set[str] = set()

    def walk(name: str, depth: int) -> None:
        if name in seen or depth > 8:
            raise RemoteProtocolError(f"target description include loop at {name!r}")
        seen.add(name)
        includes, regs = parse_target_xml(fetch(name))
        collected.extend(regs)
        for inc in includes:
            walk(inc, depth + 1)

    walk(annex, 0)
    numbered: list[tuple[int, str, int]] = []
    next_num = 0
    for name, bitsize, regnum in collected:
        if regnum is not None:
            next_num = regnum
        numbered.append((next_num, name, bitsize))
        next_num += 1
    numbered.sort()
    out, offset = [], 0
    for regnum, name, bitsize in numbered:
        out.append(RegisterInfo(name, regnum, bitsize, offset))
        offset += bitsize // 8
    return out


def parse_xfer(payload: bytes) -> tuple[bytes, bool]:
    """``qXfer`` reply: ``m<data>`` (more follows) or ``l<data>`` (last). Returns (data, last)."""
    if payload[:1] not in (b"m", b"l"):
        raise RemoteProtocolError(f"bad qXfer reply {payload[:40]!r}")
    return payload[1:], payload[:1] == b"l"
