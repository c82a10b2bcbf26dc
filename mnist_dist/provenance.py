"""Provenance for a run's record: git commit, library versions, hardware and launch facts."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mnist_dist.claim import utc_now


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return str(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout the package runs from (``-dirty`` if changed), if any."""
    here = str(Path(__file__).resolve().parent)
    # --exclude='*': no tag names, only the full commit hash
    describe = ["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]
    try:
        run = subprocess.run(describe, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip()


def provenance(accelerator: Accelerator) -> dict[str, Any]:
    """Versions, hardware and launch facts for the run record. Collective: call on every rank."""
    hosts_and_devices = gather_object([(socket.gethostname(), device_name(accelerator.device))])
    devices = [f"rank {i} on {host}: {dev}" for i, (host, dev) in enumerate(hosts_and_devices)]
    packages = ("mnist-dist", "torch", "torchvision", "accelerate", "wandb", "rich")
    return {
        "started_at": utc_now(),
        "world_size": accelerator.num_processes,
        "num_nodes": len({host for host, _ in hosts_and_devices}),
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "devices": devices,
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": {
            "python": sys.version.split()[0],
            **{package: _version(package) for package in packages},
            "cuda": torch.version.cuda,
        },
    }
