"""The run in this process: build -> fit -> finish, stopped by the stop file between two ``fit``
calls and resumed, against the same run trained without a stop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from helpers import assert_bit_identical, make_tiny_mnist, read_jsonl, read_summary

from mnist_dist.cli import build_config, build_parser
from mnist_dist.determinism import set_determinism
from mnist_dist.distributed import make_accelerator
from mnist_dist.errors import Stopped
from mnist_dist.layout import RunLayout
from mnist_dist.rundir import claimed
from mnist_dist.stopping import StopControl
from mnist_dist.train import build, finish

STEPS_PER_EPOCH = 16  # 512 images, batch 32


def _args(data: Path, out: Path) -> list[str]:
    return [
        "--data-dir", str(data), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", "--log-every", "1",
    ]  # fmt: skip


def test_a_stop_between_two_fits_then_a_resume_gives_the_uninterrupted_weights(
    train_here, tmp_path
):
    data = make_tiny_mnist(tmp_path / "data", n_train=512)
    uninterrupted = tmp_path / "uninterrupted"
    train_here(*_args(data, uninterrupted))

    out = tmp_path / "run"
    layout = RunLayout(out)
    config = build_config(build_parser().parse_args(["train", *_args(data, out)]))
    accelerator = make_accelerator("no")
    try:
        with claimed(accelerator, layout) as holder:  # as train() holds the directory
            started, determinism = time.perf_counter(), set_determinism(True)
            run = build(accelerator, config, layout, holder, started, determinism)
            # The stop file checked at every step boundary (not every 0.5 s): the stop lands
            # at the first boundary after the request, whatever this machine's speed.
            run.stop = StopControl(accelerator, layout.stop, poll_seconds=0)
            with pytest.raises(Stopped) as stopped, run.status():
                run.fit(1)  # the first epoch, then a stop during the second
                layout.stop.write_text("")
                run.fit(2)
                finish(run, config)
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)

    state = run.state
    assert (state.epoch, state.step, state.global_step) == (2, 1, STEPS_PER_EPOCH + 1)
    newest = layout.checkpoints / state.name
    assert str(stopped.value).startswith(f"stop file {layout.stop}: stopped at epoch 2, step 1")
    assert str(newest) in str(stopped.value)
    assert json.loads(layout.status.read_text())["state"] == "stopped"
    assert not layout.stop.exists() and not layout.model.exists()

    summary = train_here(*_args(data, out))  # the same command: --resume auto
    assert_bit_identical(layout.model, RunLayout(uninterrupted).model)
    assert summary.to_dict() == read_summary(out)
    assert (summary.epochs_completed, summary.global_step) == (2, 2 * STEPS_PER_EPOCH)
    steps = [r["global_step"] for r in read_jsonl(layout.steps)]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # no step twice, none missing
    assert [r["epoch"] for r in read_jsonl(layout.metrics)] == [1, 2]
    assert json.loads(layout.status.read_text())["state"] == "finished"
