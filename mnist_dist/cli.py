"""The command line: sub-commands, a flag per setting, the ``--config`` file, their ``Config``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import re
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from mnist_dist.config import SECTIONS, Config, DataConfig, flag_name
from mnist_dist.errors import UsageError, first_line

_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) that suggest a spelling and point to --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # argparse would take `--epoch 1` as `--epochs 1`: a typo must be an error (with a
        # suggestion), and a flag added later must not change what an old abbreviation meant.
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        self.flag_aliases: dict[str, str] = {}  # e.g. "--learning-rate": "--lr" (add_settings)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's own check, with a suggestion: `trian` -> train, `bf61` -> bf16.
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            hint = did_you_mean(str(value), choices)
            message = f"invalid choice: {value!r} (choose from {', '.join(choices)}){hint}"
            raise argparse.ArgumentError(action, message)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def parse_known_args(self, *args: Any, **kwargs: Any) -> tuple[argparse.Namespace, list[str]]:
        # A sub-command's parser gets every argument after its name: what it does not know is
        # unknown for good, and the help to point to is the sub-command's. The suggestion is for
        # the first unknown flag close to a known one.
        parsed, extras = super().parse_known_args(*args, **kwargs)
        if extras:
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            unknown = (e.split("=", 1)[0] for e in extras if e.startswith("--") and len(e) > 2)
            hints = (did_you_mean(name, flags, self.flag_aliases) for name in unknown)
            hint = next(filter(None, hints), "")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed, extras


# What each sub-command does: its line in `mnist-dist --help` and its own help's description.
_COMMANDS = {
    "train": "Train the reference CNN (plain python or under `accelerate launch`).",
    "doctor": "Check a launch before it starts: SLURM layout, processes, port, data, output, W&B.",
    "evaluate": "Test accuracy and loss of saved weights (also under `accelerate launch`).",
    "predict": "Digit and probability of PNG/JPEG images; dark-on-light digits are inverted first.",
    "report": "Per-epoch table of runs from their metrics.jsonl (no W&B needed), optional PNG.",
    "download": "Fetch MNIST with torchvision into --data-dir and verify its checksums.",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-dist`` parser; ``args.command`` names the sub-command given."""
    parser = _Parser(
        prog="mnist-dist",
        description="Train, evaluate and use the reference MNIST CNN on CPU, GPU, DDP or SLURM.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub = {
        name: commands.add_parser(name, help=text, description=text)
        for name, text in _COMMANDS.items()
    }
    sub["doctor"].add_argument(
        "--write-env",
        metavar="FILE",
        help="also write the launch plan as shell `export` lines (used by slurm/train.sbatch)",
    )
    for name in ("train", "doctor"):
        sub[name].add_argument(
            "--config",
            metavar="FILE",
            help=f"YAML or JSON file with a mapping per section ({', '.join(SECTIONS)}) of "
            "settings by name, e.g. `optim: {lr: 1e-3}`; a run's own config.yaml works. "
            "Settings: defaults (the reference recipe) < environment (the variables named in a "
            "flag's help) < --config file < flags.",
        )
        add_settings(sub[name])
    for name, what in (
        ("evaluate", "the result as JSON"),
        ("predict", "one JSON object per image"),
    ):
        sub[name].add_argument(
            "--weights",
            required=True,
            metavar="PATH",
            help="model.safetensors from a run, or a torch state_dict (.pth) of the reference",
        )
        sub[name].add_argument("--json", action="store_true", help=f"print {what}")
    # evaluate reads the test split only: no training-set flags
    data = {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    add_settings(sub["evaluate"], only=data - {"data.max_train_samples"})
    sub["predict"].add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    sub["report"].add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    sub["report"].add_argument(
        "--plot",
        metavar="PNG",
        help="also draw loss, accuracy and LR curves into this PNG (needs the plot extra)",
    )
    add_settings(sub["download"], only={"data.data_dir"})
    return parser


def _version() -> str:
    """``mnist-dist X (torch Y, accelerate Z, Python W)``."""
    import platform
    from importlib import metadata

    def version(package: str) -> str:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(package)
        return "not installed"

    return (
        f"mnist-dist {version('mnist-dist')} (torch {version('torch')}, accelerate "
        f"{version('accelerate')}, Python {platform.python_version()})"
    )


def add_settings(parser: _Parser, only: Collection[str] | None = None) -> None:
    """Add a flag per setting (``only`` those named ``section.name``) that overrides if given."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings", argument_default=argparse.SUPPRESS)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if only is None or f"{section}.{f.name}" in only:
                env = f" (env {f.metadata['env']})" if "env" in f.metadata else ""
                kwargs = _value_kwargs(f, hints[f.name])
                kwargs["help"] = f.metadata["help"] + env + _default_note(f)
                group.add_argument(flag_name(f), dest=f"{section}.{f.name}", **kwargs)
                for alias in f.metadata.get("aliases", ()):
                    parser.flag_aliases["--" + alias.replace("_", "-")] = flag_name(f)


def _value_kwargs(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """How a flag takes its value: a switch, a choice, a list, a count that may be "all", ..."""
    args = typing.get_args(tp)
    if type(None) in args and args[0] is int:  # a count: "all" (or "none") means no limit
        return {"type": _positive_or_none, "metavar": "N"}
    if type(None) in args:  # any other `X | None`: None is no value to type on a command line
        return _value_kwargs(f, args[0])
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is Literal:
        return {"choices": list(args)}
    if typing.get_origin(tp) is tuple:
        return {"nargs": "+", "metavar": "TAG" if args[0] is str else "EPOCH"}
    return {"type": tp, "metavar": f.name.upper()}  # not the internal dest "SECTION.NAME"


def _default_note(f: dataclasses.Field) -> str:
    """The default a flag's help shows (``shown_default``, else the value; no ``None``)."""
    shown = f.metadata.get("shown_default", f.default)  # every field has a default
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    elif isinstance(shown, tuple):
        shown = ",".join(map(str, shown)) or "none"
    return "" if shown is None else f" [default: {shown}]"


# argparse names this function in its error ("invalid _positive_or_none value: 'x'").
def _positive_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def build_config(args: argparse.Namespace) -> Config:
    """The validated ``Config`` of defaults < environment < config file < flags; a wrong value is
    named by its file and key (``config file run.yaml: ... train.epochs``) or its flag."""
    path = getattr(args, "config", None)
    file = load_config_file(path) if path else {}
    # `accelerate launch` passes its config's mixed_precision in this variable: it counts as a
    # default, so multi_gpu_bf16.yaml means bf16 unless the file or a flag says otherwise.
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    built = {}
    for name, cls in SECTIONS.items():
        hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
        raw = {}
        if name == "train" and launcher_precision in ("no", "fp16", "bf16"):
            raw["mixed_precision"] = launcher_precision
        for f in fields.values():  # an empty variable is unset (templates export `NAME=`)
            if os.environ.get(f.metadata.get("env", "")):
                raw[f.name] = os.environ[f.metadata["env"]]
        # Flags were stored as "section.name" (argparse's dest), in the order they were given.
        flags = {k.partition(".")[2]: v for k, v in vars(args).items() if k.startswith(f"{name}.")}
        values = {k: _check_type(fields[k], hints[k], v) for k, v in raw.items()}
        # The file's values that no flag overrides are checked first, to be named as in the file.
        from_file = {k: v for k, v in file.get(name, {}).items() if k not in flags}
        if from_file:
            try:
                for k, v in from_file.items():
                    values[k] = _check_type(fields[k], hints[k], v)
                cls(**values)
            except UsageError as e:
                message = str(e)
                for k in from_file:  # said in the file's terms: --lr as optim.lr, not --lr-gamma
                    flag = re.escape(flag_name(fields[k])) + r"(?![\w-])"
                    message = re.sub(flag, f"{name}.{k}", message)
                raise UsageError(f"config file {path}: {message}") from None
        values.update({k: _check_type(fields[k], hints[k], v) for k, v in flags.items()})
        built[name] = cls(**values)
    return Config(**built)


def _check_type(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` as the field's type, or a UsageError naming its flag."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:  # `X | None`: None, or what X accepts
        return None if value is None else _check_type(f, args[0], value)
    if origin is Literal:
        expected = "one of " + ", ".join(map(str, args))
        if value in args:
            return value
    elif origin is tuple:
        expected = "a list of strings" if args[0] is str else "a list of integers"
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # "5 8" from the command line, or a list of tags
        if isinstance(value, str):  # tags split at commas; epochs at commas or spaces
            text = value if args[0] is str else value.replace(" ", ",")
            try:
                return tuple(args[0](part.strip()) for part in text.split(",") if part.strip())
            except ValueError:  # only epochs fail to convert: a tag is any text
                raise UsageError(f"{flag_name(f)} expects epochs like 5,8, got {value!r}") from None
        if isinstance(value, list) and all(type(v) is args[0] for v in value):
            return tuple(value)
    elif tp is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]  # a switch written `download: yes` (see ConfigLoader)
    else:
        expected = tp.__name__
        # Exact types, as YAML and JSON give them: a bool is not a number, an int is a float.
        if type(value) is tp or (tp is float and type(value) is int):
            with contextlib.suppress(OverflowError):  # an int no float can hold: a bad value
                return tp(value)
    raise UsageError(f"invalid value {value!r} for {flag_name(f)} (expected {expected})")


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading ``1e-3`` as a float and only ``true``/``false`` as booleans,
    as YAML 1.2 does: PyYAML follows YAML 1.1 (yaml/pyyaml#173), where ``1e-3`` is a string and
    ``no``/``off`` are false. What ``yaml.safe_dump`` writes reads back the same."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ConfigLoader.add_implicit_resolver(  # the floats YAML 1.1 lacks: 1e-3, 1.5e3 (no dot or sign)
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file shaped like ``Config.to_dict()``: a mapping per section."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=ConfigLoader)
    except OSError as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        problem = f" is not UTF-8 text (byte {e.start}: {e.reason})"
    except json.JSONDecodeError as e:
        problem = f", line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}"
    except yaml.YAMLError as e:  # where (1-based, as editors count) and what, in one line
        if isinstance(e, yaml.reader.ReaderError):  # a bad character: yaml gives its offset only
            line = text.count("\n", 0, e.position)
            column = e.position - text.rfind("\n", 0, e.position) - 1
            what = first_line(e)
        else:  # safe_load's other errors all carry the problem and where it is
            line, column = e.problem_mark.line, e.problem_mark.column
            what = f"{e.problem} ({e.context})" if e.context else e.problem
        problem = f", line {line + 1}, column {column + 1}: not valid YAML: {what}"
    else:
        raw = {} if raw is None else raw
        if not (problem := _shape_error(raw)):
            return raw
    raise UsageError(f"config file {p}{problem}")


def _shape_error(raw: Any) -> str:
    """What is wrong with the shape of a parsed config file, or ""."""
    if not isinstance(raw, dict):
        return f" must hold a mapping of sections, got {type(raw).__name__}"
    raw.pop("provenance", None)  # a run's own config.yaml can be fed back as --config
    if unknown := sorted(set(raw) - set(SECTIONS), key=str):  # YAML keys may be numbers too
        hints = _hints(unknown, SECTIONS, {})
        return f": unknown section(s) {unknown}; expected {list(SECTIONS)}{hints}"
    for section, values in raw.items():
        if not isinstance(values, dict):
            return f": section {section!r} must be a mapping"
        fields = dataclasses.fields(SECTIONS[section])
        known = [f.name for f in fields]
        if unknown := sorted(set(values) - set(known), key=str):
            aliases = {a: f.name for f in fields for a in f.metadata.get("aliases", ())}
            hints = _hints(unknown, known, aliases, section)
            return f": unknown key(s) {unknown} in section {section!r}{hints}"
    return ""


def _hints(unknown: list[Any], known: Collection[str], aliases: dict, section: str = "") -> str:
    """`` (x: did you mean y?; z belongs in section 'optim')`` for unknown names, or ""."""
    section_of = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    hints = []
    for name in (u for u in unknown if isinstance(u, str) and u):
        if section and name in section_of:  # a key of another section
            hints.append(f"{name} belongs in section {section_of[name]!r}")
        elif close := closest(name.replace("-", "_"), known, aliases):
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def closest(name: str, names: Collection[str], aliases: dict[str, str] | None = None) -> list[str]:
    """What an unknown ``name`` likely meant: what it is an alias or a prefix of, or is near."""
    aliases = aliases or {}
    if name in aliases:
        return [aliases[name]]
    if prefixed := [n for n in names if n.startswith(name)]:
        return prefixed
    return [aliases.get(m, m) for m in difflib.get_close_matches(name, [*names, *aliases], n=1)]


def did_you_mean(name: str, names: Collection[str], aliases: dict[str, str] | None = None) -> str:
    """``"; did you mean X?"`` (or "one of X, Y") for ``closest``'s answer, or ""."""
    close = closest(name, names, aliases)
    return f"; did you mean {'one of ' * (len(close) > 1)}{', '.join(close)}?" if close else ""
