"""Provisioning on a bad network day, without the network: the real apt-get and apt-cache work on a
local file: repository, and a fake ``apt-get`` first on PATH injects the faults (fails N times,
exits 100 after writing only some lists, writes a truncated .deb, or the network is gone)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmwatch.errors import LabError
from vmwatch.lab import apt as apt_mod
from vmwatch.lab import LabConfig, LabGuest
from vmwatch.lab.busybox import busybox_for, ensure_foreign_busybox
from vmwatch.lab.cache import cache_dir
from vmwatch.lab.kernel import ensure_kernel
from vmwatch.testing.cli import run_cli

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                                reason="needs apt-get and dpkg-deb (a Debian-like host)")

RELEASE = "6.1.0-99-686"
VERSION = "6.1.999-1"
VMLINUZ = b"HdrS not really a kernel, but the bytes the lab must unpack whole\n" * 64

_FAKE = r'''#!{python}
"""A fake apt-get: injects the faults named in $FAKE_APT, otherwise runs the real one."""
import os, pathlib, subprocess, sys

state = pathlib.Path(os.environ["FAKE_APT_STATE"])
tool = pathlib.Path(sys.argv[0]).name
command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
counter = state / f"{{tool}}-{{command}}.count"
calls = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(calls))
faults = dict(f.partition(":")[::2] for f in os.environ.get("FAKE_APT", "").split(",") if f)

def fail(message):
    print(message, file=sys.stderr)
    sys.exit(100)

if "offline" in faults:
    fail("E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  "
         "Temporary failure resolving 'deb.debian.org'")
if calls <= int(faults.get(f"fail-{{command}}", 0)):
    fail("W: Some index files failed to download.\nE: Failed to fetch "
         "http://deb.debian.org/debian/dists/bookworm/InRelease  Connection timed out")
real = subprocess.run(["/usr/bin/" + tool, *sys.argv[1:]])
if command == "update" and "partial-update" in faults:
    # The mirror mid-sync: one repository's lists are not written, apt exits 100.
    for lists in sys.argv[1:]:
        if lists.startswith("-oDir::State::Lists="):
            for f in pathlib.Path(lists.split("=", 1)[1]).glob("*" + faults["partial-update"] + "*"):
                f.unlink()
    fail("E: Failed to fetch file:/" + faults["partial-update"] + "/Packages  Hash Sum mismatch")
if command == "download" and calls <= int(faults.get("truncate", 0)):
    for deb in pathlib.Path.cwd().glob("*.deb"):
        os.truncate(deb, deb.stat().st_size // 2)
sys.exit(real.returncode)
'''


def _deb(out: Path, package: str, files: dict[str, bytes], depends: str = "", version: str = VERSION) -> Path:
    root = out / f"{package}.build"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "DEBIAN").mkdir(parents=True)
    control = (f"Package: {package}\nVersion: {version}\nArchitecture: i386\nMaintainer: vmwatch tests "
               f"<t@example.org>\nDescription: test package\n" + (f"Depends: {depends}\n" if depends else ""))
    (root / "DEBIAN" / "control").write_text(control)
    deb = out / f"{package}_{version}_i386.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def _repo(path: Path, debs: list[Path]) -> None:
    """A flat apt repository (Packages + Release) holding ``debs``."""
    stanzas = []
    for deb in debs:
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True,
                                 text=True).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    packages = "\n".join(stanzas).encode()
    (path / "Packages").write_bytes(packages)
    (path / "Release").write_text(f"Origin: vmwatch-test\nArchitectures: i386\nSHA256:\n "
                                  f"{hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n")


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """The fake apt-get and apt-cache first on PATH; returns how often each subcommand was run."""
    bin_dir, state = tmp_path / "bin", tmp_path / "fake-state"
    bin_dir.mkdir()
    state.mkdir()
    for tool in ("apt-get", "apt-cache"):
        (bin_dir / tool).write_text(_FAKE.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APT_STATE", str(state))
    monkeypatch.setenv("FAKE_APT", "")

    def calls(name: str) -> int:
        counter = state / f"{name}.count"
        return int(counter.read_text()) if counter.exists() else 0

    return calls


@pytest.fixture
def mirror(tmp_path, monkeypatch, fake_apt):
    """Two local repositories (kernels, busybox) as the only apt sources; an empty cache."""
    kernels, busybox = tmp_path / "mirror-kernels", tmp_path / "mirror-busybox"
    for repo in (kernels, busybox):
        repo.mkdir()
    _repo(kernels, [
        _deb(kernels, f"linux-image-{RELEASE}", {f"boot/vmlinuz-{RELEASE}": VMLINUZ,
                                                  f"boot/config-{RELEASE}": b"CONFIG_X86_32=y\n"}),
        _deb(kernels, "linux-image-686", {}, depends=f"linux-image-{RELEASE} (= {VERSION})"),
    ])
    _repo(busybox, [_deb(busybox, "busybox-static", {"bin/busybox": b"#!/bin/sh\necho busybox\n"})])
    etc = tmp_path / "etc"
    (etc / "empty").mkdir(parents=True)
    (etc / "sources.list").write_text(f"deb [trusted=yes] file:{kernels} ./\ndeb [trusted=yes] file:{busybox} ./\n")
    (etc / "apt.conf").write_text(textwrap.dedent(f"""\
        Dir::Etc::SourceList "{etc / 'sources.list'}";
        Dir::Etc::SourceParts "{etc / 'empty'}";
        Dir::Etc::Parts "{etc / 'empty'}";
        Dir::Etc::PreferencesParts "{etc / 'empty'}";
        Dir::Etc::Preferences "{etc / 'empty' / 'none'}";
        """))
    monkeypatch.setenv("APT_CONFIG", str(etc / "apt.conf"))
    monkeypatch.setattr(apt_mod, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    # A foreign-arch apt (private lists in the test's cache) even on an i386 host.
    monkeypatch.setattr(apt_mod, "_native_arch", lambda: "vmwatch-none")
    cache = tmp_path / "cache"
    cache.mkdir()
    return cache, fake_apt


def _faults(monkeypatch, faults: str) -> None:
    monkeypatch.setenv("FAKE_APT", faults)


class TestResolveAndDownload:
    def test_the_real_path_unpacks_the_kernel_whole(self, mirror):
        """No fault: apt-get update, resolve and download the local mirror's kernel, unpacked whole."""
        cache, calls = mirror
        kernel = ensure_kernel("686", cache=cache)
        assert (kernel.release, kernel.version) == (RELEASE, VERSION)
        assert kernel.vmlinuz.read_bytes() == VMLINUZ
        assert (calls("apt-get-update"), calls("apt-get-download")) == (1, 1)

    @pytest.mark.parametrize(("faults", "command", "tries"), [
        ("fail-update:2", "update", 3),      # a mirror mid-sync
        ("fail-download:2", "download", 3),  # a dropped connection
        ("truncate:1", "download", 2),       # a .deb cut to half its size is not taken
    ])
    def test_a_fault_that_passes_is_tried_again(self, mirror, monkeypatch, faults, command, tries):
        """A fault that goes away after some tries: the kernel arrives, and unpacks whole."""
        cache, calls = mirror
        _faults(monkeypatch, faults)
        assert ensure_kernel("686", cache=cache).vmlinuz.read_bytes() == VMLINUZ
        assert calls(f"apt-get-{command}") == tries

    @pytest.mark.parametrize(("faults", "command", "why"), [
        ("fail-update:99", "update", "Connection timed out"),
        # exit 100, the kernels' lists never written: the busybox lists are not enough.
        ("partial-update:mirror-kernels", "update", "Hash Sum mismatch"),
        ("truncate:99", "download", r"_i386\.deb is \d+ bytes, the package index says \d+"),
    ])
    def test_a_fault_that_stays_ends_in_one_line_saying_what_and_how(self, mirror, monkeypatch, faults,
                                                                     command, why):
        """Four tries, then one line naming the kernel, the last reason and the way out; nothing half-made kept."""
        cache, calls = mirror
        _faults(monkeypatch, faults)
        with pytest.raises(LabError) as caught:
            ensure_kernel("686", cache=cache)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith("no linux-image-686 (i386) kernel in ")
        assert "4 tries" in message and re.search(why, message) and "~/.cache/vmwatch" in message
        assert calls(f"apt-get-{command}") == 4
        assert not list((cache / "kernels").glob("*/.complete"))
        assert not list(cache.rglob("*.deb"))

    def test_partial_update_goes_on_with_the_lists_it_has(self, mirror, monkeypatch):
        """exit 100 after writing only the busybox lists: busybox resolves and downloads after one update."""
        cache, calls = mirror
        _faults(monkeypatch, "partial-update:mirror-kernels")
        busybox = ensure_foreign_busybox("i386", cache)
        assert busybox.read_bytes() == b"#!/bin/sh\necho busybox\n"
        assert calls("apt-get-update") == 1


class TestWarmCacheOffline:
    def test_kernel_and_busybox_come_from_the_cache_with_apt_gone(self, mirror, monkeypatch):
        """Warmed once, then apt-get and apt-cache both fail (and the day-long answer has expired): no apt needed."""
        cache, calls = mirror
        kernel = ensure_kernel("686", cache=cache)
        busybox = ensure_foreign_busybox("i386", cache)
        resolved = cache / "kernels" / "resolved-686.json"
        os.utime(resolved, (0, 0))
        _faults(monkeypatch, "offline")
        assert ensure_kernel("686", cache=cache) == kernel
        assert ensure_foreign_busybox("i386", cache) == busybox
        resolved.unlink()  # no record of apt's answer at all: the flavour's newest kernel is used
        assert ensure_kernel("686", cache=cache) == kernel
        assert (calls("apt-get-update"), calls("apt-get-download")) == (1, 2)  # from warming it

    def test_newer_kernel_listed_but_not_downloadable_uses_the_cached_one(self, mirror, monkeypatch, tmp_path):
        """The lists name a newer kernel, its download fails: one try, then the cached kernel."""
        cache, calls = mirror
        kernel = ensure_kernel("686", cache=cache)
        kernels = tmp_path / "mirror-kernels"
        newer = "6.1.1000-1"
        _repo(kernels, [
            _deb(kernels, f"linux-image-{RELEASE}", {f"boot/vmlinuz-{RELEASE}": VMLINUZ}, version=newer),
            _deb(kernels, "linux-image-686", {}, depends=f"linux-image-{RELEASE} (= {newer})", version=newer),
        ])
        apt_mod.Apt.for_arch("i386", cache).update(f"linux-image-{RELEASE}")
        assert apt_mod.Apt.for_arch("i386", cache).candidate("linux-image-686") == newer
        os.utime(cache / "kernels" / "resolved-686.json", (0, 0))
        _faults(monkeypatch, "fail-download:99")
        downloads = calls("apt-get-download")
        assert ensure_kernel("686", cache=cache) == kernel
        assert calls("apt-get-download") == downloads + 1

    def test_a_flavour_never_takes_another_flavours_kernel(self, mirror, monkeypatch):
        """686-pae offline, with only a 686 kernel (same Debian arch) cached: an error, not the 686 kernel."""
        cache, calls = mirror
        ensure_kernel("686", cache=cache)
        _faults(monkeypatch, "offline")
        with pytest.raises(LabError, match=r"no linux-image-686-pae \(i386\) kernel in .*Temporary failure resolving"):
            ensure_kernel("686-pae", cache=cache)

    def test_cli_offline_with_an_empty_cache_is_one_line_and_exit_2(self, mirror, monkeypatch, tmp_path):
        """``vmwatch lab start --arch 686`` with nothing cached and no network: exit 2, one error line
        (after a warning per retry, so a user waiting on a slow mirror knows why)."""
        cache, _ = mirror
        if shutil.which("qemu-system-i386") is None:
            pytest.skip("qemu-system-i386 is missing")
        monkeypatch.setenv("VMWATCH_CACHE", str(cache))
        runtime = tmp_path / "rt"
        runtime.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        _faults(monkeypatch, "offline")
        result = run_cli("lab", "start", "--arch", "686")
        assert result.status == 2
        *retries, error = result.stderr.splitlines()
        assert len(retries) == 3 and all("lab.apt.retry" in line for line in retries), result.stderr
        assert error.startswith("vmwatch: error: no linux-image-686 (i386) kernel in ")
        assert "Temporary failure resolving" in error and "~/.cache/vmwatch" in error


@pytest.mark.guest
def test_lab_guest_boots_from_a_warm_cache_with_the_network_cut(fake_apt, monkeypatch, tmp_path):
    """The real cache's kernel and busybox, seen through a fresh cache with no record of apt's
    answers, and apt-get and apt-cache failing as offline: busybox is found, the guest boots."""
    real = cache_dir()
    warm = ensure_kernel("amd64")  # the real cache, warmed the ordinary way (no fault yet)
    i386_busybox = busybox_for("686")
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    (cache / "kernels" / warm.root.name).symlink_to(warm.root)
    (cache / "busybox").symlink_to(real / "busybox")
    monkeypatch.setenv("VMWATCH_CACHE", str(cache))
    _faults(monkeypatch, "offline")
    assert busybox_for("686") == cache / i386_busybox.relative_to(real)
    with LabGuest.start(LabConfig(kaslr=False)) as guest:
        assert guest.kernel.root == cache / "kernels" / warm.root.name
        assert guest.shell("uname -r").strip() == warm.release
    assert fake_apt("apt-get-update") + fake_apt("apt-get-download") == 0
