"""The busybox the lab's initramfs is built around: the host's static one, or a foreign arch's from Debian."""

from __future__ import annotations

import tempfile
from pathlib import Path

from vmwatch.errors import LabError
from vmwatch.lab.apt import Apt, run
from vmwatch.lab.cache import cache_dir, install_dir
from vmwatch.lab.kernel import ARCHES


def busybox_for(arch: str) -> Path:
    """A static busybox binary for lab arch ``arch`` (downloaded and cached for a foreign one)."""
    if arch == "amd64":
        path = Path("/bin/busybox")
        if not path.exists():
            raise LabError("/bin/busybox is missing (install the Debian package busybox-static)")
        return path
    return ensure_foreign_busybox(ARCHES[arch][1], cache_dir())


def ensure_foreign_busybox(debian_arch: str, cache: Path) -> Path:
    """A static busybox for a guest whose architecture differs from the host's (i386 on amd64)."""
    base = cache / "busybox" / debian_arch
    done = sorted(base.glob("*/bin/busybox"), key=lambda p: p.stat().st_mtime)
    if done:
        return done[-1]
    apt = Apt.for_arch(debian_arch, cache)
    apt.ensure_lists("busybox-static")
    version = apt.candidate("busybox-static")
    if not version:
        raise LabError(f"apt knows no busybox-static for {debian_arch}")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".dl-") as tmp:
        deb = apt.download("busybox-static", version, Path(tmp))
        unpacked = Path(tmp) / "root"
        run(["dpkg-deb", "-x", str(deb), str(unpacked)], "unpacking busybox-static")
        if not (unpacked / "bin" / "busybox").is_file():
            raise LabError(f"busybox-static {version} ({debian_arch}) has no bin/busybox")
        install_dir(unpacked, base / version.replace(":", "_"))
    return base / version.replace(":", "_") / "bin" / "busybox"
