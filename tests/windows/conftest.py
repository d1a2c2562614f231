"""Real PE files for the Windows tests: Wine's ntoskrnl.exe and hal.dll from Debian's libwine.

``apt-get download libwine`` (no root needed) into the vmwatch cache, once; only the two PE
files are kept. A machine that cannot get the package skips with the reason printed.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from vmwatch.lab.cache import cache_dir

WANTED = {"ntoskrnl.exe", "hal.dll"}
MEMBER_DIR = "usr/lib/x86_64-linux-gnu/wine/x86_64-windows/"


def _fetch(target: Path) -> str | None:
    """Download and extract; returns why it failed, or None."""
    work = target / "download"
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        result = subprocess.run(["apt-get", "download", "libwine:amd64"], cwd=work, capture_output=True,
                                text=True, timeout=900)
        if result.returncode == 0:
            break
        if attempt == 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=900)
    else:
        return f"apt-get download libwine failed: {result.stderr.strip()[-300:]}"
    deb = next(work.glob("libwine_*.deb"), None)
    if deb is None:
        return "apt-get download libwine left no .deb"
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name.startswith(MEMBER_DIR) and name[len(MEMBER_DIR):] in WANTED and member.isfile():
                    with tar.extractfile(member) as src, open(target / name[len(MEMBER_DIR):], "wb") as dst:
                        shutil.copyfileobj(src, dst)
    shutil.rmtree(work)
    missing = [n for n in WANTED if not (target / n).exists()]
    return f"libwine has no {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def wine_pe() -> dict[str, bytes]:
    """{"ntoskrnl.exe": bytes, "hal.dll": bytes} of Debian's libwine (amd64)."""
    target = cache_dir() / "windows"
    if not all((target / n).exists() for n in WANTED):
        try:
            why = _fetch(target)
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"cannot fetch libwine: {exc}"
        if why is not None:
            print(f"skipping Windows PE tests: {why}")
            pytest.skip(why)
    return {n: (target / n).read_bytes() for n in WANTED}


@pytest.fixture(scope="session")
def ntoskrnl(wine_pe) -> bytes:
    return wine_pe["ntoskrnl.exe"]
