"""The command line end to end: evaluate, predict, and one-line errors with exit code 2.

Most commands run in this process (``run_here``); a few run ``python -m mnist_dist`` in a real
process, so that the module entry point and its exit codes are tested as a user meets them:
train (a complete run, and a missing dataset), evaluate and predict of the reference weights,
download into a wrong --data-dir."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import typing
from importlib import metadata

import pytest
import torch
from helpers import (
    ROOT,
    fault_env,
    file_size_limit,
    launch_cli,
    read_summary,
    run_cli,
    run_here,
    start_cli,
    wait_for_step,
)
from PIL import Image
from safetensors.torch import save_file

from mnist_dist import errors
from mnist_dist.cli import build_parser
from mnist_dist.config import SECTIONS
from mnist_dist.data import load_split
from mnist_dist.layout import CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATUS_FILE, STOP_FILE
from mnist_dist.weights import load_model


def assert_usage_error(result, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, naming what is wrong."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnist-dist: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def test_evaluate_reference_weights_scores_9917(mnist_dir, reference_weights):
    result = run_cli(
        "evaluate", "--weights", str(reference_weights), "--data-dir", str(mnist_dir), "--json"
    )
    assert result.returncode == 0, result.stderr
    [report] = result.json_lines()
    assert (report["test_correct"], report["test_total"]) == (9917, 10000)
    assert report["test_accuracy"] == pytest.approx(0.9917)
    assert report["world_size"] == 1


def test_evaluate_with_the_torchvision_loader_agrees(mnist_dir, reference_weights):
    result = run_here(
        "evaluate",
        "--weights",
        str(reference_weights),
        "--data-dir",
        str(mnist_dir),
        "--json",
        "--loader",
        "torchvision",
        "--num-workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.json_lines()[0]["test_correct"] == 9917


def test_predict_names_the_digits_of_real_test_images(mnist_dir, reference_weights, tmp_path):
    test = load_split(mnist_dir, train=False)
    paths, truth = [], []
    for i in range(8):
        path = tmp_path / f"digit{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(test.data[i].numpy()).save(path, quality=100)
        paths.append(str(path))
        truth.append(int(test.targets[i]))
    result = run_cli("predict", "--weights", str(reference_weights), *paths, "--json")
    assert result.returncode == 0, result.stderr
    predictions = result.json_lines()
    assert [p["digit"] for p in predictions] == truth
    assert all(0.5 < p["probability"] <= 1.0 for p in predictions)
    text = run_cli("predict", "--weights", str(reference_weights), paths[0])
    assert text.stdout.startswith(f"{paths[0]}: {truth[0]} (p=")


def test_predict_inverts_a_dark_digit_on_a_light_background_and_says_so(
    mnist_dir, reference_weights, tmp_path
):
    # A digit written on paper: the real test digits with their polarity reversed, and one
    # left as MNIST has it.
    test = load_split(mnist_dir, train=False)
    paths, truth = [], []
    for i in range(8):
        path = tmp_path / f"on-paper{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(255 - test.data[i].numpy()).save(path, quality=100)
        paths.append(str(path))
        truth.append(int(test.targets[i]))
    as_mnist = tmp_path / "as-mnist.png"
    Image.fromarray(test.data[8].numpy()).save(as_mnist)
    result = run_here("predict", "--weights", str(reference_weights), *paths, str(as_mnist))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [int(line.split(": ")[1].split(" ")[0]) for line in lines] == [
        *truth,
        int(test.targets[8]),
    ]
    note = ", read as a dark digit on a light background (inverted)"
    assert all(line.endswith(note) for line in lines[:-1])
    assert note not in lines[-1]
    as_json = run_here("predict", "--weights", str(reference_weights), paths[0], "--json")
    assert as_json.json_lines()[0]["inverted"] is True


def test_train_on_tiny_data_writes_a_complete_run_directory(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--data-dir",
        str(tiny_mnist),
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--log-every",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no library warnings for a user to wade through
    summary = read_summary(out)
    for key in (
        "test_accuracy",
        "test_correct",
        "test_total",
        "world_size",
        "mixed_precision",
        "epochs_completed",
        "global_step",
        "images_per_second",
        "run_wall_seconds",
        "segment_wall_seconds",
        "started_at",
    ):
        assert key in summary
    assert (summary["world_size"], summary["epochs_completed"]) == (1, 2)
    assert summary["run_wall_seconds"] == summary["segment_wall_seconds"]  # one process ran it
    assert result.stdout.startswith("mnist-dist: single process, device cpu, mixed precision no,")
    assert summary["global_step"] == 2 * 8 and summary["test_total"] == 128
    metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[-1]["test_accuracy"] == summary["test_accuracy"]
    config = (out / CONFIG_FILE).read_text()
    for key in ("torch:", "accelerate:", "git_commit:", "world_size: 1", "devices:"):
        assert key in config
    # The plain (non-terminal) console: one line per epoch, no progress bars. (A loaded machine
    # may also print a timed "epoch 1/2  step ..." progress line: not an epoch's line.)
    epoch_lines = [line for line in result.stdout.splitlines() if " train_loss " in line]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert "\r" not in result.stdout
    # The exported model rebuilds and evaluates from the file alone.
    evaluated = run_cli(
        "evaluate",
        "--weights",
        str(out / MODEL_FILE),
        "--data-dir",
        str(tiny_mnist),
        "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.json_lines()[0]["test_correct"] == summary["test_correct"]


TRAIN_HELP = "(see `mnist-dist train --help`)"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--epochs", "0"], ["--epochs must be > 0"]),
        (["train", "--epochs", "-3"], ["--epochs must be > 0"]),
        (["train", "--batch-size", "0"], ["--batch-size must be > 0"]),
        (["train", "--batch-size", "-64"], ["--batch-size must be > 0"]),
        (["train", "--grad-accum", "0"], ["--grad-accum"]),
        (["train", "--lr", "-1"], ["--lr must be > 0"]),
        (["train", "--lr-milestones", "8,5"], ["--lr-milestones must be increasing"]),
        (["train", "--max-train-samples", "0"], ["--max-train-samples"]),
        (["train", "--epochs", "ten"], ["--epochs", "invalid int value"]),
        (["train", "--mixed-precision", "fp8"], ["--mixed-precision", "invalid choice"]),
        (["train", "--bogus-flag"], ["unrecognized arguments: --bogus-flag", TRAIN_HELP]),
        # No prefix matching: `--epoch` is not silently `--epochs`.
        (["train", "--epoch", "1"], ["arguments: --epoch 1; did you mean --epochs?", TRAIN_HELP]),
        (["train", "--epoch=1"], ["arguments: --epoch=1; did you mean --epochs?", TRAIN_HELP]),
        (["train", "--batch_size", "32"], ["did you mean --batch-size?", TRAIN_HELP]),
        (
            ["train", "--max", "5"],
            ["did you mean one of --max-train-samples, --max-eval-samples?", TRAIN_HELP],
        ),
        (
            ["evaluate", "--weights", "w.pth", "--jsn"],
            ["unrecognized arguments: --jsn; did you mean --json?", "`mnist-dist evaluate --help`"],
        ),
        (
            ["evaluate", "--weights", "w.pth", "--max-train-samples", "5"],
            ["unrecognized arguments: --max-train-samples 5", "`mnist-dist evaluate --help`"],
        ),
        (["train", "--batch-size", "64", "--grad-accum", "3"], ["not divisible"]),
        (["train", "--mixed-precision", "fp16"], ["fp16 needs a CUDA GPU"]),
        (["train", "--config", "does-not-exist.yaml"], ["cannot read config file"]),
        (["train", "--wandb-mode", "sideways"], ["--wandb-mode", "invalid choice"]),
        (["train", "--tracker", "mlflow"], ["--tracker", "invalid choice"]),
        (["train", "--wandb-finish-timeout", "0"], ["--wandb-finish-timeout must be > 0"]),
        (["frobnicate"], ["invalid choice"]),
        (["trian"], ["invalid choice: 'trian'", "; did you mean train?"]),
        (["train", "--learning-rate", "0.1"], ["; did you mean --lr?", TRAIN_HELP]),
        (["train", "--mixed-precision", "bf61"], ["; did you mean bf16?", TRAIN_HELP]),
        (["evaluate"], ["--weights"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, fragments, tmp_path):
    assert_usage_error(
        run_here(*args, "--output-dir", str(tmp_path / "o"))
        if args[0] == "train"
        else run_here(*args),
        *fragments,
    )


def test_missing_dataset_is_one_line_naming_the_download_command(tmp_path):
    result = run_cli(
        "train", "--data-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")
    )
    assert_usage_error(result, "MNIST not found in", "mnist-dist download --data-dir")
    assert not (tmp_path / "o").exists()  # nothing is written before the data is verified


def test_truncated_idx_file_is_one_line(tiny_mnist, tmp_path):
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    result = run_here("train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "o"))
    assert_usage_error(result, "train-images-idx3-ubyte is truncated")


def test_output_dir_holding_a_run_is_never_overwritten(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS_FILE).write_text('{"epoch": 1}\n')
    result = run_here("train", "--data-dir", str(tiny_mnist), "--output-dir", str(out))
    assert_usage_error(result, "already holds a run")
    assert (out / METRICS_FILE).read_text() == '{"epoch": 1}\n'


def test_unwritable_output_dir_is_one_line(tiny_mnist, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be created under a file, not even by root
    result = run_here("train", "--data-dir", str(tiny_mnist), "--output-dir", str(blocker / "run"))
    assert_usage_error(result, "cannot write to output directory")


def _weights_cases(tmp_path, reference_weights):
    cases = {}
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(os.urandom(4096))
    cases["random.safetensors"] = (random_bytes, "is not a weights file: it is neither")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(reference_weights.read_bytes()[:5000])
    cases["truncated.pth"] = (
        truncated,
        "is a zip archive but not a readable torch state_dict: it is truncated or damaged "
        "(5,000 bytes, without the end-of-archive record that a complete file ends with)",
    )
    wrong_shape = tmp_path / "wrong_shape.pth"
    state = torch.load(reference_weights, map_location="cpu", weights_only=True)
    state["fc_layer1.0.weight"] = torch.zeros(64, 300)
    torch.save(state, wrong_shape)
    cases["wrong_shape.pth"] = (wrong_shape, "fc_layer1.0.weight has shape (64, 300)")
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, foreign)
    cases["foreign.pth"] = (foreign, "does not hold MNIST CNN weights: missing")
    pickled = tmp_path / "pickled.pth"
    torch.save({"fn": os.getcwd, "w": torch.zeros(1)}, pickled)
    cases["pickled.pth"] = (pickled, "refusing to unpickle")
    cases["missing.pth"] = (tmp_path / "missing.pth", "cannot read weights file")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "random.safetensors",
        "truncated.pth",
        "wrong_shape.pth",
        "foreign.pth",
        "pickled.pth",
        "missing.pth",
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_bad_weights_exit_2_with_one_line_naming_the_file(
    case, command, tmp_path, reference_weights, tiny_mnist
):
    path, fragment = _weights_cases(tmp_path, reference_weights)[case]
    extra = ["--data-dir", str(tiny_mnist)] if command == "evaluate" else [str(tmp_path / "x.png")]
    result = run_here(command, "--weights", str(path), *extra)
    assert_usage_error(result, str(path), fragment)


def test_predict_rejects_a_file_that_is_not_an_image(reference_weights, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    result = run_here("predict", "--weights", str(reference_weights), str(bogus))
    assert_usage_error(result, "cannot read image", str(bogus))


def _help(*command: str) -> str:
    """The help text of a command with its line wrapping undone."""
    result = run_here(*command, "--help")
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def _literal_choices(annotation: object) -> tuple | None:
    """The values of a ``Literal[...]`` or ``Literal[...] | None`` annotation."""
    for tp in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(tp) is typing.Literal:
            return typing.get_args(tp)
    return None


def test_help_shows_one_default_per_flag_and_the_choices_of_every_literal_setting():
    text = _help("train")
    assert "[default: None]" not in text and "(default" not in text
    assert (
        "--output-dir OUTPUT_DIR run directory; a run in it is resumed, never overwritten "
        "[default: runs/<timestamp>] " in text
    )
    assert (
        "--max-train-samples N use only the first N training images [default: all 60,000] --"
        in text
    )
    assert "--compile, --no-compile torch.compile" in text
    for flag in (
        "--loader {tensor,torchvision}",
        "--tracker {wandb,none}",
        "--mixed-precision {no,fp16,bf16}",
        "--wandb-mode {online,offline,disabled}",
    ):
        assert flag in text
    # Every setting whose type is a fixed set of values lists them, whatever is added later.
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            choices = _literal_choices(hints[f.name])
            if choices:
                assert "{" + ",".join(choices) + "} " in text, f.name
    # No flag of any command states its default twice, or states None.
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            help_text = action.help or ""
            assert help_text.count("[default:") <= 1, (name, action.dest)
            assert "(default" not in help_text and "None" not in help_text, (name, action.dest)


@pytest.mark.parametrize(
    "command", ["train", "doctor", "evaluate", "predict", "report", "download"]
)
def test_every_command_has_a_description(command):
    result = run_here(command, "--help")
    assert result.returncode == 0, result.stderr
    usage, description = result.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: mnist-dist {command}")
    assert not description.startswith(("positional arguments:", "options:")), description


def test_help_gives_the_whole_precedence_every_config_section_and_the_version():
    text = _help("train")
    precedence = "defaults (the reference recipe) < environment (the variables named in a flag's"
    assert precedence in text and "help) < --config file < flags." in text
    assert (
        f"--config FILE YAML or JSON file with a mapping per section ({', '.join(SECTIONS)})"
        in text
    )
    version = run_here("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"mnist-dist {metadata.version('mnist-dist')} (torch ")


def test_evaluate_help_lists_only_the_settings_evaluate_uses():
    text = _help("evaluate")
    for flag in ("--weights", "--data-dir", "--max-eval-samples", "--eval-batch-size"):
        assert flag + " " in text
    for flag in ("--max-train-samples", "--epochs", "--batch-size", "--lr", "--tracker"):
        assert flag + " " not in text


@pytest.mark.multiprocess
def test_launcher_failure_summary_ends_with_the_ranks_own_line(tiny_mnist, tmp_path):
    result = launch_cli(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "o"),
        "--batch-size", "3",
    )  # fmt: skip
    line = "mnist-dist: error: --batch-size 3 is not divisible by world size 2 x --grad-accum 1"
    assert result.returncode != 0  # the launcher's own status: 1 for a failed rank
    assert result.error_lines() == [line]  # printed once per node
    # The launcher's failure summary names each rank's own message, not a link to torch's
    # docs, and the root cause's message is its last line but the closing rule.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].strip("=") == "" and lines[-2] == f"  traceback : {line}"
    assert result.stderr.count(f"traceback : {line}") == 2  # rank 1 and rank 0
    assert "To enable traceback see" not in result.stderr


def _mnist_copy_with_damaged_training_images(mnist_dir, root, damage):
    """The real MNIST, but the training images cut short or gone."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(mnist_dir / "MNIST" / "raw" / name, raw / name)
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated":
        with open(mnist_dir / "MNIST" / "raw" / images.name, "rb") as f:
            images.write_bytes(f.read(1_000_000))
    return images


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_evaluate_needs_only_the_test_split(damage, mnist_dir, reference_weights, tmp_path):
    data = tmp_path / "data"
    images = _mnist_copy_with_damaged_training_images(mnist_dir, data, damage)
    result = run_here(
        "evaluate", "--weights", str(reference_weights), "--data-dir", str(data), "--json"
    )
    assert result.returncode == 0, result.stderr
    [report] = result.json_lines()
    assert (report["test_correct"], report["test_total"]) == (9917, 10000)
    # Training reads both splits: the same folder still fails, naming the file.
    train = run_here("train", "--data-dir", str(data), "--output-dir", str(tmp_path / "o"))
    expected = f"{images} is truncated" if damage == "truncated" else f"missing {images.name}"
    assert_usage_error(train, expected)


def _text(path, text="hello world, these are not weights\n"):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["notes.pth", "notes.safetensors", "notes.bin"])
def test_a_text_file_is_named_for_what_it_holds_not_for_its_name(name, tmp_path):
    path = _text(tmp_path / name)
    result = run_here("predict", "--weights", str(path), str(tmp_path / "x.png"))
    assert_usage_error(
        result,
        f"{path} is not a weights file: it is neither a PyTorch checkpoint (zip or pickle) nor "
        "safetensors (it starts with 'hello world,'...)",
    )


def test_an_empty_weights_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    result = run_here("predict", "--weights", str(path), str(tmp_path / "x.png"))
    assert_usage_error(result, f"{path} is not a weights file", "(it is empty)")


def test_a_truncated_safetensors_file_says_it_is_truncated(reference_weights, tmp_path):
    state = torch.load(reference_weights, map_location="cpu", weights_only=True)
    whole = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(whole))
    data = whole.read_bytes()
    for cut, words in ((5000, "its header describes"), (100, "its header alone announces")):
        path = tmp_path / f"cut-{cut}.safetensors"
        path.write_bytes(data[:cut])
        result = run_here("predict", "--weights", str(path), str(tmp_path / "x.png"))
        assert_usage_error(
            result,
            f"{path} is not a readable safetensors weights file: it is truncated: {cut} bytes, "
            f"{words}",
        )


@pytest.mark.parametrize("written_as", ["torch zip", "torch pickle", "safetensors"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_weights_load_whatever_their_name(written_as, suffix, reference_weights, tmp_path):
    state = torch.load(reference_weights, map_location="cpu", weights_only=True)
    path = tmp_path / f"weights{suffix}"
    if written_as == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=written_as == "torch zip")
    loaded = load_model(path).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].cpu()) for k in state)


def test_a_torch_state_dict_named_safetensors_evaluates(mnist_dir, reference_weights, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(reference_weights, path)
    result = run_here("evaluate", "--weights", str(path), "--data-dir", str(mnist_dir), "--json")
    assert result.returncode == 0, result.stderr
    assert result.json_lines()[0]["test_correct"] == 9917


@pytest.mark.parametrize("command", ["train", "evaluate", "download"])
@pytest.mark.parametrize("given", ["MNIST/raw", "MNIST"])
def test_data_dir_pointing_into_mnist_raw_names_the_right_one(
    command, given, tiny_mnist, reference_weights, tmp_path
):
    data_dir = str(tiny_mnist / given)
    extra = {
        "train": ["--output-dir", str(tmp_path / "o")],
        "evaluate": ["--weights", str(reference_weights)],
        "download": [],
    }[command]
    # download's one test through a real process (test_download runs it in this one).
    run = run_cli if command == "download" else run_here
    result = run(command, "--data-dir", data_dir, *extra)
    assert_usage_error(
        result,
        f"itself holds the MNIST files; pass the folder that contains MNIST/raw: "
        f"--data-dir {tiny_mnist}",
    )
    assert "mnist-dist download" not in result.stderr
    assert not (tiny_mnist / given / "MNIST").exists()  # nothing was downloaded into it


def readme_exit_codes() -> dict[int, str]:
    """The README's exit-code table: code -> meaning."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Errors and exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {
        int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)
    }


def test_the_readme_exit_code_table_lists_every_code_the_command_line_uses():
    used = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert set(readme_exit_codes()) == {0, *used}


def _tiny_train(tiny_mnist, out, *extra):
    return run_here(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", *extra,
    )  # fmt: skip


def _run_exit_case(case, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    if case == "finished":
        return _tiny_train(tiny_mnist, out)
    if case == "flag":
        return _tiny_train(tiny_mnist, out, "--epochs", "0")
    if case == "output directory":
        blocker = tmp_path / "a-file"  # no directory can be made under a file, even by root
        blocker.write_text("")
        return _tiny_train(tiny_mnist, blocker / "run")
    if case == "diverged":
        return _tiny_train(tiny_mnist, out, "--lr", "1e30")
    if case == "write failed":
        with file_size_limit(256):  # as a full disk fails the run's first record
            return _tiny_train(tiny_mnist, out)
    if case == "STOP":
        out.mkdir()
        (out / STOP_FILE).write_text("")
        return _tiny_train(tiny_mnist, out)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, code, meaning",
    [
        ("finished", 0, "finished"),
        ("flag", 2, "a flag or config value"),
        ("output directory", 2, "an output directory that cannot be created or written"),
        ("diverged", 3, "training diverged"),
        ("write failed", 4, "a write failed during the run: disk full"),
        ("STOP", 75, "the `STOP` file"),
    ],
)
def test_each_exit_code_is_what_the_readme_table_says(case, code, meaning, tiny_mnist, tmp_path):
    assert meaning in readme_exit_codes()[code]
    result = _run_exit_case(case, tiny_mnist, tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.multiprocess
def test_ctrl_c_under_accelerate_launch_exits_130_without_a_traceback(tiny_mnist, tmp_path):
    assert "what `accelerate launch` exits with after a Ctrl-C" in readme_exit_codes()[130]
    out = tmp_path / "run"
    started = start_cli(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "3",
        "--batch-size", "32", "--log-every", "1",
        launched=True, env=fault_env(STEP_SLEEP=0.05), workdir=tmp_path / "logs",
    )  # fmt: skip
    wait_for_step(out, 4, started)
    started.proc.send_signal(signal.SIGINT)  # what a Ctrl-C in its terminal sends it
    result = started.wait(timeout=120)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("mnist-dist: stopped:")]
    assert "signal SIGINT" in line
    status = json.loads((out / STATUS_FILE).read_text())
    assert (status["state"], status["exit_code"]) == ("stopped", 75)
