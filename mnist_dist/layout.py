"""The run directory: every file and folder name in it, and the rules for its paths.

The contract between a training run and everything that reads a run directory (``report``,
``doctor``, ``slurm/train.sbatch``, the benchmarks, the tests); standard library only, so a
reader needs neither torch nor Accelerate. Written by the main process::

    config.yaml        resolved settings plus ``provenance``, at every start
    metrics.jsonl      one ``records.EpochRecord`` per epoch; rewound to a checkpoint on resume
    steps.jsonl        a ``records.StepRecord`` every ``--log-every`` steps; cut back on resume
    summary.json       the run's final figures (``records.Summary``)
    model.safetensors  final weights, the model config in the header
    status.json        ``STATES`` with the position, the newest checkpoint, a ``heartbeat``,
                       the claim's token and the command that continues the run; rewritten
                       at each change of state and heartbeat; read by slurm/train.sbatch
    claim.json         who holds the directory while a training runs in it (``claim.py``);
                       created whole (``link()``) before anything else, deleted at the end
    STOP               written by a user or train.sbatch: checkpoint and stop (then deleted)
    wandb-run-id.txt   the W&B run id, so that a requeued job continues its W&B run
    wandb/             W&B's own files (unless ``WANDB_DIR`` points elsewhere)
    checkpoints/
      epoch-EEE-step-SSSSSS/   where training resumes (epoch EEE, 1-based; SSSSSS steps of it
                               taken): Accelerate's ``save_state`` files, trainer_state.json
                               and, written last, COMPLETE (every file's size and sha256)
      .partial-<name>/         a checkpoint being written, or left by a killed write

Every file but the appended ``.jsonl`` ones is written atomically: to ``.<name>.partial``
beside it, then renamed over it, so a reader sees the old file or the new one.
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


def _entry(name: str) -> property:
    """A ``RunLayout`` property: the path of ``name`` in the run directory."""
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
        """The folder of the checkpoint at ``epoch`` (1-based), ``step`` steps into it."""
        return self.checkpoints / checkpoint_name(epoch, step)


def checkpoint_name(epoch: int, step: int) -> str:
    """A checkpoint's folder name. Zero-padded: names sort in training order up to epoch 999
    and step 999,999."""
    return f"epoch-{epoch:03d}-step-{step:06d}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` of a checkpoint folder name, or None for any other name."""
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
