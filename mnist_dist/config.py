"""Typed settings, one schema for defaults (the reference recipe), config files, environment and
flags (``cli`` reads each field's metadata); each section validates itself."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mnist_dist.errors import UsageError
from mnist_dist.layout import parse_resume


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    """A field with its flag's help and, if any: ``flag`` (if not its own name), ``env`` (a
    variable that sets it), ``shown_default`` (the default as the help says it), ``aliases``
    (names too far for a spelling match), ``check`` (a bound, e.g. ``"> 0 seconds"``)."""
    return field(default=default, metadata={"help": help, **metadata})


class _Section:
    """A settings section that checks each field's ``check`` bound when it is made."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata.get("check")
            if check and value is not None:
                op, bound = check.split()[:2]
                if not (value > float(bound) if op == ">" else value >= float(bound)):
                    raise UsageError(f"{flag_name(f)} must be {check}, got {value}")


@dataclass
class DataConfig(_Section):
    """Where MNIST lives and how it reaches the model."""

    data_dir: str = _opt("./data", "folder holding MNIST/raw/*-ubyte", env="MNIST_DIST_DATA_DIR")
    loader: Literal["tensor", "torchvision"] = _opt(
        "tensor",
        "input pipeline: 'tensor' = whole split preprocessed once on the training device, "
        "'torchvision' = DataLoader with the PIL transforms",
    )
    num_workers: int = _opt(
        2, "DataLoader worker processes (torchvision loader only)", check=">= 0"
    )
    max_train_samples: int | None = _opt(
        None, "use only the first N training images", shown_default="all 60,000", check="> 0"
    )
    max_eval_samples: int | None = _opt(
        None, "use only the first N test images", shown_default="all 10,000", check="> 0"
    )
    eval_batch_size: int = _opt(1000, "images per forward pass during evaluation", check="> 0")
    download: bool = _opt(
        False, "download MNIST into --data-dir if it is missing (main process only)"
    )


@dataclass
class OptimConfig(_Section):
    """Adam with a MultiStepLR schedule stepped once per epoch."""

    lr: float = _opt(
        1e-3,
        "Adam learning rate for epochs before the first milestone",
        aliases=("learning_rate",),
        check="> 0",
    )
    lr_milestones: tuple[int, ...] = _opt(
        (5, 8), "epochs after which the LR is multiplied by --lr-gamma (e.g. 5,8)"
    )
    lr_gamma: float = _opt(0.01, "LR multiplier applied at each milestone", check="> 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        epochs = list(self.lr_milestones)
        if epochs != sorted(set(epochs)) or min(epochs, default=1) <= 0:
            raise UsageError(f"--lr-milestones must be increasing positive epochs, got {epochs}")


@dataclass
class TrainConfig(_Section):
    """The run itself: length, batch, precision, outputs."""

    epochs: int = _opt(10, "passes over the training set", check="> 0")
    global_batch_size: int = _opt(
        64,
        "images per optimizer step summed over all processes (split evenly across them)",
        flag="--batch-size",
        check="> 0",
    )
    grad_accum: int = _opt(
        1,
        "micro-batches each process splits its share of a step into (same math, less memory)",
        check="> 0",
    )
    seed: int = _opt(0, "seed for weights, shuffling and every RNG")
    mixed_precision: Literal["no", "fp16", "bf16"] = _opt(
        "no", "autocast dtype: no (fp32), fp16 (CUDA only), bf16"
    )
    channels_last: bool = _opt(
        True, "channels-last (NHWC) memory layout for the convolutions: faster, same math"
    )
    compile: bool = _opt(
        False, "torch.compile the model's forward (pays a compile first; measure before using)"
    )
    cuda_graph: Literal["auto", "on", "off"] = _opt(
        "auto",
        "run the whole optimizer step as one CUDA graph replay: auto = wherever it can (one "
        "process on a CUDA GPU, tensor loader), on = try even so and train eagerly with a "
        "warning if capture fails, off = eager steps",
    )
    deterministic: bool = _opt(
        True,
        "deterministic algorithms, so a rerun or a resume gives bit-identical weights on GPUs "
        "too; --no-deterministic lets cuDNN benchmark and pick the fastest kernels",
    )
    log_every: int = _opt(50, "optimizer steps between step records in steps.jsonl", check="> 0")
    progress_every: float = _opt(
        30.0,
        "seconds between progress lines inside an epoch when the output is not a terminal "
        "(logs, pipes); also one at each quarter of an epoch once a sixth of that has passed; "
        "0: epoch lines only",
        check=">= 0 seconds",
    )
    output_dir: str | None = _opt(
        None,
        "run directory; a run in it is resumed, never overwritten",
        shown_default="runs/<timestamp>",
    )

    def per_device_batch_size(self, world_size: int) -> int:
        """Images each process contributes to one optimizer step."""
        if self.global_batch_size % (world_size * self.grad_accum):
            raise UsageError(
                f"--batch-size {self.global_batch_size} is not divisible by world size "
                f"{world_size} x --grad-accum {self.grad_accum}"
            )
        return self.global_batch_size // world_size


@dataclass
class CheckpointConfig(_Section):
    """Resumable state in ``<output-dir>/checkpoints`` and where a run starts from."""

    checkpoint_every: int = _opt(
        0,
        "also checkpoint every N optimizer steps (0: only at the end of each epoch)",
        check=">= 0 steps",
    )
    keep_checkpoints: int = _opt(3, "complete checkpoints kept, newest first", check=">= 1")
    resume: str = _opt(
        "auto",
        "auto: continue from the newest intact checkpoint in --output-dir, else start fresh; "
        "never: start fresh; or the path of a checkpoint folder",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_resume(self.resume)  # raises UsageError for a value it cannot read


@dataclass
class TrackingConfig(_Section):
    """Where a run is recorded besides its run directory: Weights & Biases, or nothing. No secret
    is a setting (W&B records the command line): the API key comes from the environment."""

    tracker: Literal["wandb", "none"] = _opt("none", "experiment tracker")
    wandb_project: str = _opt("mnist-dist", "W&B project", env="WANDB_PROJECT")
    wandb_entity: str | None = _opt(
        None, "W&B team or user", env="WANDB_ENTITY", shown_default="the account's default entity"
    )
    run_name: str | None = _opt(
        None, "display name of the W&B run", env="WANDB_NAME", shown_default="made up by W&B"
    )
    wandb_group: str | None = _opt(
        None,
        "W&B group, e.g. one per sweep or experiment",
        env="WANDB_RUN_GROUP",
        shown_default="none",
    )
    wandb_tags: tuple[str, ...] = _opt(
        (), "W&B tags, comma separated (e.g. baseline,bf16)", env="WANDB_TAGS"
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = _opt(
        None,
        "where the W&B run goes; disabled makes no W&B calls at all",
        shown_default="env WANDB_MODE, else online when W&B credentials are found "
        "(WANDB_API_KEY or `wandb login`) and offline into the run directory when not",
    )
    wandb_finish_timeout: float = _opt(
        120.0,
        "seconds to wait for W&B to finish (upload) at the end of a run; after that its files "
        "stay on disk for `wandb sync`",
        check="> 0 seconds",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.wandb_project.strip():
            raise UsageError("--wandb-project must not be empty")


@dataclass
class Config:
    """Everything a training run needs, by component."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["lr_milestones"] = list(self.optim.lr_milestones)
        out["tracking"]["wandb_tags"] = list(self.tracking.wandb_tags)
        return out


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # name -> dataclass, in order


def flag_name(f: dataclasses.Field) -> str:
    """A setting's command-line flag: ``--`` and its name with dashes, unless it has its own."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# Settings a run may change when it continues in its own run directory (where files go, what is
# logged, how data is read). Every other setting counts as math, so a new field is guarded on
# resume until it is added here. ``train.epochs`` is handled on its own: more epochs continue.
RESUMABLE_SETTINGS: frozenset[tuple[str, str]] = frozenset(
    [("data", name) for name in ("data_dir", "num_workers", "eval_batch_size", "download")]
    + [("train", name) for name in ("epochs", "log_every", "progress_every", "output_dir")]
    + [("checkpoint", name) for name in ("checkpoint_every", "keep_checkpoints", "resume")]
    + [("tracking", f.name) for f in dataclasses.fields(TrackingConfig)]
)


def changed_math_settings(run: dict[str, Any], this: dict[str, Any]) -> list[tuple[str, str]]:
    """Each setting outside ``RESUMABLE_SETTINGS`` that differs between two ``Config.to_dict()``
    mappings, as flags (``("--lr 0.001", "--lr 0.01")``); one the run did not record is skipped."""
    return [
        (_as_flag(f, run[s][f.name]), _as_flag(f, this[s][f.name]))
        for s, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if (s, f.name) not in RESUMABLE_SETTINGS
        and f.name in (run.get(s) or {})
        and run[s][f.name] != this[s][f.name]
    ]


def _as_flag(f: dataclasses.Field, value: Any) -> str:
    """The command-line form of a setting, e.g. ``--lr 0.01``, ``--no-channels-last``."""
    flag = flag_name(f)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value)) or 'none'}"
    return f"{flag} {'all' if value is None else value}"
