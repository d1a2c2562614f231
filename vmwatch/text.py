"""Untrusted text made safe for a terminal: what every guest or image-file string goes through.

A process name, module name, symbol, VMware tag or path read from guest memory or a file is
attacker-chosen. Written raw, ``"\\x1b[2J\\x1b]0;pwn\\x07\\nx"`` clears the analyst's screen, retitles
the window and forges a table row; a U+202E reverses what follows it. :func:`shown` turns every
character a terminal would act on into a visible escape. JSON, the timeline and recordings keep
the exact text; only what is drawn for people is escaped.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# a str from bytes.decode(..., "surrogateescape") holds each undecodable byte as U+DC80..U+DCFF
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def _escape(ch: str) -> str:
    """``\\xNN`` for ASCII controls and undecodable bytes (so ``\\x85`` is always the byte 0x85),
    ``\\uNNNN`` for every other character (U+0085 is ``\\u0085``)."""
    code = ord(ch)
    if code in _ESCAPED_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0x7F:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def shown(value: str | bytes, *, backslash: bool = True) -> str:
    """``value`` with everything a terminal would interpret written as a visible escape.

    Escaped: C0 and C1 controls (ESC, BEL, CR, LF...), DEL, bidi overrides and isolates
    (U+202A-202E, U+2066-2069) and every other character Python does not call printable
    (format characters, line and paragraph separators, unassigned code points), and lone
    surrogates (an undecodable byte kept by ``surrogateescape`` shows as that byte, ``\\xff``).
    Bytes are decoded as UTF-8 with ``surrogateescape`` first, so invalid bytes show as ``\\xNN``.

    Args:
        value: the untrusted text (or bytes).
        backslash: also write ``\\`` as ``\\\\``, so an escape in the output always means a
            character that was escaped (off only for whole messages that already hold escapes).

    Returns:
        One line of printable text; printable text without backslashes comes back unchanged.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if value.isprintable() and (not backslash or "\\" not in value):
        return value  # the common case: one C-level scan, no copy
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\" if backslash else ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(_NAMED.get(ch) or _escape(ch))
    return "".join(out)
