"""Typed settings, one schema for defaults (the reference recipe), config files, environment and
flags (``cli`` reads each field's metadata); each section validates itself."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mnist_dist.errors import UsageError
from mnist_dist.layout import parse_resume

DATA_DIR_ENV = "MNIST_DIST_DATA_DIR"
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


def _opt(
    help: str,
    flag: str | None = None,
    env: str | None = None,
    shown_default: str | None = None,
    aliases: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """A field with its flag's help, flag name if not its own, environment variable, default as
    the help shows it if the value would not tell, and aliases too far for a spelling match."""
    metadata = {"help": help, "flag": flag, "env": env, "shown_default": shown_default}
    return field(metadata={**metadata, "aliases": aliases}, **kwargs)


@dataclass
class DataConfig:
    """Where MNIST lives and how it reaches the model."""

    data_dir: str = _opt("folder holding MNIST/raw/*-ubyte", env=DATA_DIR_ENV, default="./data")
    loader: Literal["tensor", "torchvision"] = _opt(
        "input pipeline: 'tensor' = whole split preprocessed once on the training device, "
        "'torchvision' = DataLoader with the PIL transforms",
        default="tensor",
    )
    num_workers: int = _opt("DataLoader worker processes (torchvision loader only)", default=2)
    max_train_samples: int | None = _opt(
        "use only the first N training images", shown_default="all 60,000", default=None
    )
    max_eval_samples: int | None = _opt(
        "use only the first N test images", shown_default="all 10,000", default=None
    )
    eval_batch_size: int = _opt("images per forward pass during evaluation", default=1000)
    download: bool = _opt(
        "download MNIST into --data-dir if it is missing (main process only)", default=False
    )

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        _require(self.eval_batch_size > 0, "--eval-batch-size must be > 0")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be a positive number of images, got {value}")


@dataclass
class OptimConfig:
    """Adam with a MultiStepLR schedule stepped once per epoch."""

    lr: float = _opt(
        "Adam learning rate for epochs before the first milestone",
        aliases=("learning_rate",),
        default=1e-3,
    )
    lr_milestones: tuple[int, ...] = _opt(
        "epochs after which the LR is multiplied by --lr-gamma (e.g. 5,8)", default=(5, 8)
    )
    lr_gamma: float = _opt("LR multiplier applied at each milestone", default=0.01)

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        _require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(self.lr_gamma > 0, f"--lr-gamma must be > 0, got {self.lr_gamma}")
        _require(
            all(m > 0 for m in self.lr_milestones)
            and list(self.lr_milestones) == sorted(set(self.lr_milestones)),
            f"--lr-milestones must be increasing positive epochs, got {list(self.lr_milestones)}",
        )


@dataclass
class TrainConfig:
    """The run itself: length, batch, precision, outputs."""

    epochs: int = _opt("passes over the training set", default=10)
    global_batch_size: int = _opt(
        "images per optimizer step summed over all processes (split evenly across them)",
        flag="--batch-size",
        default=64,
    )
    grad_accum: int = _opt(
        "micro-batches each process splits its share of a step into (same math, less memory)",
        default=1,
    )
    seed: int = _opt("seed for weights, shuffling and every RNG", default=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = _opt(
        "autocast dtype: no (fp32), fp16 (CUDA only), bf16", default="no"
    )
    channels_last: bool = _opt(
        "channels-last (NHWC) memory layout for the convolutions: faster, same math", default=True
    )
    compile: bool = _opt(
        "torch.compile the model's forward (pays a compile first; measure before using)",
        default=False,
    )
    cuda_graph: Literal["auto", "on", "off"] = _opt(
        "run the whole optimizer step as one CUDA graph replay: auto = wherever it can (one "
        "process on a CUDA GPU, tensor loader), on = try even so and train eagerly with a "
        "warning if capture fails, off = eager steps",
        default="auto",
    )
    deterministic: bool = _opt(
        "deterministic algorithms, so a rerun or a resume gives bit-identical weights on GPUs "
        "too; --no-deterministic lets cuDNN benchmark and pick the fastest kernels",
        default=True,
    )
    log_every: int = _opt("optimizer steps between step records in steps.jsonl", default=50)
    progress_every: float = _opt(
        "seconds between progress lines inside an epoch when the output is not a terminal "
        "(logs, pipes); also one at each quarter of an epoch once a sixth of that has passed; "
        "0: epoch lines only",
        default=30.0,
    )
    output_dir: str | None = _opt(
        "run directory; a run in it is resumed, never overwritten",
        shown_default="runs/<timestamp>",
        default=None,
    )

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        _require(
            self.global_batch_size > 0, f"--batch-size must be > 0, got {self.global_batch_size}"
        )
        _require(self.grad_accum > 0, f"--grad-accum must be > 0, got {self.grad_accum}")
        _require(self.log_every > 0, f"--log-every must be > 0, got {self.log_every}")
        _require(
            self.progress_every >= 0,
            f"--progress-every must be >= 0 seconds, got {self.progress_every}",
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
class CheckpointConfig:
    """Resumable state in ``<output-dir>/checkpoints`` and where a run starts from."""

    checkpoint_every: int = _opt(
        "also checkpoint every N optimizer steps (0: only at the end of each epoch)", default=0
    )
    keep_checkpoints: int = _opt("complete checkpoints kept, newest first", default=3)
    resume: str = _opt(
        "auto: continue from the newest intact checkpoint in --output-dir, else start fresh; "
        "never: start fresh; or the path of a checkpoint folder",
        default="auto",
    )

    def __post_init__(self) -> None:
        _require(
            self.checkpoint_every >= 0,
            f"--checkpoint-every must be >= 0 steps, got {self.checkpoint_every}",
        )
        _require(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}",
        )
        parse_resume(self.resume)  # raises UsageError for a value it cannot read


@dataclass
class TrackingConfig:
    """Where a run is recorded besides its run directory: Weights & Biases, or nothing. No secret
    is a setting (W&B records the command line): the API key comes from the environment."""

    tracker: Literal["wandb", "none"] = _opt("experiment tracker", default="none")
    wandb_project: str = _opt("W&B project", env="WANDB_PROJECT", default="mnist-dist")
    wandb_entity: str | None = _opt(
        "W&B team or user",
        env="WANDB_ENTITY",
        shown_default="the account's default entity",
        default=None,
    )
    run_name: str | None = _opt(
        "display name of the W&B run",
        env="WANDB_NAME",
        shown_default="made up by W&B",
        default=None,
    )
    wandb_group: str | None = _opt(
        "W&B group, e.g. one per sweep or experiment",
        env="WANDB_RUN_GROUP",
        shown_default="none",
        default=None,
    )
    wandb_tags: tuple[str, ...] = _opt(
        "W&B tags, comma separated (e.g. baseline,bf16)", env="WANDB_TAGS", default=()
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = _opt(
        "where the W&B run goes; disabled makes no W&B calls at all",
        shown_default="env WANDB_MODE, else online when W&B credentials are found "
        "(WANDB_API_KEY or `wandb login`) and offline into the run directory when not",
        default=None,
    )
    wandb_finish_timeout: float = _opt(
        "seconds to wait for W&B to finish (upload) at the end of a run; after that its files "
        "stay on disk for `wandb sync`",
        default=120.0,
    )

    def __post_init__(self) -> None:
        _require(bool(self.wandb_project.strip()), "--wandb-project must not be empty")
        _require(
            self.wandb_finish_timeout > 0,
            f"--wandb-finish-timeout must be > 0 seconds, got {self.wandb_finish_timeout}",
        )


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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


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
    changed = []
    for section, cls in SECTIONS.items():
        recorded = run.get(section) or {}
        for f in dataclasses.fields(cls):
            if (section, f.name) in RESUMABLE_SETTINGS or f.name not in recorded:
                continue
            was, now = recorded[f.name], this[section][f.name]
            if was != now:
                changed.append((_as_flag(f, was), _as_flag(f, now)))
    return changed


def _as_flag(f: dataclasses.Field, value: Any) -> str:
    """The command-line form of a setting, e.g. ``--lr 0.01``, ``--no-channels-last``."""
    flag = flag_name(f)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value)) or 'none'}"
    return f"{flag} {'all' if value is None else value}"
