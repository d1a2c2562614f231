"""Fixtures of the Linux tests: one dump of the shared lab guest per session, with its /proc truth."""

from __future__ import annotations

import pytest

from .guesttruth import snapshot


@pytest.fixture(scope="session")
def default_snap(lab_guest, tmp_path_factory):
    """A dump of the default lab guest (paused while dumping) and /proc listings around it."""
    return snapshot(lab_guest, tmp_path_factory.mktemp("linux") / "default.elf")
