"""``vmwatch lab``: the background guest and its state file, in a private runtime directory."""

from __future__ import annotations

import json

import pytest

from vmwatch.testing.cli import run_cli


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path


@pytest.mark.parametrize("action", [["status"], ["stop"], ["shell", "true"]])
def test_no_guest_is_one_line_and_status_2(runtime, action):
    result = run_cli("lab", *action)
    assert result.status == 2
    assert result.stderr.count("\n") == 1 and "no lab guest is running" in result.stderr


@pytest.mark.parametrize(("args", "why"), [
    (["--memory", "12Q"], "memory size"),
    (["--cpus", "0"], "cpus"),
    (["--arch", "riscv64"], "invalid choice"),
])
def test_bad_start_options(runtime, args, why):
    result = run_cli("lab", "start", *args)
    assert result.status == 2 and why in result.stderr


def test_corrupt_state_file(runtime):
    (runtime / "vmwatch").mkdir(mode=0o700)
    (runtime / "vmwatch" / "lab.json").write_text("{not json")
    result = run_cli("lab", "status")
    assert result.status == 2 and "unreadable" in result.stderr


@pytest.mark.guest
@pytest.mark.slow
def test_start_status_shell_stop(runtime):
    started = run_cli("lab", "start", "--memory", "192M", "--no-kaslr")
    assert started.status == 0, started.stderr
    target = started.stdout.strip()
    assert target.startswith("qemu:") and target.endswith("/qmp.sock")
    try:
        status = run_cli("lab", "status", "--json")
        info = json.loads(status.stdout)
        assert info["status"] == "running" and info["memory"] == "192M" and info["target"] == target
        again = run_cli("lab", "start")
        assert again.status == 2 and "already running" in again.stderr
        shell = run_cli("lab", "shell", "grep", "-c", "MemTotal", "/proc/meminfo")
        assert (shell.status, shell.stdout) == (0, "1\n")
        assert run_cli("lab", "shell", "exit 3").status == 3
        assert run_cli("lab", "shell", "echo", "alive").stdout == "alive\n"
    finally:
        stopped = run_cli("lab", "stop")
    assert stopped.status == 0
    assert not (runtime / "vmwatch" / "lab.json").exists()
    assert list((runtime / "vmwatch").iterdir()) == []
