"""apt-cache and apt-get for the lab: the system's apt for the host's architecture, a private apt state
in the cache for a foreign one (an i386 kernel on an amd64 host), so the system's dpkg is never changed."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import attrs
import structlog

from vmwatch.errors import LabError

log = structlog.get_logger()


@attrs.frozen
class Apt:
    """apt-cache / apt-get, either the system's (native arch) or a private state for a foreign arch."""

    arch: str
    options: tuple[str, ...] = ()
    private_root: Path | None = None

    @classmethod
    def for_arch(cls, arch: str, cache: Path) -> "Apt":
        if arch == _native_arch():
            return cls(arch)
        # A foreign arch (i386 kernel on an amd64 host) gets its own apt lists in the cache, so the
        # system's dpkg configuration is never changed.
        root = cache / "apt" / arch
        for sub in ("lists/partial", "archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        options = (
            f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}",
            f"-oDir::State::Lists={root / 'lists'}", f"-oDir::State::status={root / 'status'}",
            f"-oDir::Cache={root / 'cache'}", f"-oDir::Cache::archives={root / 'archives'}",
            "-oAPT::Sandbox::User=root" if os.getuid() == 0 else "-oDebug::NoLocking=1",
        )
        return cls(arch, options, root)

    def resolve(self, meta: str) -> tuple[str, str]:
        """The versioned package a kernel meta package depends on, and its candidate version."""
        self._ensure_lists(meta)
        show = self._cache("show", "--no-all-versions", meta)
        depends = field(show, "Depends")
        match = re.search(r"\b(linux-image-[0-9][^\s,(|]*)", depends or "")
        if not match:
            raise LabError(f"apt-cache show {meta}: no linux-image-<release> dependency in {depends!r}")
        package = match.group(1)
        version = field(self._cache("show", "--no-all-versions", package), "Version")
        if not version:
            raise LabError(f"apt-cache show {package}: no Version field")
        return package, version

    def download(self, package: str, version: str, into: Path) -> Path:
        # apt's sandbox user cannot enter root's private cache directory: download as root directly.
        sandbox = ["-oAPT::Sandbox::User=root"] if os.getuid() == 0 and not self.options else []
        run(["apt-get", *self.options, *sandbox, "download", "-q", f"{package}={version}"],
             f"downloading {package}", cwd=into)
        debs = list(into.glob(f"{package}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {package} produced no .deb in {into}")
        return debs[0]

    def _ensure_lists(self, meta: str) -> None:
        policy = self._cache("policy", meta, check=False)
        if "Candidate:" in policy and "Candidate: (none)" not in policy:
            return
        if os.getuid() != 0 and self.private_root is None:
            raise LabError(f"apt knows no candidate for {meta}: run `sudo apt-get update` once")
        log.info("lab.kernel.apt_update", arch=self.arch)
        run(["apt-get", *self.options, "update", "-q"], "apt-get update")
        policy = self._cache("policy", meta, check=False)
        if "Candidate:" not in policy or "Candidate: (none)" in policy:
            raise LabError(f"apt knows no candidate for {meta} even after apt-get update (check sources.list)")

    def _cache(self, *args: str, check: bool = True) -> str:
        if shutil.which("apt-cache") is None:
            raise LabError("apt-cache is missing: the lab guest needs a Debian-like host")
        proc = subprocess.run(["apt-cache", *self.options, *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise LabError(f"apt-cache {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout


def field(stanza: str, name: str) -> str | None:
    for line in stanza.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return None


def _native_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "i686": "i386", "i386": "i386"}.get(platform.machine(), platform.machine())


def run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise LabError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"{what} failed ({' '.join(argv[:3])}...): {proc.stderr.strip()[-400:]}")
