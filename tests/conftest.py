"""Shared test helpers. Only add here, never remove: several test files rely on these.

``shared_data_dir()`` locates the optional real data in ``../shared/data`` (relative to the repo
root); tests that read it are marked ``@pytest.mark.shared`` and use the ``shared_data`` fixture,
which skips cleanly when the folder is absent (a fresh user machine does not have it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` when it exists, else ``None``."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent")
    return path
