"""Provisioning pieces without booting: cpio, module info, bzImage payload, QEMU command line."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vmwatch.errors import LabError
from vmwatch.lab import cpio
from vmwatch.lab.kernel import KernelPackage, extract_vmlinux, modinfo
from vmwatch.lab.vm import LabConfig, qemu_command


def test_newc_archive_reads_back_with_busybox_cpio(tmp_path):
    archive = cpio.newc([
        cpio.directory("bin"),
        cpio.file("bin/hello", b"hello\n", 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("odd-length-name", b"x" * 5),
    ])
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    listing = subprocess.run(["busybox", "cpio", "-tv"], input=archive, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines] == [
        "bin", "bin/hello", "bin/sh", "dev/console", "odd-length-name"]
    assert lines[1].startswith("-rwxr-xr-x") and lines[2].startswith("lrwxrwxrwx")
    assert lines[3].startswith("crw-------")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-id", "bin/hello", "odd-length-name"], input=archive, cwd=out,
                   check=True, capture_output=True)
    assert (out / "bin" / "hello").read_bytes() == b"hello\n"
    assert (out / "odd-length-name").read_bytes() == b"xxxxx"


def _module(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 relocatable with the given sections (what modinfo() reads)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in sections) + b".shstrtab\0"
    body = b"".join(sections.values())
    shoff = 64 + len(body) + len(names)
    headers = [b"\0" * 64]
    offset, name_at = 64, 1
    for name, data in sections.items():
        headers.append(struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset, len(data), 0, 0, 1, 0))
        offset += len(data)
        name_at += len(name) + 1
    headers.append(struct.pack("<IIQQQQIIQQ", name_at, 3, 0, 0, offset, len(names), 0, 0, 1, 0))
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                                 len(headers), len(headers) - 1)
    return header + body + names + b"".join(headers)


def test_modinfo_reads_depends():
    elf = _module({".text": b"\x90" * 7, ".modinfo": b"license=GPL\0depends=tcp_vegas,foo\0name=tcp_yeah\0"})
    assert modinfo(elf) == {"license": "GPL", "depends": "tcp_vegas,foo", "name": "tcp_yeah"}
    with pytest.raises(LabError, match="no .modinfo"):
        modinfo(_module({".text": b""}))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 299))
@example(b"\0" * 41 + b"\x80" + b"\0" * 13 + b"\x01\0\0", 0)  # section headers past 2**63
def test_modinfo_hostile_bytes_raise_lab_error(data, cut):
    valid = _module({".modinfo": b"depends=\0"})
    for blob in (data, valid[:cut], b"\x7fELF\x02\x01" + data):
        try:
            modinfo(blob)
        except LabError:
            pass


def test_real_module_deps(lab_kernel):
    names = [name for name, _ in lab_kernel.module_with_deps("tcp_yeah")]
    assert names == ["tcp_vegas", "tcp_yeah"]
    with pytest.raises(LabError, match="no module"):
        lab_kernel.module_path("no_such_module_xyz")


@pytest.fixture(scope="module")
def lab_kernel():
    from vmwatch.lab.kernel import ensure_kernel

    return ensure_kernel("amd64")


def test_extract_vmlinux_gives_the_elf_kernel(lab_kernel):
    elf = lab_kernel.vmlinux().read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2
    assert lab_kernel.release.encode() in elf


@pytest.mark.parametrize(("blob", "why"), [
    (b"", "not a bzImage"),
    (b"\0" * 0x202 + b"HdrS" + b"\x00\x02" + b"\0" * 0x100, "predates"),
    (b"\0" * 0x1F1 + b"\x01" + b"\0" * 0x10 + b"HdrS" + b"\x0f\x02" + b"\0" * 0x40 + b"\0" * 0x200, "compression"),
])
def test_extract_vmlinux_refuses_garbage(blob, why):
    with pytest.raises(LabError, match=why):
        extract_vmlinux(blob)


def test_extract_vmlinux_truncated_payload(lab_kernel):
    with pytest.raises(LabError):
        extract_vmlinux(lab_kernel.vmlinuz.read_bytes()[:200_000])


def test_qemu_command_line(tmp_path):
    kernel = KernelPackage(arch="amd64", package="linux-image-x", version="1", release="x", root=tmp_path)
    argv = qemu_command(LabConfig(cpus=2, cpu_model="qemu64,+la57", memory="512M"), kernel,
                        tmp_path / "initrd", tmp_path / "rt", "tcg")
    text = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-smp 2" in text and "-cpu qemu64,+la57" in text and "-m 512M" in text
    assert f"memory-backend-file,id=ram,size=512M,mem-path={tmp_path}/rt/ram,share=on" in text
    assert "tcp" not in text.replace("tcg", "") and "-nodefaults" in argv
    assert qemu_command(LabConfig(arch="686-pae", shared_ram=False), kernel, tmp_path, tmp_path, "tcg")[0] \
        == "qemu-system-i386"
    kvm = qemu_command(LabConfig(accel="kvm"), kernel, tmp_path, tmp_path, "kvm")
    assert kvm[kvm.index("-accel") + 1: kvm.index("-accel") + 4] == ["kvm", "-accel", "tcg"]


def test_qemu_command_line_arm64(tmp_path):
    """arm64 boots the virt board, PL011 console, pointer-authenticating CPU, Image for both KASLR choices."""
    kernel = KernelPackage(arch="arm64", package="linux-image-x", version="1", release="x", root=tmp_path)
    argv = qemu_command(LabConfig(arch="arm64"), kernel, tmp_path / "initrd", tmp_path / "rt", "tcg")
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt,memory-backend=ram"
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert argv[argv.index("-append") + 1].startswith("console=ttyAMA0 ")
    assert argv[argv.index("-kernel") + 1] == str(kernel.vmlinuz)
    plain = qemu_command(LabConfig(arch="arm64", kaslr=False, cpu_model="cortex-a72", machine="virt,gic-version=3"),
                         kernel, tmp_path, tmp_path, "tcg")
    assert plain[plain.index("-kernel") + 1] == str(kernel.vmlinuz)  # no vmlinux extraction on arm64
    assert plain[plain.index("-append") + 1].endswith(" nokaslr")
    assert plain[plain.index("-cpu") + 1] == "cortex-a72"
    assert plain[plain.index("-machine") + 1] == "virt,gic-version=3,memory-backend=ram"


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"memory": "lots"}, "memory size"), ({"cpus": 0}, "cpus"), ({"accel": "xen"}, "accel"),
    ({"arch": "riscv64"}, "unknown lab arch"), ({"arch": "arm64;rm"}, "unknown lab arch"),
])
def test_bad_config(kwargs, why):
    with pytest.raises(LabError, match=why):
        LabConfig(**kwargs)


def test_initramfs_holds_init_scenario_and_modules(lab_kernel):
    from vmwatch.lab.initramfs import build_initramfs

    archive = gzip.decompress(build_initramfs(lab_kernel, Path("/bin/busybox")).read_bytes())
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert {"init", "bin/busybox", "bin/scenario", "bin/fault", "dev/console", "etc/passwd"} <= set(names)
    assert [n for n in names if n.startswith("lab/modules/")] == [
        "lab/modules/01-tcp_vegas.ko", "lab/modules/02-tcp_yeah.ko"]


@pytest.mark.parametrize(("arch", "package"), [("arm64", "qemu-system-arm"), ("686", "qemu-system-x86")])
def test_missing_emulator_names_its_debian_package(monkeypatch, arch, package):
    """Without the emulator the lab says which Debian package provides it, before downloading anything."""
    from vmwatch.lab import vm

    monkeypatch.setattr(vm.shutil, "which", lambda name: None)
    monkeypatch.setattr(vm, "ensure_kernel", lambda *a, **k: pytest.fail("tried to fetch a kernel"))
    with pytest.raises(LabError, match=f"install the Debian package {package}"):
        vm.LabGuest.start(LabConfig(arch=arch))
