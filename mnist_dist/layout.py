"""The run directory: every file and folder name in it, and the rules for its paths.

This module is the contract between the training run and everything that reads a run
directory (``mnist-dist report``, ``doctor``, ``slurm/train.sbatch``, the benchmarks, the
tests). It uses only the standard library, so a reader needs neither torch nor Accelerate.

A run directory (``--output-dir``, else ``runs/<YYYYmmdd-HHMMSS>``) holds::

    config.yaml        resolved settings plus ``provenance``; main process, at every start
                       (atomic)
    metrics.jsonl      one epoch record per line (``records.EpochRecord``); main process,
                       appended at the end of each epoch; rewritten (atomic) to a checkpoint's
                       history on resume
    steps.jsonl        one step record per line (``records.StepRecord``) every ``--log-every``
                       steps; main process, appended; cut back (atomic) to a checkpoint's
                       global step on resume
    summary.json       the run's final figures (``records.Summary``); main process, when the run
                       finishes (atomic)
    model.safetensors  final weights, the model config in the header; main process, when the
                       run finishes (atomic: written beside it, then renamed)
    status.json        ``{"state": ...}``: running, finished, stopped (resumable), diverged or
                       failed, with details: epoch and step reached, the newest checkpoint, a
                       ``heartbeat`` time, the claim's token, the command that continues the
                       run (``"lost_peer": true`` when a failure came from another rank that
                       vanished); main process, at each change of state and, while running, at
                       every heartbeat (checkpoints, epoch ends, every minute of training)
                       (atomic, best effort); read by slurm/train.sbatch
    claim.json         who holds the directory while a training runs in it: host, pid, SLURM
                       job and restart count, since when (``claim.py`` has the rules); main
                       process, created whole (``link()``) before anything else is written,
                       deleted when the run ends; never rewritten
    STOP               written by a user or slurm/train.sbatch to ask the ranks to checkpoint
                       and stop; the run deletes it when it stops
    wandb-run-id.txt   the W&B run id, so that a requeued job continues its W&B run
    wandb/             W&B's own files (unless ``WANDB_DIR`` points elsewhere)
    checkpoints/
      epoch-EEE-step-SSSSSS/   a complete checkpoint: the position training resumes from
                               (epoch EEE, 1-based; SSSSSS steps of it already taken). Holds
                               Accelerate's ``save_state`` files, trainer_state.json and, written
                               last, COMPLETE (every file's size and sha256)
      .partial-<name>/         a checkpoint being written, or left by a killed write (never
                               read; deleted at the next save)

An atomic file is written to ``.<name>.partial`` beside it and renamed over it, so a reader
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mnist_dist.errors import UsageError  # stdlib only, like this module

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
STATUS_FILE = "status.json"
CLAIM_FILE = "claim.json"
STOP_FILE = "STOP"
WANDB_RUN_ID_FILE = "wandb-run-id.txt"
WANDB_DIR = "wandb"  # W&B's own name for the folder it creates under its ``dir``
CHECKPOINTS_DIR = "checkpoints"
# Inside a checkpoint folder:
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "COMPLETE"  # written last: every file of the checkpoint with size and sha256
CHECKPOINT_MODEL_FILE = "model.safetensors"  # Accelerate's save_state name for the weights
PARTIAL_PREFIX = ".partial-"  # a checkpoint folder still being written

RUNS_DIR = "runs"  # where a run without --output-dir gets a folder of its own
# The ``state`` of status.json: stopped is resumable (exit code 75), the others are final.
STATES = ("running", "finished", "stopped", "diverged", "failed")

_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)-step-(\d+)")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is read or created)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def steps(self) -> Path:
        return self.root / STEPS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def model(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def claim(self) -> Path:
        return self.root / CLAIM_FILE

    @property
    def stop(self) -> Path:
        return self.root / STOP_FILE

    @property
    def wandb_run_id(self) -> Path:
        return self.root / WANDB_RUN_ID_FILE

    @property
    def wandb(self) -> Path:
        return self.root / WANDB_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, epoch: int, step: int) -> Path:
        """The folder of the checkpoint at ``epoch`` (1-based), ``step`` steps into it."""
        return self.checkpoints / checkpoint_name(epoch, step)


def checkpoint_name(epoch: int, step: int) -> str:
    """A checkpoint's folder name: the position training resumes from. Zero-padded, so that
    names sort in training order up to epoch 999 and step 999,999."""
    return f"epoch-{epoch:03d}-step-{step:06d}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` of a checkpoint folder name, or None for any other name (a partial
    folder, a stray file)."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def partial_checkpoint(final: Path) -> Path:
    """The hidden folder a checkpoint is written into before it is renamed to ``final``."""
    return final.with_name(PARTIAL_PREFIX + final.name)


def partial_file(path: Path) -> Path:
    """The hidden file an atomic write of ``path`` goes to before it is renamed over it."""
    return path.with_name(f".{path.name}.partial")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint folder belongs to: ``<run dir>/checkpoints/<name>``."""
    return checkpoint.parent.parent


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` asks for: ``auto`` (the run directory's newest intact checkpoint, if
    any), ``never`` (a fresh start), or ``path``, one checkpoint folder."""

    mode: str  # "auto", "never" or "path"
    path: Path | None = None  # the checkpoint folder, for mode "path"

    @property
    def auto(self) -> bool:
        return self.mode == "auto"

    @property
    def never(self) -> bool:
        return self.mode == "never"


RESUME_CHOICES = "auto, never or a checkpoint folder"


def parse_resume(value: str) -> Resume:
    """The one reading of a ``--resume`` value. Raises ``UsageError`` for an empty one (any
    other value that is not ``auto`` or ``never`` is a path, checked when it is used)."""
    if value in ("auto", "never"):
        return Resume(value)
    if not value:
        raise UsageError(f"--resume must be {RESUME_CHOICES}")
    return Resume("path", Path(value))
