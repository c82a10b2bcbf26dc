"""Shared fixtures: the real MNIST and the reference weights (from ../shared unless the
environment points elsewhere), and a tiny IDX dataset the tests write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SHARED, make_tiny_mnist


def _required(path: Path, what: str) -> Path:
    """Missing shared data fails in CI (it must be there) and skips elsewhere."""
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST: $MNIST_DIST_DATA_DIR, else ../shared/data."""
    path = Path(os.environ.get("MNIST_DIST_DATA_DIR") or SHARED / "data").resolve()
    _required(path / "MNIST" / "raw" / "train-images-idx3-ubyte", "MNIST")
    return path


@pytest.fixture(scope="session")
def reference_weights() -> Path:
    """The reference implementation's published weights (a torch state_dict):
    $MNIST_DIST_REFERENCE_WEIGHTS, else ../shared/reference/seed_model.pth."""
    default = SHARED / "reference" / "seed_model.pth"
    path = Path(os.environ.get("MNIST_DIST_REFERENCE_WEIGHTS") or default).resolve()
    return _required(path, "reference weights (set MNIST_DIST_REFERENCE_WEIGHTS)")


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return make_tiny_mnist(tmp_path / "tiny")
