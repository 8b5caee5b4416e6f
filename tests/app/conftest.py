"""What every app test shares: one cache of tiny bases for the whole test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bases' cache: each base is built once per session, by the first test that needs it."""
    return tmp_path_factory.getbasetemp() / "app-cache"
