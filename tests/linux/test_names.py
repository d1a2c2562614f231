"""Every task's name in ``vmwatch ps`` is the guest's own ``/proc/PID/comm`` (kworkers with their
``+desc``/``-desc`` too), on the amd64, PREEMPT_RT and i386 lab guests: one boot of each."""

from __future__ import annotations

import json
import shutil

import pytest

from vmwatch.testing.cli import run_cli

from .guesttruth import NAMES, name_matches, parse_names, worker_descs

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module", params=["amd64", "rt-amd64", "686-pae"])
def flavour(request, lab_guest_factory):
    """(lab arch, booted guest, extra ps arguments); amd64 is the session's shared guest."""
    if request.param == "amd64":
        yield request.param, request.getfixturevalue("lab_guest"), ()
        return
    extra: tuple[str, ...] = ()
    if request.param == "686-pae":  # no BTF in Debian's i386 kernels: the -dbg vmlinux (cached)
        if shutil.which("pahole") is None:
            pytest.skip("pahole (Debian package dwarves) is missing")
        from vmwatch.lab.kernel import ensure_kernel

        extra = ("--symbols", str(ensure_kernel(request.param).debug_vmlinux()))
    guest = lab_guest_factory(arch=request.param)
    try:
        yield request.param, guest, extra
    finally:
        guest.stop()


def test_every_ps_name_is_proc_comm(flavour):
    """Each task ``ps`` lists on the live guest has the name /proc/PID/comm gave just before or just
    after; ``comm`` in --json stays the raw 15-byte task_struct.comm that the name starts with."""
    arch, guest, extra = flavour
    guest.shell("scenario sleeper 900", timeout=60)
    before = parse_names(guest.shell(NAMES, timeout=60))
    ps = run_cli("ps", f"qemu:{guest.qmp_path}", "--json", *extra)
    after = parse_names(guest.shell(NAMES, timeout=60))
    assert ps.status == 0, ps.stderr
    ours = {p["pid"]: p for p in json.loads(ps.stdout) if p["pid"]}
    assert len(ours) > 20
    assert set(ours) <= set(before) | set(after), set(ours) - set(before) - set(after)
    descs = worker_descs(before, after)
    wrong = {pid: (p["name"], before.get(pid), after.get(pid)) for pid, p in ours.items()
             if not name_matches(p["name"], before.get(pid), after.get(pid), descs)}
    assert not wrong, f"{arch}: ps names that are not /proc/PID/comm: {wrong}"
    for pid, p in ours.items():
        assert p["name"].startswith(p["comm"]) and len(p["comm"].encode()) <= 15, (arch, pid, p)
    workers = [p["name"] for p in ours.values() if p["comm"].startswith("kworker/") and p["name"] != p["comm"]]
    assert workers, f"{arch}: no kworker shows its work (kworker/0:0-rcu_gp) as /proc does"
    if arch == "rt-amd64":  # really the PREEMPT_RT kernel, and ps sees its RT-only timer thread
        assert "PREEMPT_RT" in guest.shell("uname -v")
        assert "ktimers/0" in {p["name"] for p in ours.values()}

