"""The shared fixtures find the reference weights where the README says: a copy named by
MNIST_DIST_REFERENCE_WEIGHTS, else ../shared/reference/seed_model.pth."""

import os
import shutil
import subprocess
import sys

from helpers import ROOT

A_TEST_OF_THE_WEIGHTS = "tests/test_model.py::test_reference_state_dict_loads_strictly"


def run_pytest(weights: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI turns skips into failures
    env["MNIST_DIST_REFERENCE_WEIGHTS"] = weights
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", A_TEST_OF_THE_WEIGHTS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_the_reference_weights_can_live_anywhere(reference_weights, tmp_path):
    copy = tmp_path / "elsewhere" / "model.pth"
    copy.parent.mkdir()
    shutil.copy(reference_weights, copy)
    found = run_pytest(str(copy))
    assert found.returncode == 0 and "1 passed" in found.stdout, found.stdout

    missing = tmp_path / "missing.pth"
    skipped = run_pytest(str(missing))
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert f"reference weights (set MNIST_DIST_REFERENCE_WEIGHTS) not found at {missing}" in (
        skipped.stdout
    )
