"""Markers of the multi-process tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a multi-process test of more than a few seconds (still run by default)")
