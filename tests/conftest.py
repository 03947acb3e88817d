"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_dir() -> Path:
    """The shared data folder: $POINTNUC_SHARED or ../shared beside the repository."""
    env = os.environ.get("POINTNUC_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared() -> Path:
    """The shared data folder; the test is skipped when it is missing."""
    d = shared_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder not found: {d}")
    return d
