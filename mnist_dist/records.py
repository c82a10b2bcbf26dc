"""The records a run writes, each defined once: per logged step, per epoch, and the final
summary; W&B sees the same fields under ``train/`` and ``epoch/``. Torch-free, for readers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_R = TypeVar("_R", bound="_Record")


class RecordError(ValueError):
    """A JSON object that is not a record of the expected kind (the message says why)."""


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The JSON object written, keys in field order."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_R], raw: Any) -> _R:
        """The record in a JSON object, unknown keys ignored; ``RecordError`` names missing or
        mistyped fields."""
        if not isinstance(raw, dict):
            raise RecordError("not a JSON object")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        missing = [f.name for f in fields if f.name not in raw]
        if missing:
            raise RecordError(f"missing {', '.join(missing)}")
        for f in fields:
            types, kind = _KIND[str(f.type)]
            value = raw[f.name]
            # JSON true is a bool, not a number
            if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
                raise RecordError(f"{f.name} is {value!r}, not {kind}")
        return cls(**{f.name: raw[f.name] for f in fields})


_KIND: dict[str, tuple[type | tuple[type, ...], str]] = {
    "int": (int, "an integer"),
    "float": ((int, float), "a number"),
    "str": (str, "a string"),
    "bool": (bool, "true or false"),
}


@dataclass(frozen=True)
class StepRecord(_Record):
    """A line of ``steps.jsonl``: training figures since the previous one (``--log-every``)."""

    global_step: int  # optimizer steps since the start of the run
    epoch: int  # the epoch the step belongs to (1-based)
    train_loss: float  # mean training loss per image over the window, all ranks
    lr: float  # learning rate at the end of the window
    images_per_second: float  # training images per second over the window, all ranks


@dataclass(frozen=True)
class EpochRecord(_Record):
    """A line of ``metrics.jsonl``: one finished epoch, training and test figures."""

    epoch: int  # 1-based
    global_step: int  # optimizer steps since the start of the run, at the epoch's end
    lr: float  # learning rate the epoch trained with
    train_loss: float  # mean training loss per image over the epoch
    train_accuracy: float  # fraction of training images classified right during the epoch
    test_loss: float  # mean test loss per image after the epoch
    test_accuracy: float  # fraction of the test set classified right after the epoch
    test_correct: int  # test images classified right
    test_total: int  # test images evaluated (10,000 for MNIST)
    train_seconds: float  # training time of the epoch (evaluation excluded)
    epoch_seconds: float  # training plus evaluation time of the epoch
    images_per_second: float  # training images per second over the epoch, all ranks


@dataclass(frozen=True)
class Summary(_Record):
    """``summary.json``: the final figures of a finished run."""

    test_accuracy: float  # after the last epoch (fraction)
    test_correct: int  # test images classified right after the last epoch
    test_total: int  # test images evaluated
    test_loss: float  # mean test loss per image after the last epoch
    best_test_accuracy: float  # the best epoch's test accuracy (fraction)
    best_epoch: int  # that epoch (1-based)
    train_loss: float  # the last epoch's mean training loss per image
    train_accuracy: float  # the last epoch's training accuracy (fraction)
    world_size: int  # processes that trained the last segment
    distributed_type: str  # Accelerate's DistributedType value: NO, MULTI_GPU, MULTI_CPU...
    mixed_precision: str  # no, fp16 or bf16
    global_batch_size: int  # images per optimizer step, all ranks together
    per_device_batch_size: int  # images per process per forward pass
    epochs_completed: int
    global_step: int  # optimizer steps over the whole run
    images_per_second: float  # training images per second over all epochs' training time
    step_engine: str  # eager or captured
    deterministic: bool  # deterministic algorithms on
    segment_wall_seconds: float  # wall time of this command
    run_wall_seconds: float  # wall time of every process that trained the run, summed
    started_at: str  # when the run first started (UTC, ISO 8601)
    run_dir: str  # the run directory
