"""Debian's i386 kernels (686, 686-pae): no BTF, no data symbols in kallsyms, so vmwatch needs
``--symbols`` with the vmlinux of their ``-dbg`` package (fetched once, only the vmlinux kept;
its DWARF is turned into BTF by pahole once and cached). Truth from the guest's own /proc.

The first run of this file took 124 s here: per flavour a 760 MB download (10-13 s), extracting
the vmlinux (8 s) and pahole (15 s). With both cached it takes 40-60 s (two guest boots).
"""

from __future__ import annotations

import json
import shutil

import pytest

from vmwatch.errors import SymbolError
from vmwatch.images import open_image
from vmwatch.os.linux.kernel import Linux
from vmwatch.testing.cli import run_cli

from .guesttruth import snapshot
from .test_guest import check_live_cli, check_modules, check_ps

pytestmark = [pytest.mark.guest, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("pahole") is None, reason="pahole (Debian package dwarves) is missing")]


@pytest.fixture(scope="module", params=["686", "686-pae"])
def i386(request, lab_guest_factory, tmp_path_factory):
    """(guest, -dbg vmlinux, snapshot of a dump) of one booted i386 flavour; stopped after its tests."""
    from vmwatch.lab.kernel import ensure_kernel

    guest = lab_guest_factory(arch=request.param)
    try:
        kernel = ensure_kernel(request.param)
        assert kernel.release == guest.kernel_release
        found = run_cli("lab", "symbols", "--arch", request.param)  # what a user runs for the path
        assert found.status == 0, found.stderr
        vmlinux = found.stdout.strip()
        assert vmlinux == str(kernel.debug_vmlinux()) and vmlinux.endswith(f"/vmlinux-{guest.kernel_release}")
        snap = snapshot(guest, tmp_path_factory.mktemp(request.param) / "i386.elf")
        yield request.param, guest, vmlinux, snap
    finally:
        guest.stop()


def test_ps_of_dump(i386):
    """pids, 15-char comms, ppids and uids of a dump equal /proc around it."""
    _, _, vmlinux, snap = i386
    check_ps(snap, "--symbols", vmlinux)


def test_modules_of_dump(i386):
    """Module names, sizes (and bases where /proc shows them) equal /proc/modules."""
    _, _, vmlinux, snap = i386
    check_modules(snap, "--symbols", vmlinux)


def test_live(i386):
    """The same through qemu:<qmp socket> on the running guest, which keeps running."""
    _, guest, vmlinux, _ = i386
    check_live_cli(guest, "--symbols", vmlinux)


def test_kernel_found_under_kaslr(i386):
    """Paging mode, release and KASLR slide: what the guest itself reports."""
    flavour, guest, vmlinux, snap = i386
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict")
    text = int(guest.shell("grep -w _text /proc/kallsyms").split()[0], 16)
    with open_image(snap.dump) as image:
        linux = Linux.from_memory(image, image.cpus, symbols_file=vmlinux)
        assert linux.kernel.mode.value == ("pae" if flavour == "686-pae" else "32-bit")
        assert linux.kernel.release == guest.kernel_release
        assert linux.kernel.text_vaddr == text
        assert linux.memory.pointer_size == 4


def test_without_symbols_says_what_is_missing(i386):
    """No --symbols: exit 2 and one line naming what to pass; the API raises SymbolError."""
    _, _, _, snap = i386
    result = run_cli("ps", snap.dump)
    assert result.status == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs a symbol file" in result.stderr
    assert "linux-image-*-dbg" in result.stderr
    with open_image(snap.dump) as image, pytest.raises(SymbolError, match="needs a symbol file"):
        Linux.from_memory(image, image.cpus)


def test_truncated_vmlinux(i386, tmp_path):
    """A -dbg vmlinux cut short: exit 2, one line."""
    _, _, vmlinux, snap = i386
    cut = tmp_path / "vmlinux"
    with open(vmlinux, "rb") as src, open(cut, "wb") as out:
        out.write(src.read(64 << 20))
    result = run_cli("ps", snap.dump, "--symbols", str(cut))
    assert result.status == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "truncated" in result.stderr or "past the end" in result.stderr, result.stderr


def test_other_flavours_vmlinux_is_refused(i386):
    """686's vmlinux for a 686-pae kernel (and the reverse): same release, other build: refused."""
    from vmwatch.lab.kernel import ensure_kernel

    flavour, _, _, snap = i386
    other = str(ensure_kernel("686" if flavour == "686-pae" else "686-pae").debug_vmlinux())
    result = run_cli("ps", snap.dump, "--symbols", other)
    assert result.status == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is not this kernel's symbol file" in result.stderr


@pytest.mark.parametrize("case", ["no task_struct", "wrong architecture"])
def test_foreign_elf_is_refused(i386, tmp_path, case):
    """A program's DWARF without the kernel's structs, or an ELF for another machine: exit 2, one line."""
    import struct
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    _, _, _, snap = i386
    (tmp_path / "p.c").write_text("struct other { int x; } other;\nint main(void) { return other.x; }\n")
    program = tmp_path / "p"
    subprocess.run(["gcc", "-g", "-o", str(program), str(tmp_path / "p.c")], check=True)
    expected = "no struct task_struct"
    if case == "wrong architecture":
        blob = bytearray(program.read_bytes())
        struct.pack_into("<H", blob, 18, 40)  # e_machine = EM_ARM
        program.write_bytes(bytes(blob))
        expected = "EM_ARM, not an x86 kernel"
    result = run_cli("ps", snap.dump, "--symbols", str(program))
    assert result.status == 2 and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr, result.stderr


def test_syscalls_and_idt_against_kallsyms(i386):
    """i386 syscalls 3/4 and the 8-byte IDT gates 0, 14 and 0x80 point where /proc/kallsyms says."""
    _, guest, vmlinux, snap = i386
    guest.shell("echo 0 > /proc/sys/kernel/kptr_restrict")
    names = ("__ia32_sys_read", "__ia32_sys_write", "asm_exc_divide_error", "asm_exc_page_fault", "entry_INT80_32")
    listing = guest.shell("grep -w " + " ".join(f"-e {n}" for n in names) + " /proc/kallsyms")
    truth = {line.split()[2]: int(line.split()[0], 16) for line in listing.splitlines() if len(line.split()) == 3}
    assert set(truth) == set(names), listing
    result = run_cli("syscalls", snap.dump, "--json", "--symbols", vmlinux)
    assert result.status == 0, result.stderr
    table = json.loads(result.stdout)
    assert (table[3]["address"], table[4]["address"]) == (truth["__ia32_sys_read"], truth["__ia32_sys_write"])
    result = run_cli("idt", snap.dump, "--json", "--symbols", vmlinux)
    assert result.status == 0, result.stderr
    gates = {g["vector"]: g for g in json.loads(result.stdout)}
    assert gates[0]["address"] == truth["asm_exc_divide_error"]
    assert gates[14]["address"] == truth["asm_exc_page_fault"]
    assert (gates[0x80]["address"], gates[0x80]["dpl"]) == (truth["entry_INT80_32"], 3)
