"""Strings from image files reach the terminal escaped; ``--json`` keeps them exact."""

from __future__ import annotations

import json
import struct

from vmwatch.errors import ImageFormatError
from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

from corpus import PAGE

# clears the screen, retitles the window, forges lines (LF, CR, NEL), reverses text
HOSTILE = "\x1b[2J\x1b]0;pwn\x07\n\r\nforged\x85\u202ex"
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\x85", "\u202e")


def _hostile_block_past_eof() -> bytes:
    """A .vmss whose block tag, named HOSTILE, claims 1 TiB: the error quotes the tag name."""
    data = build.vmware({"memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True)],
                         "evil": [build.Tag(HOSTILE, bytes(64), block=True)]})
    size_at = data.index(HOSTILE.encode()) + len(HOSTILE.encode())
    return data[:size_at] + struct.pack("<Q", 1 << 40) + data[size_at + 8:]


class TestVmwareTagNames:
    def test_error_is_one_escaped_line(self, tmp_path):
        """A mutated .vmss with a control-character tag name: exit 2, exactly one line on stderr."""
        path = tmp_path / "evil.vmss"
        path.write_bytes(_hostile_block_past_eof())
        for args in (("info",), ("info", "--json"), ("ps",)):
            result = run_cli(args[0], path, *args[1:])
            assert result.status == 2, args
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("vmwatch: error: block evil/")
            assert not any(c in result.stderr for c in RAW_CONTROLS)
            assert "\\x1b[2J\\x1b]0;pwn\\x07\\n\\r\\n" in result.stderr
            assert result.stdout == ""

    def test_api_message_escaped_attributes_exact(self, tmp_path):
        """str(exc) is one printable line; the exception's path attribute is the exact path."""
        path = tmp_path / "evil\x1b[31m\n.vmss"
        path.write_bytes(_hostile_block_past_eof())
        try:
            open_image(path).close()
        except ImageFormatError as exc:
            assert str(exc).isprintable()
            assert exc.path == str(path)
            assert "evil\\x1b[31m\\n.vmss" in str(exc)
        else:
            raise AssertionError("no ImageFormatError")

    def test_info_table_escapes_json_exact(self, tmp_path):
        """info's tag table shows the hostile name escaped on one row; --json holds the exact name."""
        extra = {"evil": [build.Tag(HOSTILE, 7), build.Tag("[bold red]x", 8)]}
        path = tmp_path / "ok.vmss"
        path.write_bytes(build.vmware_checkpoint(bytes(PAGE), regions=[(0, 0, 1)], extra=extra))
        clean = tmp_path / "clean.vmss"
        clean.write_bytes(build.vmware_checkpoint(bytes(PAGE), regions=[(0, 0, 1)],
                                                  extra={"evil": [build.Tag("a", 7), build.Tag("b", 8)]}))
        result = run_cli("info", path)
        assert result.status == 0, result.stderr
        assert not any(c in result.stdout for c in RAW_CONTROLS)
        assert result.stdout.count("\n") == run_cli("info", clean).stdout.count("\n")
        row = next(line for line in result.stdout.splitlines() if "pwn" in line)
        # the name's UTF-8 bytes read as latin-1 (as the format stores them): U+0085 is C2 85
        assert "evil/\\x1b[2J\\x1b]0;pwn\\x07\\n\\r\\nforged\u00c2\\u0085" in row and row.endswith(" 0x7")
        assert "evil/[bold red]x" in result.stdout
        tags = json.loads(run_cli("info", path, "--json").stdout)["tags"]
        names = {t["name"] for t in tags}
        assert "evil/" + HOSTILE.encode().decode("latin-1") in names  # exact: tag names are latin-1 bytes
