"""Shared test options. Tests marked ``guest`` boot the real lab guest; ``--no-guest`` skips them."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-guest", action="store_true", help="skip tests that boot the lab guest")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-guest"):
        return
    skip = pytest.mark.skip(reason="--no-guest given")
    for item in items:
        if "guest" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab_guest():
    """The real lab guest (default LabConfig), booted once per test session and stopped at its end.

    Shared by every test: don't stop it, and expect scenario actions of other tests to have run.
    """
    from vmwatch.lab import LabGuest

    guest = LabGuest.start()
    yield guest
    guest.stop()


@pytest.fixture(scope="session")
def arm64_guest():
    """The arm64 lab guest (qemu-system-aarch64 -M virt), booted once per session for every arm64 test."""
    import shutil

    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 is missing: install the Debian package qemu-system-arm (make system)")
    from vmwatch.lab.vm import LabConfig, LabGuest

    guest = LabGuest.start(LabConfig(arch="arm64"))
    yield guest
    guest.stop()


@pytest.fixture(scope="session")
def arm64_idle_dump(arm64_guest, tmp_path_factory):
    """A dump of the arm64 guest paused in EL1 and what QEMU said then (``vmwatch.testing.arm64truth.paused_dump``)."""
    from vmwatch.testing.arm64truth import paused_dump

    return paused_dump(arm64_guest, tmp_path_factory.mktemp("arm64") / "idle.elf")


@pytest.fixture(scope="session")
def lab_guest_factory():
    """``start(**LabConfig fields)`` boots an extra guest; stop it when done (leftovers stop at session end)."""
    from vmwatch.lab import LabConfig, LabGuest

    started = []

    def start(**config):
        guest = LabGuest.start(LabConfig(**config))
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.stop()


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster (Debian's server, unix socket in a temp dir) for the session;
    skipped, with the reason, only when no server is installed."""
    from vmwatch.testing.postgres import ServerMissing, start_cluster

    try:
        cluster = start_cluster()
    except ServerMissing as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.remove()


@pytest.fixture
def pg_url(pg_cluster, request):
    """A fresh, empty database in the session's cluster."""
    import re

    return pg_cluster.create_database(re.sub(r"\W", "_", request.node.name)[:60].lower())
