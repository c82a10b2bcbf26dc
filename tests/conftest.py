"""Shared fixtures: the real MNIST and the reference weights (from ../shared unless the
environment points elsewhere), and a tiny IDX dataset the tests write themselves.

Devices. The suite must pass on a machine with a CUDA GPU as on one without. Every process a
test starts gets ``CUDA_VISIBLE_DEVICES=""`` (``helpers._env``), so the tests of CPU behaviour
(device cpu, fp16 refused, gloo ranks) hold there too; tests that run code in this process put
their tensors on the CPU explicitly, and a command run "in this process" (``helpers.run_here``)
runs in a child there, since CUDA reads ``CUDA_VISIBLE_DEVICES`` only once per process. The GPU
path has its own tests, marked ``gpu`` (``pytest -m gpu``): they start mnist-dist with the GPUs
visible (``helpers.gpu_env``) and are skipped, all with one reason, where this process sees no
CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from helpers import SHARED, cuda_available, make_tiny_mnist

NO_GPU = "needs a CUDA GPU and none is visible"
REFERENCE_WEIGHTS_ENV = "MNIST_DIST_REFERENCE_WEIGHTS"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that hides the module raises instead
        return False


# These two import wandb when collected. It is a dependency of the project, but a GPU machine
# with the project installed --no-deps may lack it; there they are left out (the header says
# so) instead of failing the collection of everything else, `pytest -m gpu` included.
collect_ignore = [] if _importable("wandb") else ["test_sweeps.py", "test_tracking.py"]


def pytest_report_header(config: pytest.Config) -> str | None:
    if collect_ignore:
        return f"wandb is not installed: {', '.join(collect_ignore)} left out"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and not cuda_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


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
    path = os.environ.get(REFERENCE_WEIGHTS_ENV) or SHARED / "reference" / "seed_model.pth"
    return _required(Path(path).resolve(), f"reference weights (set {REFERENCE_WEIGHTS_ENV})")


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return make_tiny_mnist(tmp_path / "tiny")


@pytest.fixture
def cpu_accelerator():
    """An Accelerator in this process, on the CPU; Accelerate's shared state is reset
    afterwards, so no other in-process test inherits it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def train_here(monkeypatch):
    """``mnist-dist train ARGS`` in this process: the command line's parser and settings, then
    ``train.train``; returns the summary and raises what the run raised. For the tests that
    assert on the files a run writes, without a process start (5-10 s of imports) per run.

    The environment is that of a started process (``helpers._env``): none of the caller's W&B,
    Accelerate or data-dir settings, and the CPU even where a GPU is visible. Accelerate's
    shared state and torch's determinism switches are put back afterwards."""
    import os

    import torch
    from accelerate.state import AcceleratorState

    from mnist_dist.cli import build_config, build_parser
    from mnist_dist.determinism import CUBLAS_WORKSPACE_ENV, set_determinism
    from mnist_dist.train import train

    for name in list(os.environ):
        if name.startswith(("WANDB_", "ACCELERATE_")) or name == "MNIST_DIST_DATA_DIR":
            monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # what CUDA_VISIBLE_DEVICES="" does there
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)  # set_determinism sets it

    def run(*args: str) -> dict:
        try:
            return train(build_config(build_parser().parse_args(["train", *args])))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    yield run
    set_determinism(False)
    torch.backends.cudnn.benchmark = False  # torch's defaults, which set_determinism changes
