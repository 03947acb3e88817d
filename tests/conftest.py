"""Shared test helpers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared data folder: $POINTNUC_SHARED or ../shared beside the repository."""
    env = os.environ.get("POINTNUC_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture
def shared() -> Path:
    """The shared data folder; the test is skipped when it is missing."""
    d = shared_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder not found: {d}")
    return d


@pytest.fixture(scope="session")
def qupath_dir() -> Iterator[Path]:
    """A real QuPath 0.6.0, assembled once from the shared kit into ``<repo>/.qupath`` (ignored by git).

    ``PAQUO_QUPATH_DIR`` points to it for the session, for child processes: the test process itself
    never starts a JVM (see ``qupath_kit``). Without the shared kit the test is skipped with the
    reason; with ``POINTNUC_REQUIRE_QUPATH=1`` (CI) it fails instead, so no QuPath test is skipped
    unnoticed.
    """
    from qupath_kit import KitUnavailable, setup_qupath

    try:
        qupath = setup_qupath(shared_dir(), REPO / ".qupath")
    except KitUnavailable as err:
        if os.environ.get("POINTNUC_REQUIRE_QUPATH") == "1":
            pytest.fail(f"POINTNUC_REQUIRE_QUPATH=1 but no real QuPath: {err}", pytrace=False)
        pytest.skip(f"no real QuPath for the qupath tests: {err}")
    mp = pytest.MonkeyPatch()
    mp.setenv("PAQUO_QUPATH_DIR", str(qupath))
    yield qupath
    mp.undo()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything started a JVM in the test process: it cannot be stopped or
    restarted, so a test doing it would leave every later test with that one QuPath."""
    jpype = sys.modules.get("jpype")
    if jpype is not None and jpype.isJVMStarted():
        sys.stderr.write("\nERROR: a test started a JVM (paquo.projects) in the pytest process; use qupath_kit\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
