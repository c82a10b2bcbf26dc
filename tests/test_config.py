import dataclasses
import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from helpers import ACCELERATE_CONFIGS, run_here

from mnist_dist.cli import build_config, build_parser
from mnist_dist.config import (
    RESUMABLE_SETTINGS,
    SECTIONS,
    Config,
    changed_math_settings,
)
from mnist_dist.errors import UsageError
from mnist_dist.layout import CONFIG_FILE


def parse(*argv: str) -> Config:
    return build_config(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_reference_recipe(monkeypatch):
    monkeypatch.delenv("MNIST_DIST_DATA_DIR", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    c = parse()
    assert (c.optim.lr, c.optim.lr_milestones, c.optim.lr_gamma) == (1e-3, (5, 8), 0.01)
    assert (c.train.epochs, c.train.global_batch_size, c.train.grad_accum) == (10, 64, 1)
    assert c.train.mixed_precision == "no"
    assert c.data.data_dir == "./data" and c.data.loader == "tensor"


def test_flags_beat_file_beat_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIST_DATA_DIR", "/from/env")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert parse().data.data_dir == "/from/env"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"data_dir": "/from/file"}, "train": {"epochs": 3}}))
    c = parse("--config", str(cfg))
    assert (c.data.data_dir, c.train.epochs) == ("/from/file", 3)
    c = parse("--config", str(cfg), "--epochs", "4", "--data-dir", "/from/flag")
    assert (c.data.data_dir, c.train.epochs) == ("/from/flag", 4)


def test_json_config_and_milestone_spellings(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"optim": {"lr": 0.01, "lr_milestones": [2, 4]}}))
    c = parse("--config", str(cfg))
    assert (c.optim.lr, c.optim.lr_milestones) == (0.01, (2, 4))
    assert parse("--lr-milestones", "3,7").optim.lr_milestones == (3, 7)
    assert parse("--lr-milestones", "3", "7").optim.lr_milestones == (3, 7)


def test_a_runs_own_config_yaml_feeds_back(tmp_path):
    c = parse("--epochs", "2", "--batch-size", "128")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({**c.to_dict(), "provenance": {"world_size": 2}}))
    assert parse("--config", str(saved)) == c


def test_launcher_precision_is_a_default_that_flags_override(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse().train.mixed_precision == "bf16"
    assert parse("--mixed-precision", "no").train.mixed_precision == "no"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": {"epochs": "ten"}}, "invalid value 'ten' for train.epochs"),
        ({"train": {"global_batch_size": 6.4}}, "invalid value 6.4 for train.global_batch_size"),
        ({"train": {"epochz": 3}}, "unknown key(s) ['epochz']"),
        ({"model": {}}, "unknown section(s) ['model']"),
        ({"train": {"mixed_precision": "fp8"}}, "for train.mixed_precision"),
        # YAML keys may be numbers: listed, not compared with the strings
        ({"train": {1: 2, "zeta": 1}}, "unknown key(s) [1, 'zeta']"),
        ({1: {}, "zeta": {}}, "unknown section(s) [1, 'zeta']"),
        # an integer no float can hold
        ({"optim": {"lr": 10**400}}, "for optim.lr (expected float)"),
    ],
)
def test_bad_config_files_are_usage_errors(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(content))
    with pytest.raises(UsageError) as info:
        parse("--config", str(cfg))
    assert message in str(info.value)


def test_batch_must_divide_across_processes_and_micro_batches():
    c = parse("--batch-size", "64", "--grad-accum", "2")
    assert c.train.per_device_batch_size(2) == 32
    with pytest.raises(UsageError, match="not divisible by world size 3"):
        c.train.per_device_batch_size(3)


def test_every_shipped_accelerate_config_loads_and_holds_hardware_only():
    files = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "cpu",
        "cpu_ddp",
        "single_gpu",
        "multi_gpu",
        "multi_gpu_bf16",
        "multi_gpu_fp16",
        "multi_node",
    } <= names
    hyperparameters = {"lr", "epochs", "batch_size", "seed", "learning_rate"}
    for f in files:
        cfg = load_config_from_file(str(f))  # Accelerate's own loader
        assert cfg.num_processes >= 1, f.name
        assert not hyperparameters & set(yaml.safe_load(f.read_text())), f.name
    cpu_ddp = load_config_from_file(str(ACCELERATE_CONFIGS / "cpu_ddp.yaml"))
    # MULTI_CPU would start one process (see the file's comment); MULTI_GPU + cpu=True forms 2.
    assert (cpu_ddp.distributed_type.value, cpu_ddp.num_processes) == ("MULTI_GPU", 2)
    assert (
        load_config_from_file(str(ACCELERATE_CONFIGS / "multi_gpu_bf16.yaml")).mixed_precision
        == "bf16"
    )


def test_parser_rejects_unknown_flags_as_usage_error():
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        build_parser().parse_args(["train", "--bogus"])


WANDB_ENV = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS")


def test_tracking_defaults_then_wandb_environment_then_file_then_flags(tmp_path, monkeypatch):
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    t = parse().tracking
    assert (t.tracker, t.wandb_project, t.wandb_mode, t.wandb_tags) == (
        "none",
        "mnist-dist",
        None,
        (),
    )
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_TAGS", "a, b")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    t = parse().tracking
    assert (t.wandb_project, t.wandb_tags, t.wandb_group) == (
        "env-project",
        ("a", "b"),
        "env-group",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"tracking": {"wandb_project": "file-project", "wandb_tags": ["x"]}})
    )
    t = parse("--config", str(cfg)).tracking
    assert (t.wandb_project, t.wandb_tags, t.wandb_group) == ("file-project", ("x",), "env-group")
    t = parse(
        "--config", str(cfg), "--wandb-project", "flag-project", "--wandb-tags", "p,q",
        "--tracker", "wandb", "--wandb-mode", "offline", "--run-name", "n1",
    ).tracking  # fmt: skip
    assert (t.wandb_project, t.wandb_tags, t.tracker) == ("flag-project", ("p", "q"), "wandb")
    assert (t.wandb_mode, t.run_name) == ("offline", "n1")
    assert parse("--wandb-tags", "p", "q").tracking.wandb_tags == ("p", "q")


def test_tracker_is_a_tracking_setting_and_tags_survive_config_yaml(tmp_path):
    c = parse("--tracker", "wandb", "--wandb-tags", "a,b", "--epochs", "3")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(c.to_dict()))  # tuples would not be safe YAML
    assert yaml.safe_load(saved.read_text())["tracking"]["wandb_tags"] == ["a", "b"]
    assert parse("--config", str(saved)) == c
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"tracker": "wandb"}}))
    with pytest.raises(UsageError, match=r"unknown key\(s\) \['tracker'\] in section 'train'"):
        parse("--config", str(bad))


@pytest.mark.parametrize(
    "name, text, position, problem",
    [
        ("flow.yaml", "train:\n  epochs: 3\n  seed: [1, 2\n", "line 4, column 1", "expected ','"),
        (
            "indent.yaml",
            "train:\n  epochs: 3\n bad: x\n",
            "line 3, column 2",
            "expected <block end>",
        ),
        ("tab.yaml", "train: {epochs: 3}\n\tseed: 1\n", "line 2, column 1", "'\\t'"),
        ("control.yaml", 'train:\n  epochs: "x\x01"\n', "line 2, column 13", "#x0001"),
        ("comma.json", '{"train": {\n  "epochs": 3,\n}}', "line 3, column 1", "Expecting"),
    ],
)
def test_invalid_config_file_names_file_line_and_column(tmp_path, name, text, position, problem):
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(UsageError) as info:
        parse("--config", str(cfg))
    message = str(info.value)
    assert message.startswith(f"config file {cfg}, {position}: not valid ")
    assert problem in message and "\n" not in message


def test_config_file_that_is_not_text_is_a_usage_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        parse("--config", str(cfg))


def test_empty_environment_variables_count_as_unset(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for name in ("MNIST_DIST_DATA_DIR", *WANDB_ENV):
        monkeypatch.setenv(name, "")
    c = parse()
    assert c.data.data_dir == "./data"
    t = c.tracking
    assert (t.wandb_project, t.wandb_entity, t.run_name, t.wandb_group, t.wandb_tags) == (
        "mnist-dist", None, None, None, (),
    )  # fmt: skip


def test_settings_that_change_the_math_are_all_but_the_resumable_ones():
    fields = {(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert RESUMABLE_SETTINGS.issubset(fields)  # no misspelt name lets a setting through
    run = parse().to_dict()
    this = parse(
        "--seed", "3", "--max-train-samples", "100", "--no-channels-last", "--lr-milestones", "4",
        "--log-every", "7", "--tracker", "wandb", "--epochs", "20", "--num-workers", "0",
    ).to_dict()  # fmt: skip
    assert changed_math_settings(run, this) == [
        ("--max-train-samples all", "--max-train-samples 100"),
        ("--lr-milestones 5,8", "--lr-milestones 4"),
        ("--seed 0", "--seed 3"),
        ("--channels-last", "--no-channels-last"),
    ]
    del run["train"]["seed"]  # a run recorded before the setting existed: not compared
    assert ("--seed 0", "--seed 3") not in changed_math_settings(run, this)


def test_a_config_file_reads_as_people_write_it_and_the_runs_config_yaml_round_trips(
    tiny_mnist, tmp_path
):
    # YAML 1.1 (PyYAML's) reads `1e-3` as a string and `no`/`off` as false; here they mean
    # what they say, through the real command and into the run's own config.yaml.
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "optim:\n  lr: 1e-3\n  lr_gamma: 1E-2\n  lr_milestones: [1]\n"
        "train:\n  epochs: 1\n  mixed_precision: no\n  channels_last: off\n"
        "tracking:\n  wandb_tags: [on, yes, 'no']\n"
    )
    out = tmp_path / "run"
    result = run_here(
        "train", "--config", str(cfg), "--data-dir", str(tiny_mnist), "--output-dir", str(out)
    )
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert (saved["optim"]["lr"], saved["optim"]["lr_gamma"]) == (0.001, 0.01)
    assert (saved["train"]["mixed_precision"], saved["train"]["channels_last"]) == ("no", False)
    assert saved["tracking"]["wandb_tags"] == ["on", "yes", "no"]
    # The run's config.yaml, fed back, gives the same settings (an LR of 1e-7 included).
    again = parse("--config", str(out / CONFIG_FILE))
    assert again.to_dict() == {k: v for k, v in saved.items() if k != "provenance"}
    tiny_lr = tmp_path / "tiny-lr.yaml"
    tiny_lr.write_text(yaml.safe_dump({**again.to_dict(), "optim": {"lr": 1e-7}}))
    assert parse("--config", str(tiny_lr)).optim.lr == 1e-7


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: two\n", "invalid value 'two' for train.epochs (expected int)"),
        ("train:\n  epochs: 0\n", "train.epochs must be > 0, got 0"),
        ("optim:\n  lr_gamma: -1\n", "optim.lr_gamma must be > 0"),
        (
            "train:\n  batch_size: 32\n  epcohs: 2\n  lr: 0.1\n",
            "unknown key(s) ['batch_size', 'epcohs', 'lr'] in section 'train' (batch_size: did "
            "you mean global_batch_size?; epcohs: did you mean epochs?; lr belongs in section "
            "'optim')",
        ),
        ("optim:\n  learning_rate: 0.1\n", "(learning_rate: did you mean lr?)"),
        ("training:\n  epochs: 2\n", "(training: did you mean train?)"),
    ],
)
def test_config_file_errors_name_the_file_and_its_key(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    result = run_here("train", "--config", str(cfg), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"mnist-dist: error: config file {cfg}")
    assert message in line
    assert "--" not in line  # no flag the user never passed


def test_a_flag_still_overrides_a_bad_value_in_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epochs: 0\n")
    assert parse("--config", str(cfg), "--epochs", "2").train.epochs == 2
