"""The run directory's names and path rules: the contract between a run and its readers
(``report``, ``doctor``, ``slurm/train.sbatch``, benchmarks); standard library only. The main
process writes every file but STOP; all but the ``.jsonl`` ones atomically (``partial_file``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mnist_dist.errors import UsageError  # stdlib only, like this module

CONFIG_FILE = "config.yaml"  # resolved settings plus ``provenance``, at every start
METRICS_FILE = "metrics.jsonl"  # an EpochRecord per epoch; rewound to a checkpoint on resume
STEPS_FILE = "steps.jsonl"  # a StepRecord every --log-every steps; cut back on resume
SUMMARY_FILE = "summary.json"  # the final figures (records.Summary)
MODEL_FILE = "model.safetensors"  # final weights, the model config in the header
# One of STATES, the position, newest checkpoint, heartbeat, claim token, continue command:
STATUS_FILE = "status.json"
CLAIM_FILE = "claim.json"  # who holds the directory while a training runs in it (claim.py)
STOP_FILE = "STOP"  # written by a user or train.sbatch: checkpoint and stop (then deleted)
WANDB_RUN_ID_FILE = "wandb-run-id.txt"  # so that a requeued job continues its W&B run
WANDB_DIR = "wandb"  # W&B's own name for the folder it creates under its ``dir``
CHECKPOINTS_DIR = "checkpoints"  # epoch-EEE-step-SSSSSS/: epoch EEE (1-based), SSSSSS steps in
# Inside a checkpoint folder, beside Accelerate's save_state files:
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "COMPLETE"  # written last: every file of the checkpoint with size and sha256
CHECKPOINT_MODEL_FILE = "model.safetensors"  # Accelerate's save_state name for the weights
PARTIAL_PREFIX = ".partial-"  # a checkpoint folder being written, or left by a killed write

RUNS_DIR = "runs"  # where a run without --output-dir gets a folder of its own
# The ``state`` of status.json: stopped is resumable (exit code 75), the others are final.
STATES = ("running", "finished", "stopped", "diverged", "failed")


def _entry(name: str) -> property:
    return property(lambda layout: layout.root / name, doc=f"``<run dir>/{name}``")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is read or created)."""

    root: Path

    config = _entry(CONFIG_FILE)
    metrics = _entry(METRICS_FILE)
    steps = _entry(STEPS_FILE)
    summary = _entry(SUMMARY_FILE)
    model = _entry(MODEL_FILE)
    status = _entry(STATUS_FILE)
    claim = _entry(CLAIM_FILE)
    stop = _entry(STOP_FILE)
    wandb_run_id = _entry(WANDB_RUN_ID_FILE)
    wandb = _entry(WANDB_DIR)
    checkpoints = _entry(CHECKPOINTS_DIR)

    def checkpoint(self, epoch: int, step: int) -> Path:
        return self.checkpoints / checkpoint_name(epoch, step)


def checkpoint_name(epoch: int, step: int) -> str:
    """A checkpoint's folder name; names sort in training order up to epoch 999, step 999,999."""
    return f"epoch-{epoch:03d}-step-{step:06d}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` of a checkpoint folder name, or None for any other name."""
    match = re.fullmatch(r"epoch-(\d+)-step-(\d+)", name)
    return (int(match[1]), int(match[2])) if match else None


def partial_checkpoint(final: Path) -> Path:
    """The folder a checkpoint is written into before it is renamed to ``final``."""
    return final.with_name(PARTIAL_PREFIX + final.name)


def partial_file(path: Path) -> Path:
    """The file an atomic write of ``path`` goes to before it is renamed over it."""
    return path.with_name(f".{path.name}.partial")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of ``<run dir>/checkpoints/<name>``."""
    return checkpoint.parent.parent


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` asks for: ``auto`` (newest intact checkpoint), ``never`` or a ``path``."""

    mode: str  # "auto", "never" or "path"
    path: Path | None = None  # for mode "path"

    @property
    def auto(self) -> bool:
        return self.mode == "auto"

    @property
    def never(self) -> bool:
        return self.mode == "never"


def parse_resume(value: str) -> Resume:
    """A ``--resume`` value: any but ``auto``, ``never`` and empty is a path, checked later."""
    if value in ("auto", "never"):
        return Resume(value)
    if not value:
        raise UsageError("--resume must be auto, never or a checkpoint folder")
    return Resume("path", Path(value))
