"""Typed settings: defaults are the reference recipe; a YAML/JSON file and CLI flags override them.

Every field carries a ``help`` string (with its unit) that becomes the flag's help text, so the
dataclasses below are the one schema for defaults, config files and the command line.
Precedence: flags > ``--config`` file > environment > defaults. Environment: ``MNIST_DIST_DATA_DIR``
(data directory), ``ACCELERATE_MIXED_PRECISION`` (set by ``accelerate launch`` from its config) and
W&B's own ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_RUN_GROUP``, ``WANDB_TAGS``.
A variable that is set but empty counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mnist_dist.errors import UsageError, first_line
from mnist_dist.layout import parse_resume

DATA_DIR_ENV = "MNIST_DIST_DATA_DIR"
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


def _opt(
    help: str,
    flag: str | None = None,
    env: str | None = None,
    shown_default: str | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field with CLI metadata: ``help`` text, an optional explicit flag name, an
    optional environment variable that overrides the default, and ``shown_default``: what the
    help says the default is when the value itself would not tell (``None`` meaning "decided at
    run time"). The help text itself never states the default; the flag's help adds it once."""
    default = kwargs.pop("default", dataclasses.MISSING)
    factory = kwargs.pop("default_factory", dataclasses.MISSING)
    metadata = {"help": help, "flag": flag, "env": env, "shown_default": shown_default}
    return field(default=default, default_factory=factory, metadata=metadata)


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
        if self.loader not in ("tensor", "torchvision"):
            raise UsageError(f"--loader must be 'tensor' or 'torchvision', got {self.loader!r}")
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

    lr: float = _opt("Adam learning rate for epochs before the first milestone", default=1e-3)
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
        if self.cuda_graph not in ("auto", "on", "off"):
            raise UsageError(f"--cuda-graph must be auto, on or off, got {self.cuda_graph!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UsageError(
                f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}"
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
    """Where a run is recorded besides its run directory: Weights & Biases, or nothing.

    No secret is ever a setting: W&B records the command line in its run metadata, so the API
    key comes only from ``WANDB_API_KEY`` or ``wandb login``.
    """

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
        if self.tracker not in ("wandb", "none"):
            raise UsageError(f"--tracker must be wandb or none, got {self.tracker!r}")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise UsageError(
                f"--wandb-mode must be online, offline or disabled, got {self.wandb_mode!r}"
            )
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


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_tags(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_milestones(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", ",").split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--lr-milestones expects epochs like 5,8, got {text!r}") from None


def _positive_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def add_config_flags(
    parser: argparse.ArgumentParser,
    sections: dict[str, type] = SECTIONS,
    only: Collection[str] | None = None,
) -> None:
    """Add one flag per config field of ``sections`` (or per field named in ``only``); every
    default is SUPPRESS so unset flags are not overrides."""
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} settings")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            tp = _base_type(hints[f.name])
            shown = _show_default(f)
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "metavar": f.name.upper(),  # not the internal dest "SECTION.NAME"
                "help": f"{f.metadata['help']}{_env_note(f)}"
                + (f" [default: {shown}]" if shown is not None else ""),
            }
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
                del kwargs["metavar"]  # a switch takes no value
            elif typing.get_origin(tp) is Literal:
                kwargs["choices"] = list(typing.get_args(tp))
                del kwargs["metavar"]  # argparse then shows the choices: --loader {tensor,...}
            elif typing.get_origin(tp) is tuple:  # "5,8" or "5 8"; parsed in _check_type
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "TAG" if typing.get_args(tp)[0] is str else "EPOCH"
            elif tp is int and f.default is None:
                kwargs["type"] = _positive_or_none
                kwargs["metavar"] = "N"
            else:
                kwargs["type"] = tp
            group.add_argument(_flag(f), **kwargs)


def _env_note(f: dataclasses.Field) -> str:
    return f" (env {f.metadata['env']})" if f.metadata.get("env") else ""


def _show_default(f: dataclasses.Field) -> str | None:
    """The one default a flag's help shows: ``shown_default`` if the field has one, else its
    value; nothing for a ``None`` that nobody explained."""
    if f.metadata.get("shown_default") is not None:
        return f.metadata["shown_default"]
    value = f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file shaped like ``Config.to_dict()``: a mapping per section."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"config file {p}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}"
        ) from None
    except yaml.YAMLError as e:
        raise UsageError(
            f"config file {p}{_yaml_position(e, text)}: not valid YAML: {_yaml_problem(e)}"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(
            f"config file {p} must hold a mapping of sections, got {type(raw).__name__}"
        )
    raw.pop("provenance", None)  # a run's own config.yaml can be fed back as --config
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UsageError(
            f"config file {p}: unknown section(s) {unknown}; expected {list(SECTIONS)}"
        )
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise UsageError(f"config file {p}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        bad = sorted(set(values) - known)
        if bad:
            raise UsageError(f"config file {p}: unknown key(s) {bad} in section {section!r}")
    return raw


def _yaml_position(error: yaml.YAMLError, text: str) -> str:
    """The position of a YAML error as ", line L, column C" (1-based, as editors count), or ""
    when yaml does not know it."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f", line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(error, yaml.reader.ReaderError):  # a forbidden character: only its offset
        line = text.count("\n", 0, error.position) + 1
        column = error.position - text.rfind("\n", 0, error.position)
        return f", line {line}, column {column}"
    return ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What yaml found wrong, without the source excerpt it appends over several lines."""
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if problem:
        return f"{problem} ({context})" if context else problem
    return first_line(error)


def build_config(args: argparse.Namespace, sections: dict[str, type] = SECTIONS) -> Config:
    """Resolve defaults <- environment <- config file <- flags into a validated ``Config``."""
    layered: dict[str, dict[str, Any]] = {name: {} for name in sections}
    # `accelerate launch` passes its config's mixed_precision in this variable: it counts as a
    # default, so multi_gpu_bf16.yaml means bf16 unless the file or a flag says otherwise.
    launcher_precision = os.environ.get(LAUNCHER_PRECISION_ENV, "").lower()
    if launcher_precision in ("no", "fp16", "bf16") and "train" in layered:
        layered["train"]["mixed_precision"] = launcher_precision
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            # An empty variable counts as unset (job templates often export `NAME=`).
            if f.metadata.get("env") and os.environ.get(f.metadata["env"]):
                layered[name][f.name] = os.environ[f.metadata["env"]]
    config_path = getattr(args, "config", None)
    if config_path:
        for section, values in load_config_file(config_path).items():
            if section in layered:
                layered[section].update(values)
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in layered:
            layered[section][name] = value
    built = {}
    for name, values in layered.items():
        hints = typing.get_type_hints(sections[name])
        flags = {f.name: _flag(f) for f in dataclasses.fields(sections[name])}
        checked = {k: _check_type(flags[k], v, hints[k]) for k, v in values.items()}
        built[name] = sections[name](**checked)
    return Config(**built)


def _check_type(flag: str, value: Any, annotation: Any) -> Any:
    """Values from a config file arrive untyped: accept what the field's type accepts, or say so."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    tp = _base_type(annotation)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # from the command line or a config file
        if isinstance(value, str):
            return tuple(_parse_tags(value))
    elif typing.get_origin(tp) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # from the command line
        if isinstance(value, str):
            return tuple(_parse_milestones(value))
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise UsageError(f"invalid value {value!r} for {flag} (expected {_describe(annotation)})")


def _describe(annotation: Any) -> str:
    tp = _base_type(annotation)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return "a list of strings" if typing.get_args(tp)[0] is str else "a list of integers"
    return getattr(tp, "__name__", str(tp))


# Settings a run may change when it continues in its own run directory: they decide where files
# go, what is logged and how often, and how data is read, not what is trained. Every setting not
# listed counts as math (seed, batch, accumulation, optimizer, precision, layout, compile,
# loader, the images used, ...), so a new field is guarded on resume until it is added here.
# ``train.epochs`` is listed because it is handled on its own: more epochs continue a run.
RESUMABLE_SETTINGS: frozenset[tuple[str, str]] = frozenset(
    {
        ("data", "data_dir"),
        ("data", "num_workers"),
        ("data", "eval_batch_size"),
        ("data", "download"),
        ("train", "epochs"),
        ("train", "log_every"),
        ("train", "output_dir"),
        ("checkpoint", "checkpoint_every"),
        ("checkpoint", "keep_checkpoints"),
        ("checkpoint", "resume"),
        *(("tracking", f.name) for f in dataclasses.fields(TrackingConfig)),
    }
)


def changed_math_settings(run: dict[str, Any], this: dict[str, Any]) -> list[tuple[str, str]]:
    """Each setting outside ``RESUMABLE_SETTINGS`` that differs between two ``Config.to_dict()``
    mappings, as the flag with the run's value and the flag with this one's, e.g.
    ``("--lr 0.001", "--lr 0.01")``. A setting the run does not record (it predates the
    setting) is not compared: what the run did then is unknown."""
    changed = []
    for section, cls in SECTIONS.items():
        recorded = run.get(section) or {}
        for f in dataclasses.fields(cls):
            if (section, f.name) in RESUMABLE_SETTINGS or f.name not in recorded:
                continue
            was, now = recorded[f.name], this[section][f.name]
            if _plain(was) != _plain(now):
                changed.append((_as_flag(f, was), _as_flag(f, now)))
    return changed


def _plain(value: Any) -> Any:
    """Tuples as lists: the recorded settings went through JSON or YAML."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _as_flag(f: dataclasses.Field, value: Any) -> str:
    """The command-line form of a setting, e.g. ``--lr 0.01``, ``--no-channels-last``."""
    flag = _flag(f)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value)) or 'none'}"
    return f"{flag} {'all' if value is None else value}"
