"""Deterministic kernels: the same command twice, or a run stopped and resumed, gives the same
weights bit for bit, on CPUs and on CUDA GPUs."""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"


def set_determinism(enabled: bool) -> dict[str, object]:
    """Make every kernel deterministic (or let cuDNN pick the fastest) and return the settings
    for the run's provenance. Call it before the first CUDA call: cuBLAS reads its workspace
    setting once, when it starts."""
    if enabled:
        # cuBLAS reduces in a fixed order only with a fixed workspace; the documented setting
        # (https://docs.nvidia.com/cuda/cublas/#results-reproducibility). A user's own value wins.
        os.environ.setdefault(CUBLAS_WORKSPACE_ENV, ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    # Deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised
    # memory: a debugging aid that adds a kernel per allocation, and nothing to the results of
    # code that reads only what it wrote.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled  # benchmarking picks kernels by timing them
    return {"deterministic": enabled, CUBLAS_WORKSPACE_ENV: os.environ.get(CUBLAS_WORKSPACE_ENV)}
