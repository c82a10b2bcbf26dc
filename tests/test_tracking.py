"""What a run shows: the rich console on a terminal, plain lines elsewhere."""

import pytest
from helpers import launch_cli, run_cli, run_cli_in_terminal

from mnist_dist.tracking import format_epoch_line


def test_a_terminal_gets_a_progress_bar_and_an_epoch_table(tiny_mnist, tmp_path):
    code, screen = run_cli_in_terminal(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "r"),
        "--epochs", "2", "--batch-size", "32", "--log-every", "2",
    )  # fmt: skip
    assert code == 0, screen[-2000:]
    assert "\x1b[" in screen  # redrawn with terminal control sequences
    for header in ("epoch", "train loss", "test acc", "images/s"):
        assert header in screen
    assert "img/s" in screen and "/8" in screen  # the progress bar: steps done of 8
    assert "epoch 1/2  lr" not in screen  # no plain log lines on a terminal


def test_plain_epoch_line_has_every_figure():
    record = {
        "epoch": 3, "lr": 1e-5, "train_loss": 0.1234, "train_accuracy": 0.9876,
        "test_loss": 0.0456, "test_accuracy": 0.9912, "test_correct": 9912, "test_total": 10000,
        "epoch_seconds": 12.34, "images_per_second": 5678.9,
    }  # fmt: skip
    assert format_epoch_line(record, 10) == (
        "epoch 3/10  lr 1.0e-05  train_loss 0.1234  train_acc 98.76%  test_loss 0.0456  "
        "test_acc 99.12% (9912/10000)  12.3s  5,679 images/s"
    )


@pytest.mark.parametrize("launcher", ["1proc", "2proc"])
def test_wandb_records_exactly_one_offline_run(launcher, tiny_mnist, tmp_path):
    run = {"1proc": run_cli, "2proc": launch_cli}[launcher]
    out = tmp_path / "r"
    result = run(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", "--tracker", "wandb",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert len(list(runs[0].glob("run-*.wandb"))) == 1
    assert "warning: W&B tracking stopped" not in result.stdout + result.stderr
