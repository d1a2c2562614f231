"""VMware saved states and snapshots (``.vmss`` / ``.vmsn``), with an optional companion ``.vmem``.

Sources: crash-utility ``vmware_vmss.h``/``vmware_vmss.c`` (written by VMware: followed where
others differ), Volatility 2 ``addrspaces/vmware.py``. Layout:

* header (12 B): magic, version, group count; then ``count`` groups of 80 B: name[64], tags
  offset u64, size u64.
* each group's tag stream runs until a zero tag (two zero bytes). A tag is flags u8 (bits 0-5
  VALSIZE, bits 6-7 number of u32 indices), name length u8, name, indices, then data: VALSIZE
  inline bytes when < 62, else a block: on-disk size, in-memory size (u32 each when
  ``magic & 0xF == 0``, u64 otherwise), pad length u16, pad bytes, data. VALSIZE 62 marks a
  compressed block (algorithm undocumented: reported, never decoded), 63 a plain block.
* group ``memory``: tag ``Memory`` holds all RAM back to back; ``regionPPN[i]``,
  ``regionPageNum[i]``, ``regionSize[i]`` (4 KiB pages) place it in guest-physical space. No
  ``Memory`` (or size 0) means RAM lives in the companion ``.vmem`` file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import attrs

from vmwatch.cpu import GPR_NAMES, Registers
from vmwatch.errors import ImageFormatError
from vmwatch.images.base import Image, Reader, Run, map_file

MAGICS = {
    0xBED2BED0: "32-bit block lengths",
    0xBAD1BAD1: "restored",
    0xBED2BED2: "standard",
    0xBED3BED3: "partial",
    0xBED0BED0: "old",
    0xBAD2BAD2: "no-restore",
}
PAGE = 4096
GROUP = struct.Struct("<64sQQ")
HEADER = struct.Struct("<III")
MAX_GROUPS = 4096
MAX_TAGS = 1 << 20
BLOCK_COMPRESSED = 62
BLOCK = 63
_GPREGS_ORDER = ("rax", "rcx", "rdx", "rbx", "rbp", "rsp", "rsi", "rdi",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip, crash's vmssregs64


@attrs.frozen
class Tag:
    """One tag of one group."""

    group: str
    name: str
    indices: tuple[int, ...]
    flags: int
    data_offset: int
    """File offset of the data (after any block header and pad)."""
    size: int
    """Bytes stored in the file."""
    mem_size: int
    """Bytes in memory (differs from ``size`` only for compressed blocks)."""
    compressed: bool = False
    is_block: bool = False

    @property
    def path(self) -> str:
        """``group/name[i][j]`` as vmwareinfo prints it."""
        return f"{self.group}/{self.name}" + "".join(f"[{i}]" for i in self.indices)


class VmwareImage(Image):
    """A VMware checkpoint (format ``vmware``); RAM from its ``Memory`` tag or the ``.vmem``."""

    format = "vmware"

    def __init__(self, path: str | os.PathLike, *, vmem: str | os.PathLike | None = None) -> None:
        meta_map, _ = map_file(path)
        opened = [meta_map]
        try:
            r = Reader(meta_map, str(path))
            self.magic, self.version, groups = parse_header(r)
            self.groups = groups
            self.tags = parse_tags(r, groups, wide=(self.magic & 0xF) != 0)
            self._index: dict[tuple, Tag] = {}
            for tag in self.tags:  # first occurrence wins, as in a linear search
                self._index.setdefault((tag.group, tag.name, tag.indices), tag)
                self._index.setdefault((tag.group, tag.name, None), tag)
            self._meta = meta_map
            memory = self._find("memory", "Memory")
            if memory is not None and memory.compressed:
                raise r.error("the Memory block is compressed (algorithm undocumented): not supported",
                              memory.data_offset)
            if memory is not None and memory.mem_size and memory.size:
                data, blob_offset, blob_size, data_path = meta_map, memory.data_offset, memory.size, None
            else:
                data_path = Path(vmem) if vmem is not None else companion_vmem(Path(path))
                data, blob_size = map_file(data_path)
                opened.append(data)
                blob_offset = 0
            runs = memory_runs(self, r, blob_offset, blob_size)
            cpus = cpu_registers(self)
        except BaseException:
            for mm in opened:
                mm.close()
            raise
        metadata = {
            "magic": self.magic, "version": self.version, "group_count": len(groups),
            "groups": [g[0] for g in groups], "tag_count": len(self.tags),
            "vmem": str(data_path) if data_path else None,
            "config": self.config(), "screenshot_size": (t.size if (t := self._find("MKSVMX", "imageData")) else None),
        }
        extra = [meta_map] if data is not meta_map else []
        super().__init__(path, data=data, runs=runs, cpus=cpus, metadata=metadata, extra_maps=extra,
                         data_path=data_path)

    # -- tag access ---------------------------------------------------------------------------

    def _find(self, group: str, name: str, indices: tuple[int, ...] | None = None) -> Tag | None:
        """The first tag ``group/name`` (with exactly these indices, if given)."""
        return self._index.get((group, name, indices))

    def tag_bytes(self, tag: Tag, limit: int | None = None) -> bytes:
        """The stored bytes of a tag (the first ``limit`` only, if given)."""
        n = tag.size if limit is None else min(limit, tag.size)
        return bytes(self._meta[tag.data_offset:tag.data_offset + n])

    def tag_value(self, tag: Tag) -> int | None:
        """1/2/4/8-byte inline tags as little-endian integers; ``None`` for anything else."""
        if tag.is_block or tag.size not in (1, 2, 4, 8):
            return None
        return int.from_bytes(self.tag_bytes(tag), "little")

    def config(self) -> str | None:
        """The ``.vmx`` configuration saved in ``Snapshot/cfgFile``."""
        tag = self._find("Snapshot", "cfgFile")
        if tag is None or tag.compressed:
            return None
        return self.tag_bytes(tag).split(b"\0", 1)[0].decode("utf-8", "replace")

    def screenshot(self) -> bytes | None:
        """The PNG in ``MKSVMX/imageData``, if present."""
        tag = self._find("MKSVMX", "imageData")
        if tag is None or tag.compressed:
            return None
        return self.tag_bytes(tag)

    def summary(self) -> list[tuple[str, str]]:
        return [("Magic", f"{self.magic:#x} (Version {self.magic & 0xF})"),
                ("Group count", f"{len(self.groups):#x}"), ("CPUs", str(len(self.cpus)))]


def parse_header(r: Reader) -> tuple[int, int, list[tuple[str, int, int]]]:
    """Header and group table: (magic, version, [(name, tags_offset, size)])."""
    magic, version, count = r.unpack(HEADER, 0, "VMware header")
    if magic not in MAGICS:
        raise r.error(f"bad VMware checkpoint magic {magic:#x}", 0)
    if count > MAX_GROUPS:
        raise r.error(f"absurd group count {count}", 8)
    r.need(HEADER.size, count * GROUP.size, f"{count} group descriptors")
    groups = []
    for i in range(count):
        raw_name, offset, size = r.unpack(GROUP, HEADER.size + i * GROUP.size)
        groups.append((raw_name.split(b"\0", 1)[0].decode("latin-1"), offset, size))
    return magic, version, groups


def parse_tags(r: Reader, groups: list[tuple[str, int, int]], *, wide: bool) -> list[Tag]:
    """Every tag of every group, bounds-checked against the file."""
    width = 8 if wide else 4
    sizes = struct.Struct("<QQH" if wide else "<IIH")
    tags: list[Tag] = []
    buf = r.buf
    for group, offset, _ in groups:
        pos = offset
        while True:
            r.need(pos, 2, f"tag header in group {group!r}")
            flags, name_len = buf[pos], buf[pos + 1]
            if flags == 0 and name_len == 0:
                break
            if len(tags) >= MAX_TAGS:
                raise r.error(f"more than {MAX_TAGS} tags: absurd", pos)
            n_idx = flags >> 6
            valsize = flags & 0x3F
            name = r.bytes(pos + 2, name_len, "tag name").decode("latin-1")
            idx_off = pos + 2 + name_len
            indices = r.unpack(struct.Struct(f"<{n_idx}I"), idx_off, "tag indices") if n_idx else ()
            data_off = idx_off + 4 * n_idx
            if valsize >= BLOCK_COMPRESSED:
                size, mem_size, pad = r.unpack(sizes, data_off, f"block header of {group}/{name}")
                data_off += 2 * width + 2 + pad
                r.need(data_off, size, f"block {group}/{name}")
                tags.append(Tag(group, name, tuple(indices), flags, data_off, size, mem_size,
                                compressed=valsize == BLOCK_COMPRESSED, is_block=True))
            else:
                size = valsize
                r.need(data_off, size, f"tag {group}/{name}")
                tags.append(Tag(group, name, tuple(indices), flags, data_off, size, size))
            pos = data_off + size
    return tags


def companion_vmem(path: Path) -> Path:
    """The ``.vmem`` next to a metadata-only ``.vmss``/``.vmsn`` (same base name)."""
    candidate = path.with_suffix(".vmem")
    if candidate == path or not candidate.exists():
        raise ImageFormatError(
            f"no Memory tag and no companion {candidate.name}: pass the .vmem path explicitly",
            path=str(path))
    return candidate


def memory_runs(img: VmwareImage, r: Reader, blob_offset: int, blob_size: int) -> list[Run]:
    """Place the RAM blob in guest-physical space from the ``memory`` group's region tags."""
    def u(name: str, indices: tuple[int, ...] | None = None) -> int | None:
        tag = img._find("memory", name, indices)
        return None if tag is None else img.tag_value(tag)

    count = u("regionsCount") or 0
    if not count:
        return [Run(0, blob_size, blob_offset)]
    if count > 4096:
        raise r.error(f"absurd regionsCount {count}")
    runs = []
    for i in range(count):
        ppn, pages = u("regionPPN", (i,)), u("regionSize", (i,))
        if ppn is None or pages is None:
            raise r.error(f"region {i} of {count} lacks regionPPN or regionSize")
        page_num = u("regionPageNum", (i,)) or 0
        if (page_num + pages) * PAGE > blob_size:
            raise r.error(f"region {i} (pages {page_num:#x}+{pages:#x}) lies past the end of "
                          f"the memory data ({blob_size:#x} bytes)")
        runs.append(Run(ppn * PAGE, pages * PAGE, blob_offset + page_num * PAGE))
    return runs


def cpu_registers(img: VmwareImage) -> list[Registers]:
    """Saved vCPU state from the ``cpu`` group (scalar tags first, block forms as fallback)."""
    count_tag = img._find("cpu", "cpu:numVCPUs")
    count = img.tag_value(count_tag) if count_tag else None
    if not count:
        return []
    count = min(count, 1024)
    regs: list[dict] = [{} for _ in range(count)]
    for tag in img.tags:
        if tag.group != "cpu" or not tag.indices or tag.indices[0] >= count:
            continue
        cpu = regs[tag.indices[0]]
        name = tag.name
        value = img.tag_value(tag)
        if name in GPR_NAMES or name == "rip":
            if value is not None and tag.size == 8:
                cpu[name] = value
        elif name in ("eflags", "EFLAGS", "rflags") and value is not None:
            cpu["rflags"] = value
        elif name in ("CR64", "CR") and len(tag.indices) == 2 and value is not None:
            if tag.indices[1] in (0, 2, 3, 4, 8):
                key = f"cr{tag.indices[1]}"
                if name == "CR64" or key not in cpu:
                    cpu[key] = value
        elif name == "CR64" and tag.is_block and tag.size == 72 and not tag.compressed:
            crs = struct.unpack("<9Q", img.tag_bytes(tag))
            for n in (0, 2, 3, 4, 8):
                cpu.setdefault(f"cr{n}", crs[n])
        elif name == "gpregs" and tag.is_block and tag.size == 128 and not tag.compressed:
            for reg, v in zip(_GPREGS_ORDER, struct.unpack("<16Q", img.tag_bytes(tag))):
                cpu.setdefault(reg, v)
        elif name in ("IDTR", "GDTR"):
            kind = name[0].lower() + "dtr"
            if len(tag.indices) == 2 and value is not None:
                part = tag.indices[1]
                if part == 0:
                    cpu[f"{kind}_limit"] = value
                elif part in (1, 2):
                    cpu.setdefault(f"_{kind}_parts", {})[part] = value
            elif tag.is_block and tag.size == 10 and not tag.compressed:
                limit, base = struct.unpack("<HQ", img.tag_bytes(tag))
                cpu.setdefault(f"{kind}_limit", limit)
                cpu.setdefault(f"{kind}_base", base)
    out = []
    for i, cpu in enumerate(regs):
        for kind in ("idtr", "gdtr"):
            parts = cpu.pop(f"_{kind}_parts", None)
            if parts:
                cpu[f"{kind}_base"] = parts.get(1, 0) | (parts.get(2, 0) << 32)
        out.append(Registers(vcpu=i, **cpu))
    return out
