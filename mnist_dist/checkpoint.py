"""Resumable checkpoints: Accelerate's ``save_state`` plus our trainer state, atomic, verified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from mnist_dist import faults
from mnist_dist.errors import UsageError, WriteError, write_failure
from mnist_dist.layout import (
    MANIFEST_FILE,
    PARTIAL_PREFIX,
    STATE_FILE,
    RunLayout,
    checkpoint_name,
    parse_checkpoint_name,
    partial_checkpoint,
)


@dataclass
class TrainerState:
    """Where a run stands, beyond what ``save_state`` holds (model, optimizer, scaler, RNGs)."""

    epoch: int = 1  # the epoch being trained (1-based)
    step: int = 0  # optimizer steps of that epoch already taken
    global_step: int = 0  # optimizer steps since the start of the run
    seed: int = 0  # the sampler seed: with epoch and step it fixes the next batch exactly
    global_batch_size: int = 64
    num_samples: int = 0  # training images per epoch
    world_size: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)  # schedule_state(): position, LRs
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # loss sum, correct
    epoch_train_seconds: float = 0.0  # training time spent in the current epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records
    tracker_run_id: str | None = None  # the W&B run a resumed job continues
    # The run's own record, so that a checkpoint tells how it came to be without its run dir:
    config: dict[str, Any] | None = None  # the resolved settings it was trained with
    started_at: str | None = None  # when the run first started (UTC, ISO 8601)
    branched_from: str | None = None  # the checkpoint of another run this one started from
    run_wall_seconds: float = 0.0  # wall time of the processes that trained it, summed

    @property
    def name(self) -> str:
        """The checkpoint's folder name: the position training resumes from."""
        return checkpoint_name(self.epoch, self.step)

    @property
    def position(self) -> str:
        return f"epoch {self.epoch}, step {self.step} (global step {self.global_step})"

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        raw = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not names <= set(raw):
            raise ValueError(f"missing fields {sorted(names - set(raw or {}))}")
        return cls(**{k: raw[k] for k in names})


@dataclass(frozen=True)
class Checkpoint:
    """A complete, verified checkpoint folder and the trainer state it holds."""

    path: Path
    state: TrainerState


class Checkpointer:
    """Saves checkpoints atomically into ``<run dir>/checkpoints`` and keeps the newest ``keep``;
    a mid-epoch one is due every ``every`` optimizer steps (0: never). Call ``save`` on every
    rank. Accelerate's ``save_state`` is not atomic, and its ``total_limit`` deletes before
    writing (huggingface/accelerate#1171, #3662): hence a partial folder, renamed when whole."""

    def __init__(
        self,
        accelerator: Accelerator,
        layout: RunLayout,
        keep: int,
        every: int = 0,
        started: float | None = None,
    ) -> None:
        self.accelerator, self.keep, self.every = accelerator, keep, every
        self.last_saved: Path | None = None  # by this process
        self.root = layout.checkpoints
        # The run's wall time: this process's since ``started`` (a ``time.perf_counter()``
        # reading) plus that of the processes before it, which a resumed run sets.
        self.started = time.perf_counter() if started is None else started
        self.earlier_wall_seconds = 0.0

    def due(self, state: TrainerState, steps_per_epoch: int) -> bool:
        """Whether to save a mid-epoch checkpoint after the step ``state`` just took (not after
        an epoch's last step: the epoch's own checkpoint follows its evaluation)."""
        at_epoch_end = state.step == steps_per_epoch
        return bool(self.every) and state.global_step % self.every == 0 and not at_epoch_end

    def saved(self, state: TrainerState) -> bool:
        return self.last_saved is not None and self.last_saved.name == state.name

    def newest(self) -> Path | None:
        """The newest checkpoint of the run: this process's last, else the newest on disk."""
        return self.last_saved or next(reversed(complete_checkpoints(self.root)), None)

    def save(self, state: TrainerState) -> Path:
        state.run_wall_seconds = self.earlier_wall_seconds + time.perf_counter() - self.started
        final = self.root / state.name
        partial = partial_checkpoint(final)
        # Three phases, each followed by an agreement, so every rank runs the same collectives
        # and a failure on one rank ends the save on all of them instead of a rendezvous hang.
        self._together(partial, final, lambda: _fresh_dir(partial))
        self._together(partial, final, lambda: self._save_state(partial), every_rank=True)
        self._together(partial, final, lambda: self._complete(state, partial, final))
        self.last_saved = final
        return final

    def _save_state(self, partial: Path) -> None:
        self.accelerator.save_state(str(partial), safe_serialization=True)
        faults.point("checkpoint.save_state", path=partial)

    def _together(
        self, partial: Path, final: Path, work: Callable[[], None], every_rank: bool = False
    ) -> None:
        """Run ``work`` on the main process (or ``every_rank``); if it failed on any rank, raise
        ``WriteError`` on all, the partial folder gone (it may hold a full disk's last space)."""
        error = None
        if every_rank or self.accelerator.is_main_process:
            try:
                work()
            # torch.save reports a full disk as RuntimeError, safetensors (the model file) as
            # SafetensorError ("Error while serializing: I/O error: ...").
            except (OSError, RuntimeError, SafetensorError) as e:
                error = e
        failed = torch.tensor([error is not None], device=self.accelerator.device)
        if self.accelerator.reduce(failed.int(), reduction="sum").item():
            reason = write_failure(error, self.root) if error else "it failed on another rank"
            if self.accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise WriteError(f"cannot write checkpoint {final}: {reason}")

    def _complete(self, state: TrainerState, partial: Path, final: Path) -> None:
        _write_synced(partial / STATE_FILE, json.dumps(asdict(state), indent=1).encode())
        manifest = {p.name: _file_digest(p) for p in sorted(partial.iterdir())}
        _write_synced(partial / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        if final.exists():  # saved before at this position: it goes once the new one is there
            old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        # Only now: checkpoints beyond the newest ``keep``, partial and replaced folders.
        for stale in self.root.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for surplus in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(surplus)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that were completely written, oldest first."""
    found = root.iterdir() if root.is_dir() else ()
    done = [p for p in found if parse_checkpoint_name(p.name) and (p / MANIFEST_FILE).exists()]
    return sorted(done, key=lambda p: (parse_checkpoint_name(p.name), p))


def read_checkpoint(path: str | Path) -> TrainerState:
    """Verify a checkpoint folder against its manifest and return its trainer state."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a checkpoint folder"
        raise UsageError(f"checkpoint {path} {what}")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise UsageError(
            f"checkpoint {path} is incomplete or not an mnist-dist checkpoint "
            f"(no {MANIFEST_FILE} marker)"
        ) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"checkpoint {path} has an unreadable {MANIFEST_FILE}: {e}") from None
    if not isinstance(manifest, dict) or STATE_FILE not in manifest:
        raise UsageError(f"checkpoint {path} has an invalid {MANIFEST_FILE}")
    for name, expected in manifest.items():
        file = path / name
        try:
            actual = _file_digest(file)
        except OSError as e:
            raise UsageError(f"checkpoint file {file} is unreadable: {e.strerror or e}") from None
        if actual["bytes"] != expected.get("bytes"):
            raise UsageError(
                f"checkpoint file {file} is truncated or damaged: {actual['bytes']} bytes, "
                f"{expected.get('bytes')} when written"
            )
        if actual["sha256"] != expected.get("sha256"):
            raise UsageError(f"checkpoint file {file} is damaged: its checksum does not match")
    try:
        return TrainerState.from_json((path / STATE_FILE).read_text())
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint file {path / STATE_FILE} is invalid: {e}") from None


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a write that was killed
    path.mkdir(parents=True)


def _file_digest(path: Path) -> dict[str, Any]:
    data = path.read_bytes()  # the largest file of a checkpoint, Adam's state, is under 1 MB
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
