"""The named fault points: every one is reached by a real run, and a name that is not a point
cannot be injected (so a renamed point cannot silently inject nothing)."""

from __future__ import annotations

import json

import pytest
from helpers import fault_env, run_cli

from mnist_dist import faults


def test_inject_refuses_a_name_that_is_not_a_point():
    with pytest.raises(KeyError, match=r"unknown fault point 'train\.stepp'"):
        faults.inject("train.stepp", lambda: None)


def test_nothing_fires_until_a_handler_is_installed_and_after_clear():
    calls = []
    faults.point("train.step")
    assert faults.value("train.loss", 1.5) == 1.5
    try:
        faults.inject("train.step", lambda **context: calls.append(context))
        faults.inject("train.loss", lambda loss: loss * 2)
        faults.point("train.step")
        assert faults.value("train.loss", 1.5) == 3.0
        with pytest.raises(KeyError, match=r"unknown fault point 'no\.such'"):
            faults.point("no.such")  # a product call by a wrong name, while faults are on
    finally:
        faults.clear()
    faults.point("train.step")
    assert calls == [{}] and faults.value("train.loss", 1.5) == 1.5


def test_every_point_is_reached_by_a_tiny_tracked_run(tiny_mnist, tmp_path):
    counts_file = tmp_path / "counts"
    netrc = tmp_path / "netrc"
    netrc.write_text("")  # no credentials: W&B records offline
    result = run_cli(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "r"),
        "--epochs", "1", "--batch-size", "32", "--grad-accum", "2", "--log-every", "2",
        "--tracker", "wandb",
        env={"NETRC": str(netrc), **fault_env(COUNT_POINTS=str(counts_file))},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = tmp_path.glob("counts.*")  # one process
    counts = json.loads(written.read_text())
    assert set(counts) == set(faults.POINTS)
    assert [name for name, n in counts.items() if n == 0] == []
    # 256 training images in batches of 32: 8 steps of 2 micro-batches; one epoch checkpoint.
    assert counts["train.step"] == 8 and counts["train.loss"] == 16
    assert counts["checkpoint.save_state"] == 1 and counts["wandb.finish"] == 1
    # W&B: a step record every 2nd step, the epoch record, the final figures.
    assert counts["wandb.log"] == 4 + 1 + 1
