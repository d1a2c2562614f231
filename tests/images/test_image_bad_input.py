"""Hostile image files: every one gives ImageFormatError from the API and exit 2 + one line from the CLI."""

from __future__ import annotations

import struct

import pytest

from vmwatch.errors import ImageFormatError
from vmwatch.images import open_image
from vmwatch.testing import imagebuilders as build
from vmwatch.testing.cli import run_cli

from corpus import PAGE, put_u32, put_u64, valid_files

VALID = valid_files()


def _vmware_tag_offset(data: bytes, group: str) -> int:
    count = struct.unpack_from("<I", data, 8)[0]
    for i in range(count):
        name, offset, _ = struct.unpack_from("<64sQQ", data, 12 + 80 * i)
        if name.rstrip(b"\0").decode() == group:
            return offset
    raise KeyError(group)


def _bad_files() -> dict[str, bytes]:
    v = VALID
    bad = {}
    for name, data in v.items():
        bad[f"{name}-truncated-by-one"] = data[:-1]
        bad[f"{name}-truncated-in-header"] = data[:20]
    # wrong magics / classes
    bad["elf-bad-class"] = v["qemu64"][:4] + b"\x07" + v["qemu64"][5:]
    bad["elf-big-endian"] = v["qemu64"][:5] + b"\x02" + v["qemu64"][6:]
    bad["elf-not-core"] = v["qemu64"][:16] + struct.pack("<H", 2) + v["qemu64"][18:]
    bad["lime-version-9"] = put_u32(v["lime"], 4, 9)
    bad["vbox-bad-descriptor-magic"] = build.vbox_core([build.Load(0, bytes(PAGE))], [{}], magic=0x12345678)
    bad["windows-bad-bitmap-header"] = v["windows-bitmap"][:0x2000] + b"XXXX" + v["windows-bitmap"][0x2004:]
    # runs past the end of the file
    bad["elf-load-past-eof"] = put_u64(v["qemu64"], 64 + 56 + 8, len(v["qemu64"]) - 16)  # first PT_LOAD p_offset
    bad["lime-huge-range"] = put_u64(v["lime"], 16, 0xFFFFFFFFFFFF)
    bad["vmware-region-past-blob"] = build.vmware_checkpoint(bytes(PAGE), regions=[(0, 0, 2)])
    bad["windows-more-pages-than-file"] = put_u64(v["windows64"], 0x98 + 8, 0x100000)
    # overlapping runs
    bad["elf-overlap"] = build.qemu_elf([build.Load(0, bytes(2 * PAGE)), build.Load(PAGE, bytes(PAGE))])
    bad["lime-backwards"] = build.lime([(0x5000, bytes(PAGE)), (0x5800, bytes(PAGE))])
    bad["vmware-overlapping-regions"] = build.vmware_checkpoint(bytes(2 * PAGE), regions=[(0, 0, 2), (1, 0, 1)])
    # absurd counts
    bad["elf-absurd-phnum"] = v["qemu64"][:56] + struct.pack("<H", 0xFFFE) + v["qemu64"][58:]
    bad["elf-xnum-absurd-count"] = put_u32(v["qemu-xnum"], 64 + 4 * 56 + 44, 0xFFFFFFF0)  # section 0 sh_info
    bad["vmware-absurd-groups"] = put_u32(v["vmware"], 8, 0x7FFFFFFF)
    bad["vmware-groups-past-eof"] = put_u32(v["vmware"], 8, 4000)
    bad["vmware-absurd-regions"] = build.vmware_checkpoint(bytes(PAGE), regions=[(0, 0, 1)], extra={})
    bad["vmware-absurd-regions"] = bad["vmware-absurd-regions"].replace(
        b"\x04\x0cregionsCount\x01\x00\x00\x00", b"\x04\x0cregionsCount\xff\xff\xff\x00")
    bad["windows-absurd-runs"] = put_u32(v["windows64"], 0x88, 0x10000000)
    bad["windows32-absurd-runs"] = put_u32(v["windows32"], 0x64, 0x10000000)
    # tags whose lengths point outside the file
    mem = _vmware_tag_offset(v["vmware32"], "memory")
    bad["vmware-tags-offset-past-eof"] = v["vmware32"].replace(
        struct.pack("<Q", mem), struct.pack("<Q", len(v["vmware32"]) + 100), 1)
    block = build.vmware({"memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True)]})
    size_at = block.index(b"Memory") + 6 + 8
    bad["vmware-block-size-past-eof"] = put_u64(block, size_at, 1 << 40)
    bad["vmware-pad-past-eof"] = block[:size_at + 16] + b"\xff\xff" + block[size_at + 18:]
    tail = build.vmware({"memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True)],
                         "last": [build.Tag("n", 5)]})
    name_len_at = tail.rindex(b"n\x05") - 1
    bad["vmware-name-length-past-eof"] = tail[:name_len_at] + b"\xff" + tail[name_len_at + 1:]
    bad["vmware-indices-past-eof"] = tail[:name_len_at - 1] + b"\xc4" + tail[name_len_at:]
    bad["vmware-compressed-memory"] = build.vmware(
        {"memory": [build.Tag("Memory", bytes(PAGE), (0, 0), block=True, compressed=True)]})
    return bad


BAD = _bad_files()


@pytest.mark.parametrize("name", sorted(BAD))
def test_api_raises_image_format_error(tmp_path, name):
    """open_image raises ImageFormatError (with the path) for each hostile file."""
    path = tmp_path / f"{name}.img"
    path.write_bytes(BAD[name])
    with pytest.raises(ImageFormatError) as exc:
        open_image(path).close()
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("command", [("info",), ("info", "--json"), ("convert", "-o", "{out}")])
@pytest.mark.parametrize("name", ["elf-overlap", "lime-huge-range", "vmware-block-size-past-eof",
                                  "windows-absurd-runs", "qemu64-truncated-by-one", "vbox-truncated-in-header"])
def test_cli_one_line_exit_2(tmp_path, name, command):
    """The CLI turns each into exit status 2 and exactly one line on stderr, no traceback."""
    path = tmp_path / f"{name}.img"
    path.write_bytes(BAD[name])
    args = [c.format(out=tmp_path / "out.raw") for c in command]
    result = run_cli(args[0], str(path), *args[1:])
    assert result.status == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("vmwatch: error:")
    assert result.stdout == ""


def test_cli_missing_file(tmp_path):
    """A path that does not exist is one line and exit 2."""
    result = run_cli("info", str(tmp_path / "nope.raw"))
    assert result.status == 2 and len(result.stderr.strip().splitlines()) == 1
