"""apt-cache and apt-get for the lab: the system's apt for the host's architecture, a private apt state
in the cache for a foreign one (an i386 kernel on an amd64 host), so the system's dpkg is never changed.

Everything fetched goes through ``Apt.update`` and ``Apt.download``, which survive a bad network day:
each tries again after ``RETRY_DELAYS`` (a mirror mid-sync, a dropped connection); an update that
fails part-way but leaves the wanted package listed goes on with the lists it has; a download lands
under a temporary name and is only renamed once its size and SHA256 equal the package index's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import structlog

from vmwatch.errors import LabError

log = structlog.get_logger()

T = TypeVar("T")

RETRY_DELAYS = (2.0, 5.0, 15.0)
"""Seconds to wait before each further try of a fetch: four tries within some 25 s of waiting."""
FETCH_OPTIONS = ("-oAcquire::Retries=3", "-oAcquire::http::Timeout=30", "-oAcquire::https::Timeout=30")
"""apt's own per-file retries, and a stalled connection ends after 30 s instead of hanging."""
UPDATE_TIMEOUT = 600.0
DOWNLOAD_TIMEOUT = 3600.0
"""Seconds one ``apt-get download`` may take (the i386 -dbg package is some 760 MB)."""
HELP = ("connect this host to a Debian mirror, or copy a warm ~/.cache/vmwatch "
        "from a machine that has one")


@attrs.frozen
class Apt:
    """apt-cache / apt-get, either the system's (native arch) or a private state for a foreign arch."""

    arch: str
    options: tuple[str, ...] = ()
    private_root: Path | None = None
    retry_delays: tuple[float, ...] = attrs.field(factory=lambda: RETRY_DELAYS)
    """Waits between tries of a fetch; ``()`` tries once (when a cached copy can stand in)."""

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

    def resolve(self, meta: str, *, update: bool = True) -> tuple[str, str]:
        """The versioned package a kernel meta package depends on, and its candidate version.

        With ``update=False`` only the local lists are asked (no network).
        """
        if update:
            self.ensure_lists(meta)
        show = self.cache("show", "--no-all-versions", meta)
        depends = field(show, "Depends")
        match = re.search(r"\b(linux-image-[0-9][^\s,(|]*)", depends or "")
        if not match:
            raise LabError(f"apt-cache show {meta}: no linux-image-<release> dependency in {depends!r}")
        package = match.group(1)
        version = self.candidate(package)
        if not version:
            raise LabError(f"apt knows no candidate for {package}, which {meta} depends on ({HELP})")
        return package, version

    def candidate(self, package: str) -> str | None:
        """The version apt would install, from the local lists (no network); None if none."""
        found = re.search(r"^\s*Candidate:\s*(\S+)", self.cache("policy", package, check=False), re.M)
        return found.group(1) if found and found.group(1) != "(none)" else None

    def ensure_lists(self, package: str) -> None:
        """Make sure the lists name a candidate for ``package``, running ``apt-get update`` if not."""
        if self.candidate(package):
            return
        if os.getuid() != 0 and self.private_root is None:
            raise LabError(f"apt knows no candidate for {package}: run `sudo apt-get update` once")
        self.update(package)

    def update(self, wanted: str) -> None:
        """``apt-get update`` until ``wanted`` has a candidate, tried again on failure.

        A run that fails part-way (exit 100: one index mid-sync, one mirror down) is good enough when
        the lists it did write name ``wanted``.
        """
        def attempt() -> bool | str:
            log.info("lab.apt.update", arch=self.arch, wanted=wanted)
            status, problem = self._apt_get(["update", "-q"], UPDATE_TIMEOUT)
            if self.candidate(wanted):
                if status != 0:
                    log.warning("lab.apt.update_partial", arch=self.arch, wanted=wanted, problem=problem)
                return True
            return problem if status != 0 else f"the lists name no {wanted} (check sources.list)"

        self._retrying(f"apt-get update for {wanted} ({self.arch})", attempt)

    def index_entry(self, package: str, version: str) -> tuple[int, str]:
        """``(Size, SHA256)`` of ``package`` at ``version`` in the package index."""
        show = self.cache("show", f"{package}={version}")
        size, sha256 = field(show, "Size"), field(show, "SHA256")
        if not size or not size.isdigit() or not sha256 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise LabError(f"the package index gives no Size and SHA256 for {package} {version}")
        return int(size), sha256

    def download(self, package: str, version: str, into: Path) -> Path:
        """The .deb of ``package`` at ``version`` in ``into``, whole and as the index describes it.

        Raises:
            LabError: every try failed or gave a file of the wrong size or hash (the last reason said).
        """
        size, sha256 = self.index_entry(package, version)
        partial = into / ".partial"
        # apt's sandbox user cannot enter root's private cache directory: download as root directly.
        sandbox = ["-oAPT::Sandbox::User=root"] if os.getuid() == 0 and not self.options else []

        def attempt() -> Path | str:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            status, problem = self._apt_get([*sandbox, "download", "-q", f"{package}={version}"],
                                            DOWNLOAD_TIMEOUT, cwd=partial)
            if status != 0:
                return problem
            debs = list(partial.glob(f"{package}_*.deb"))
            if len(debs) != 1:
                return f"apt-get download left {len(debs)} {package}_*.deb files"
            got = debs[0].stat().st_size
            if got != size:
                return f"{debs[0].name} is {got} bytes, the package index says {size}"
            if _sha256(debs[0]) != sha256:
                return f"{debs[0].name} does not have the SHA256 of the package index"
            final = into / debs[0].name
            os.replace(debs[0], final)
            return final

        try:
            return self._retrying(f"downloading {package} {version} ({self.arch})", attempt)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def cache(self, *args: str, check: bool = True) -> str:
        """What ``apt-cache ARGS`` prints (local lists only: never the network)."""
        if shutil.which("apt-cache") is None:
            raise LabError("apt-cache is missing: the lab guest needs a Debian-like host")
        proc = subprocess.run(["apt-cache", *self.options, *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise LabError(f"apt-cache {' '.join(args)} failed: {error_line(proc.stderr)}")
        return proc.stdout

    def _apt_get(self, args: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
        """``(exit status, apt's error in one line)`` of one apt-get run (status -1: could not run)."""
        try:
            proc = subprocess.run(["apt-get", *self.options, *FETCH_OPTIONS, *args], capture_output=True,
                                  text=True, cwd=cwd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, f"apt-get {' '.join(a for a in args if not a.startswith('-'))} took over {timeout:g} s"
        except OSError as exc:
            return -1, f"cannot run apt-get: {exc.strerror}"
        return proc.returncode, error_line(proc.stderr) or f"apt-get exited with {proc.returncode}"

    def _retrying(self, what: str, attempt: Callable[[], T | str]) -> T:
        """``attempt()`` until it returns something other than a str (the reason it failed)."""
        delays = iter(self.retry_delays)
        tries = 0
        while True:
            result = attempt()
            tries += 1
            if not isinstance(result, str):
                return result
            delay = next(delays, None)
            if delay is None:
                raise LabError(f"{what} failed ({tries} {'try' if tries == 1 else 'tries'}; last: {result}): {HELP}")
            log.warning("lab.apt.retry", what=what, problem=result, retry_in=delay)
            time.sleep(delay)


def field(stanza: str, name: str) -> str | None:
    """The value of ``name:`` in the first stanza of an apt-cache or control text."""
    for line in stanza.splitlines():
        if not line:
            break
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return None


def error_line(stderr: str) -> str:
    """apt's (or a tool's) complaint in one line: its ``E:`` lines, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")] or lines[-1:]
    text = "; ".join(errors)
    return text if len(text) <= 400 else text[:397] + "..."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _native_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "i686": "i386", "i386": "i386"}.get(platform.machine(), platform.machine())


def run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a local tool (dpkg-deb) or raise LabError with its complaint in one line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise LabError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise LabError(f"{what} failed ({' '.join(argv[:3])}...): {error_line(proc.stderr)}")
