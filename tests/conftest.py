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
