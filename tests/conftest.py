"""Shared fixtures: where the reference's golden files live.

The golden files are produced by the original PyTorch GLIDE and live outside the project
(`../shared/golden`, or `$GLIDE_JAX_GOLDEN`). A missing folder is a failure, never a skip: a
skipped parity test would hide a broken parity.
"""

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def golden_dir() -> Path:
    override = os.environ.get("GLIDE_JAX_GOLDEN")
    path = Path(override) if override else PROJECT_ROOT.parent / "shared" / "golden"
    if not path.is_dir():
        pytest.fail(
            f"golden reference files not found at {path} "
            f"(set GLIDE_JAX_GOLDEN or place them at ../shared/golden relative to {PROJECT_ROOT})",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_dir()
