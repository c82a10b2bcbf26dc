"""The W&B sweep examples in sweeps/: every parameter is a valid ``mnist-dist train`` flag with a
valid value, formatted the way ``wandb agent`` formats it, under the launcher the sweep names."""

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from helpers import ROOT
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from mnist_dist.cli import build_config, build_parser
from mnist_dist.config import Config
from mnist_dist.errors import UsageError
from mnist_dist.records import EpochRecord, StepRecord
from mnist_dist.report import EPOCH_COLUMNS
from mnist_dist.wandb_tracker import namespaced

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def trials(sweep: dict) -> list[dict]:
    """Every parameter combination a grid sweep runs."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command ``wandb agent`` runs for one trial (its own argument formatting)."""
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    command = []
    for part in sweep["command"]:
        if part == "${args}":
            command += args["args"]
        elif part == "${env}":
            command.append("/usr/bin/env")
        else:
            assert not part.startswith("${"), f"unexpected macro {part}"
            command.append(part)
    return command


def parse_trial(command: list[str]) -> tuple[Config, int]:
    """The train config the trial would run with, and its number of processes."""
    train_at = command.index("train")
    processes = 1
    if "launch" in command:
        launcher_config = Path(command[command.index("--config_file") + 1])
        assert (ROOT / launcher_config).exists(), launcher_config
        processes = load_config_from_file(str(ROOT / launcher_config)).num_processes
        assert command[train_at - 2 : train_at] == ["-m", "mnist_dist"]
    else:
        assert command[train_at - 1] == "mnist-dist"
    config = build_config(build_parser().parse_args(command[train_at:]))
    config.train.per_device_batch_size(processes)  # the global batch must divide
    return config, processes


def test_there_are_single_process_and_accelerate_sweeps():
    launchers = {"launch" in yaml.safe_load(p.read_text())["command"] for p in SWEEPS}
    assert launchers == {True, False}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_trial_is_a_valid_train_command(path):
    sweep = yaml.safe_load(path.read_text())
    logged = namespaced("epoch", {key: 0 for _, key, _ in EPOCH_COLUMNS})
    assert sweep["metric"]["name"] in logged
    runs = trials(sweep)
    assert len(runs) == 27  # learning rate x milestones x batch size
    seen = set()
    for params in runs:
        config, _ = parse_trial(agent_command(sweep, params))
        assert config.tracking.tracker == "wandb"
        assert config.optim.lr == params["lr"]
        assert ",".join(map(str, config.optim.lr_milestones)) == params["lr-milestones"]
        assert config.train.global_batch_size == params["batch-size"]
        seen.add((config.optim.lr, config.optim.lr_milestones, config.train.global_batch_size))
    assert len(seen) == 27


@pytest.mark.parametrize(
    "params, message",
    [
        ({"lr-milestones": "8,5"}, "--lr-milestones must be increasing"),
        ({"batch-size": 100}, "not divisible by world size 8"),
        ({"learning-rate": 0.1}, "unrecognized arguments: --learning-rate=0.1"),
    ],
)
def test_the_check_catches_a_bad_sweep_value(params, message):
    sweep = yaml.safe_load((ROOT / "sweeps" / "lr_schedule_ddp.yaml").read_text())
    with pytest.raises(UsageError, match=message):
        parse_trial(agent_command(sweep, params))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_the_sweep_metric_is_a_field_of_the_records_a_run_logs(path):
    """W&B sees step records under train/ and epoch records under epoch/ (``namespaced``);
    a sweep's metric must be one of those fields, or the sweep optimises nothing."""
    metric = yaml.safe_load(path.read_text())["metric"]["name"]
    kinds = {"train": StepRecord, "epoch": EpochRecord}
    logged = {
        name
        for prefix, kind in kinds.items()
        for name in namespaced(prefix, {f.name: 0 for f in dataclasses.fields(kind)})
    }
    assert metric in logged
