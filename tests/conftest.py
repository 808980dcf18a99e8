"""Shared fixtures: where the reference's golden files live.

The golden files are produced by the original PyTorch GLIDE and live outside the project
(`../shared/golden`, or `$GLIDE_JAX_GOLDEN`). A missing folder is a failure, never a skip: a
skipped parity test would hide a broken parity.
"""

import os
from pathlib import Path

# The suite runs tiny models whose cost is almost all XLA compilation; LLVM's optimisation passes
# make up most of that (a 64px test U-Net: 6.9 s -> 2.6 s to compile, same run time within noise).
# Set before jax is imported; subprocesses inherit it. Numerics are unaffected: the parity tests
# run under it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Each test compiles what it measures: no programs from an earlier run's persistent cache (the
# cache's own test turns it on in a subprocess).
os.environ.setdefault("GLIDE_JAX_COMPILE_CACHE", "0")

import pytest  # noqa: E402

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
