"""vmwatch.text.shown: what a terminal would act on becomes a visible escape, and nothing else changes."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmwatch.text import shown


class TestShown:
    @pytest.mark.parametrize(("raw", "expected"), [
        ("\x1b[2J\x1b]0;pwn\x07\nx", "\\x1b[2J\\x1b]0;pwn\\x07\\nx"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\u0085\\u009b"),  # NUL, DEL, NEL, CSI (C1)
        ("\u202eexe.txt\u2066\u2069", "\\u202eexe.txt\\u2066\\u2069"),  # bidi override and isolates
        ("\u2028\u200b", "\\u2028\\u200b"),  # line separator, zero-width space
        ("back\\slash", "back\\\\slash"),
        ("\udcff\ud800", "\\xff\\ud800"),  # surrogateescape'd byte, then a lone surrogate
        (b"ok\xff\x1b", "ok\\xff\\x1b"),
        ("café [bold red]x ✓", "café [bold red]x ✓"),
    ])
    def test_examples(self, raw, expected):
        """Each hostile character class is escaped; printable text (markup-looking too) is left alone."""
        assert shown(raw) == expected

    def test_backslash_kept_for_whole_messages(self):
        """backslash=False leaves escapes a message already holds, and still escapes controls."""
        assert shown("name '\\x1b' then \x1b", backslash=False) == "name '\\x1b' then \\x1b"

    @given(st.text())
    def test_printable_one_line_and_unambiguous(self, text):
        """Any text comes out printable (so one line), and distinct inputs stay distinct."""
        out = shown(text)
        assert out.isprintable()
        assert shown(text + "\\x1b") != shown(text + "\x1b")

    @given(st.binary())
    def test_bytes_round_trip(self, data):
        """Bytes show as text plus escapes that decode back to exactly those bytes."""
        assert _unshown(shown(data)) == data


def _unshown(text: str) -> bytes:
    """The inverse of shown() on bytes: \\xNN is that byte, \\uNNNN that character's UTF-8."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode()
            i += 1
            continue
        kind = text[i + 1]
        if kind in "\\nrt":
            out += {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t"}[kind]
            i += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            code = int(text[i + 2:i + 2 + width], 16)
            out += bytes([code]) if kind == "x" else chr(code).encode()
            i += 2 + width
    return bytes(out)


class TestConsoleLogs:
    def test_cli_log_values_escaped(self):
        """The CLI's log renderer escapes string values: a guest name cannot break a log line."""
        from vmwatch import logs

        stream = io.StringIO()
        logs.configure_cli("info", stream)
        try:
            logs.load_structlog().get_logger().info("task seen", comm="\x1b[2J\x1b]0;pwn\x07\nx", pid=7)
        finally:
            logs.load_structlog().reset_defaults()
        line = stream.getvalue()
        assert line.count("\n") == 1 and "\x1b" not in line and "\x07" not in line
        assert "comm=\\x1b[2J\\x1b]0;pwn\\x07\\nx" in line and "pid=7" in line
