"""The lab guest's kernel: the current Debian kernel package, downloaded and unpacked once per user.

``linux-image-amd64`` (or ``-686``, ``-686-pae``) is a meta package; apt tells which versioned
``linux-image-<release>`` it depends on, so no kernel version is written down anywhere. The
unpacked package is kept whole (vmlinuz, System.map stub, config, modules) because other parts of
vmwatch want its modules and config too.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import structlog

from vmwatch.errors import LabError
from vmwatch.lab.apt import Apt, run
from vmwatch.lab.cache import cache_dir, install_dir

log = structlog.get_logger()

RESOLVE_TTL = 24 * 3600
"""Seconds a resolved kernel package name is trusted before apt is asked again."""

ARCHES = {
    # lab arch -> (meta package, Debian architecture, QEMU system emulator)
    "amd64": ("linux-image-amd64", "amd64", "qemu-system-x86_64"),
    "686": ("linux-image-686", "i386", "qemu-system-i386"),
    "686-pae": ("linux-image-686-pae", "i386", "qemu-system-i386"),
    "arm64": ("linux-image-arm64", "arm64", "qemu-system-aarch64"),
}


@attrs.frozen
class KernelPackage:
    """An unpacked Debian kernel package in the cache."""

    arch: str
    package: str
    """Versioned package name, e.g. ``linux-image-6.1.0-26-amd64``."""
    version: str
    """Debian package version."""
    release: str
    """``uname -r`` of the kernel, e.g. ``6.1.0-26-amd64``."""
    root: Path
    """Where the package is unpacked (holds ``boot/`` and ``lib/modules/``)."""

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    def vmlinux(self) -> Path:
        """The uncompressed kernel ELF inside vmlinuz (extracted once, kept beside it).

        QEMU boots it directly through its PVH entry note: no decompression under TCG (seconds
        faster), but also no KASLR, which the decompressor does.
        """
        path = self.root / "boot" / f"vmlinux-{self.release}"
        if not path.exists():
            elf = extract_vmlinux(self.vmlinuz.read_bytes())
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(elf)
            os.replace(tmp, path)
        return path

    def debug_vmlinux(self) -> Path:
        """The vmlinux with DWARF and full symbols from this kernel's ``-dbg`` package (cached)."""
        return ensure_debug_vmlinux(self)

    @property
    def system_map(self) -> Path:
        """Debian ships a stub here (the real map is in the -dbg package); kept for completeness."""
        return self.root / "boot" / f"System.map-{self.release}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def module_path(self, name: str) -> Path:
        """The file of module ``name`` (``-`` and ``_`` are the same in module names)."""
        index = self._module_index()
        key = name.replace("-", "_")
        if key not in index:
            raise LabError(f"kernel {self.release} has no module {name!r}")
        return index[key]

    def module_with_deps(self, name: str) -> list[tuple[str, bytes]]:
        """``(name, uncompressed .ko bytes)`` for ``name`` and everything it needs, dependencies first."""
        ordered: list[tuple[str, bytes]] = []
        seen: set[str] = set()

        def visit(mod: str, depth: int) -> None:
            key = mod.replace("-", "_")
            if key in seen:
                return
            if depth > 64:
                raise LabError(f"module dependency chain of {name!r} is too deep")
            seen.add(key)
            data = read_module(self.module_path(key))
            for dep in modinfo(data).get("depends", "").split(","):
                if dep:
                    visit(dep, depth + 1)
            ordered.append((key, data))

        visit(name, 0)
        return ordered

    def _module_index(self) -> dict[str, Path]:
        found = {}
        for path in (self.modules_dir / "kernel").rglob("*.ko*"):
            found[path.name.split(".ko")[0].replace("-", "_")] = path
        return found


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel from a bzImage's compressed payload (boot protocol 2.08+ header fields)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise LabError("vmlinuz is not a bzImage (no HdrS boot header)")
    protocol, = struct.unpack_from("<H", bzimage, 0x206)
    if protocol < 0x208:
        raise LabError(f"bzImage boot protocol {protocol:#x} predates payload fields (2.08)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        decompressor = lzma.LZMADecompressor()
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        decompressor = zstandard.ZstdDecompressor().decompressobj()
    elif payload.startswith(b"\x1f\x8b"):
        import zlib

        decompressor = zlib.decompressobj(wbits=31)
    else:
        raise LabError(f"bzImage payload compression {payload[:4].hex()} is not supported (xz, zstd, gzip)")
    try:
        elf = decompressor.decompress(payload)
    except Exception as exc:  # lzma.LZMAError, zlib.error, zstandard.ZstdError: all mean corrupt input
        raise LabError(f"bzImage payload does not decompress: {exc}") from exc
    if not decompressor.eof:
        raise LabError("bzImage payload is truncated")
    if not elf.startswith(b"\x7fELF"):
        raise LabError("bzImage payload is not an ELF kernel")
    return elf


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressing ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz`` on the host."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (first value wins)."""
    section = _elf_section(elf, ".modinfo")
    info: dict[str, str] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
    return info


def _elf_section(elf: bytes, wanted: str) -> bytes:
    if len(elf) < 0x34 or elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] != 1:
        raise LabError("kernel module is not a little-endian ELF file")
    try:
        if elf[4] == 2:
            shoff, = struct.unpack_from("<Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
            fmt = "<IIQQQQ"
        else:
            shoff, = struct.unpack_from("<I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x2E)
            fmt = "<IIIIII"
        # Fields used: sh_name [0], sh_offset [4], sh_size [5].
        headers = [struct.unpack_from(fmt, elf, shoff + i * shentsize) for i in range(shnum)]
        strtab = headers[shstrndx]
        for header in headers:
            start = strtab[4] + header[0]
            if elf[start:elf.index(b"\0", start)] == wanted.encode():
                return elf[header[4]:header[4] + header[5]]
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise LabError(f"kernel module ELF is malformed: {exc}") from exc
    raise LabError(f"kernel module has no {wanted} section")


def ensure_kernel(arch: str = "amd64", *, cache: Path | None = None) -> KernelPackage:
    """Resolve, download and unpack the current Debian kernel for ``arch`` (cached).

    With a kernel of this flavour already unpacked, no network is used unless the local apt lists
    name a newer one; that download gets one try, and the cached kernel is used if it fails.

    Raises:
        LabError: no kernel of this flavour in the cache and none to be had (says why, and what to do).
    """
    if arch not in ARCHES:
        raise LabError(f"unknown lab arch {arch!r} (choose from {', '.join(ARCHES)})")
    meta, debian_arch, _ = ARCHES[arch]
    base = (cache or cache_dir()) / "kernels"
    base.mkdir(parents=True, exist_ok=True)
    # Asking apt costs seconds; its answer is reused for a day.
    resolved = base / f"resolved-{arch}.json"
    known = _resolved_dir(base, resolved)
    if known is not None and time.time() - resolved.stat().st_mtime < RESOLVE_TTL:
        return _load(arch, known)
    cached = known or _newest_cached(base, arch)
    try:
        apt = Apt.for_arch(debian_arch, cache or cache_dir())
        if cached is not None:
            apt = attrs.evolve(apt, retry_delays=())
        package, version = apt.resolve(meta, update=cached is None)
        root = base / f"{package}_{version}_{debian_arch}"
        if not (root / ".complete").exists():
            _download_and_unpack(apt, package, version, root)
    except LabError as exc:
        if cached is None:
            raise LabError(f"no {meta} ({debian_arch}) kernel in {base}, and apt cannot get one: {exc}") from exc
        log.warning("lab.kernel.apt_failed_using_cache", error=str(exc), cached=str(cached))
        return _load(arch, cached)
    tmp = resolved.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"dir": root.name}))
    os.replace(tmp, resolved)
    return _load(arch, root)


def _resolved_dir(base: Path, resolved: Path) -> Path | None:
    """The unpacked kernel that apt last named for this lab arch, if it is complete."""
    try:
        root = base / json.loads(resolved.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return root if (root / ".complete").exists() else None


def _newest_cached(base: Path, arch: str) -> Path | None:
    """The newest complete kernel of exactly ``arch``'s flavour: ``amd64`` never takes an
    ``rt-amd64`` kernel, nor ``686`` a ``686-pae`` one, though each pair shares a Debian arch."""
    meta, debian_arch, _ = ARCHES[arch]
    flavour = meta.removeprefix("linux-image-")
    # linux-image-<ABI>-<flavour>_<version>_<arch>, the ABI as 6.1.0-26 or 6.12.43+deb13.
    name = re.compile(rf"linux-image-[0-9][^-_]*(?:-[0-9]+)?-{re.escape(flavour)}_[^_]+_{re.escape(debian_arch)}")
    found = [p.parent for p in base.glob("*/.complete") if name.fullmatch(p.parent.name)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def ensure_debug_vmlinux(kernel: KernelPackage) -> Path:
    """``usr/lib/debug/boot/vmlinux-<release>`` of ``linux-image-<release>-dbg``, same version as ``kernel``.

    The package is large (some 760 MB for i386, 3.4 GB unpacked: mostly modules' debug files), so
    only the vmlinux is kept: the .deb, checked by apt against the signed archive, is streamed
    through ``dpkg-deb --fsys-tarfile`` into ``tar`` for that one member and then deleted. Its
    build id must equal the one of the kernel the lab boots. Timings go to ``fetch.json`` beside it.
    """
    debian_arch = ARCHES[kernel.arch][1]
    package = f"{kernel.package}-dbg"
    final = kernel.root.parent / f"{package}_{kernel.version}_{debian_arch}"
    vmlinux = final / f"vmlinux-{kernel.release}"
    if vmlinux.is_file():
        return vmlinux
    for tool in ("dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is missing (install the Debian package {'dpkg' if tool == 'dpkg-deb' else tool})")
    apt = Apt.for_arch(debian_arch, kernel.root.parent.parent)
    apt.ensure_lists(package)
    log.info("lab.kernel.debug_download", package=package, version=kernel.version)
    with tempfile.TemporaryDirectory(dir=kernel.root.parent, prefix=".dl-") as tmp:
        started = time.monotonic()
        deb = apt.download(package, kernel.version, Path(tmp))
        downloaded = time.monotonic()
        deb_size = deb.stat().st_size
        unpacked = Path(tmp) / "root"
        unpacked.mkdir()
        _extract_member(deb, f"./usr/lib/debug/boot/vmlinux-{kernel.release}", unpacked)
        deb.unlink()
        extracted = unpacked / "usr" / "lib" / "debug" / "boot" / vmlinux.name
        if not extracted.is_file() or _head(extracted, 4) != b"\x7fELF":
            raise LabError(f"{package} {kernel.version} has no ELF usr/lib/debug/boot/{vmlinux.name}")
        ours, theirs = build_id(extracted), build_id(kernel.vmlinux())
        if ours != theirs:
            raise LabError(f"{package} {kernel.version}: build id {ours} is not the booted kernel's {theirs}")
        os.replace(extracted, unpacked / vmlinux.name)
        shutil.rmtree(unpacked / "usr")
        (unpacked / "fetch.json").write_text(json.dumps({
            "package": package, "version": kernel.version, "deb_bytes": deb_size,
            "download_s": round(downloaded - started, 2), "extract_s": round(time.monotonic() - downloaded, 2),
            "vmlinux_bytes": (unpacked / vmlinux.name).stat().st_size}) + "\n")
        install_dir(unpacked, final)
    log.info("lab.kernel.debug_ready", path=str(vmlinux), deb_bytes=deb_size)
    return vmlinux


def _extract_member(deb: Path, member: str, into: Path) -> None:
    """Stream one file out of a .deb's data archive; tar stops after it (``--occurrence``)."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        tar = subprocess.run(["tar", "-x", "-C", str(into), "--occurrence=1", member],
                             stdin=dpkg.stdout, capture_output=True, text=True)
    finally:
        dpkg.stdout.close()  # dpkg-deb gets SIGPIPE once tar has what it wanted
        dpkg.wait()
    if tar.returncode != 0:
        raise LabError(f"extracting {member} from {deb.name} failed: {tar.stderr.strip()[-300:]}")


def _head(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def build_id(path: Path) -> str | None:
    """The GNU build id (hex) from an ELF file's note segments, or None."""
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            for segment in ELFFile(f).iter_segments("PT_NOTE"):
                for note in segment.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return note["n_desc"]
    except Exception as exc:  # noqa: BLE001 - pyelftools raises anything on a corrupt file
        raise LabError(f"unreadable ELF notes: {type(exc).__name__}: {exc}") from None
    return None


def _load(arch: str, root: Path) -> KernelPackage:
    package, version, _ = root.name.split("_")
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise LabError(f"kernel package unpacked at {root} has no boot/vmlinuz-*")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    return KernelPackage(arch=arch, package=package, version=version, release=release, root=root)


def _download_and_unpack(apt: Apt, package: str, version: str, root: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise LabError("dpkg-deb is missing (install the Debian package dpkg)")
    log.info("lab.kernel.download", package=package, version=version)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".dl-") as tmp:
        deb = apt.download(package, version, Path(tmp))
        unpacked = Path(tmp) / "root"
        run(["dpkg-deb", "-x", str(deb), str(unpacked)], "unpacking the kernel package")
        shutil.rmtree(unpacked / "usr" / "share" / "doc", ignore_errors=True)
        (unpacked / ".complete").write_text(f"{package} {version}\n")
        install_dir(unpacked, root)
