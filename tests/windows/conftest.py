"""Real PE files for the Windows tests: Wine's ntoskrnl.exe and hal.dll from Debian's libwine.

The amd64 package gives the PE32+ (x64) kernel, the i386 one (``libwine:i386``) the PE32 (x86)
kernel. Both are fetched the way the lab fetches its kernels (vmwatch/lab/apt.py: the system's
apt for the host's architecture, a private apt state in the cache for a foreign one, retries,
size and SHA256 checked against the package index) into the vmwatch cache, once; only the two
PE files are kept. A machine that cannot get the package skips with the reason printed.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from vmwatch.errors import LabError
from vmwatch.lab.apt import Apt
from vmwatch.lab.cache import cache_dir

WANTED = {"ntoskrnl.exe", "hal.dll"}
MEMBER_DIRS = {"amd64": "usr/lib/x86_64-linux-gnu/wine/x86_64-windows/",
               "i386": "usr/lib/i386-linux-gnu/wine/i386-windows/"}


def pe_dir(arch: str = "amd64") -> Path:
    """Where the PE files of ``arch`` are cached (amd64's where they always were)."""
    return cache_dir() / "windows" if arch == "amd64" else cache_dir() / "windows" / arch


def _fetch(target: Path, arch: str = "amd64") -> str | None:
    """Download libwine:``arch`` and keep its two PE files in ``target``; returns why it failed, or None."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        apt = Apt.for_arch(arch, cache_dir())
        apt.ensure_lists("libwine")
        version = apt.candidate("libwine")
        if version is None:
            return f"apt knows no libwine:{arch}"
        with tempfile.TemporaryDirectory(dir=target, prefix=".dl-") as work:
            deb = apt.download("libwine", version, Path(work))
            _extract(deb, MEMBER_DIRS[arch], target)
    except LabError as exc:
        return str(exc)
    missing = [n for n in WANTED if not (target / n).exists()]
    return f"libwine:{arch} has no {', '.join(missing)}" if missing else None


def _extract(deb: Path, member_dir: str, target: Path) -> None:
    """The WANTED files under ``member_dir`` of the .deb's data archive, each renamed into place whole."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name.startswith(member_dir) and name[len(member_dir):] in WANTED and member.isfile():
                    final = target / name[len(member_dir):]
                    partial = final.with_suffix(".partial")
                    with tar.extractfile(member) as src, open(partial, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    partial.replace(final)


def _wine_pe(arch: str) -> dict[str, bytes]:
    target = pe_dir(arch)
    if not all((target / n).exists() for n in WANTED):
        try:
            why = _fetch(target, arch)
        except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
            why = f"cannot fetch libwine:{arch}: {exc}"
        if why is not None:
            print(f"skipping Windows PE tests: {why}")
            pytest.skip(why)
    return {n: (target / n).read_bytes() for n in WANTED}


@pytest.fixture(scope="session")
def wine_pe() -> dict[str, bytes]:
    """{"ntoskrnl.exe": bytes, "hal.dll": bytes} of Debian's libwine (amd64: PE32+)."""
    return _wine_pe("amd64")


@pytest.fixture(scope="session")
def ntoskrnl(wine_pe) -> bytes:
    return wine_pe["ntoskrnl.exe"]


@pytest.fixture(scope="session")
def wine_pe32() -> dict[str, bytes]:
    """{"ntoskrnl.exe": bytes, "hal.dll": bytes} of Debian's libwine:i386 (PE32)."""
    return _wine_pe("i386")


@pytest.fixture(scope="session")
def ntoskrnl32(wine_pe32) -> bytes:
    return wine_pe32["ntoskrnl.exe"]
