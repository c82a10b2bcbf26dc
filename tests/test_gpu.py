"""The GPU path: the captured step against the eager one, bit-exact reruns and resumes, fp16 and
evaluation on CUDA. Marked ``gpu`` (``pytest -m gpu``); skipped where no CUDA GPU is visible.

Every run here sees the GPUs (``gpu_env``), where the rest of the suite hides them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import assert_bit_identical, gpu_env, read_jsonl, read_summary, run_cli

from mnist_dist.layout import CHECKPOINTS_DIR, METRICS_FILE, MODEL_FILE, STEPS_FILE

pytestmark = pytest.mark.gpu

# Two epochs of 16,000 images (250 steps each): long enough for a non-deterministic kernel to
# show (0.13 apart on an H200 without the deterministic settings), short on a GPU.
REPRO = ("--epochs", "2", "--max-train-samples", "16000", "--max-eval-samples", "2000")
CHECKPOINTED = ("--checkpoint-every", "300", "--keep-checkpoints", "5")  # step 300: epoch 2
MID_EPOCH = "epoch-002-step-000050"  # global step 300 = 250 + 50


def train(data: Path, out: Path, *args: str):
    return run_cli(
        "train", "--data-dir", str(data), "--output-dir", str(out), "--tracker", "none", *args,
        env=gpu_env(),
    )  # fmt: skip


def trained(data: Path, out: Path, *args: str) -> dict:
    """Train and return the summary; the run must succeed."""
    result = train(data, out, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_summary(out)


def step_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_jsonl(run_dir / STEPS_FILE)]


def epoch_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_jsonl(run_dir / METRICS_FILE)]


def test_captured_step_masks_the_short_last_batch_like_the_eager_step(mnist_dir, tmp_path):
    # 96 images: a full batch of 64, then a short one of 32 that the captured step pads to 64
    # with weight 0. Two steps, so fp32 rounding (different kernels for 32 and 64 images)
    # cannot grow: the losses agree to 1e-5. Padding that counted would change the second
    # step's loss by far more: the 32 padded images' loss, or a mean over 64 instead of 32.
    args = ("--epochs", "1", "--max-train-samples", "96", "--log-every", "1")
    captured = trained(mnist_dir, tmp_path / "captured", *args)
    eager = trained(mnist_dir, tmp_path / "eager", *args, "--cuda-graph", "off")
    assert (captured["step_engine"], eager["step_engine"]) == ("cuda-graph", "eager")
    a, b = step_losses(tmp_path / "captured"), step_losses(tmp_path / "eager")
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, rel=1e-5)
    assert epoch_losses(tmp_path / "captured") == pytest.approx(
        epoch_losses(tmp_path / "eager"), rel=1e-5
    )


def test_captured_and_eager_training_agree_over_epochs(mnist_dir, tmp_path):
    # 6,432 images: 100 full batches and a short one of 32, twice. The two engines do the same
    # math in a different order of fp32 roundings, which training amplifies step by step:
    # epoch 1's mean loss agrees to 1e-4, epoch 2's to 1e-3 (as 1 and 2 processes do on the
    # CPU, test_distributed.py); another seed is further apart than that.
    args = ("--epochs", "2", "--max-train-samples", "6432", "--max-eval-samples", "2000")
    captured = trained(mnist_dir, tmp_path / "captured", *args)
    eager = trained(mnist_dir, tmp_path / "eager", *args, "--cuda-graph", "off")
    assert (captured["step_engine"], eager["step_engine"]) == ("cuda-graph", "eager")
    a, b = epoch_losses(tmp_path / "captured"), epoch_losses(tmp_path / "eager")
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    assert a[1] == pytest.approx(b[1], rel=1e-3)
    assert abs(captured["test_correct"] - eager["test_correct"]) <= 10  # of 2,000


@pytest.fixture(scope="module")
def first_run(mnist_dir, tmp_path_factory) -> Path:
    """An uninterrupted short run with the defaults (captured, deterministic)."""
    out = tmp_path_factory.mktemp("first") / "run"
    summary = trained(mnist_dir, out, *REPRO)
    assert (summary["step_engine"], summary["deterministic"]) == ("cuda-graph", True)
    return out


def test_the_same_run_twice_gives_bit_identical_weights(mnist_dir, first_run, tmp_path):
    trained(mnist_dir, tmp_path / "rerun", *REPRO)
    assert_bit_identical(tmp_path / "rerun" / MODEL_FILE, first_run / MODEL_FILE)


def test_a_mid_epoch_resume_gives_bit_identical_weights(mnist_dir, first_run, tmp_path):
    # Checkpointing inside epoch 2 changes nothing, and a new process resumed from that
    # checkpoint (its restored optimizer captured anew) ends where the uninterrupted run did.
    checkpointed = tmp_path / "checkpointed"
    trained(mnist_dir, checkpointed, *REPRO, *CHECKPOINTED)
    checkpoint = checkpointed / CHECKPOINTS_DIR / MID_EPOCH
    assert checkpoint.is_dir(), sorted(p.name for p in checkpoint.parent.iterdir())
    resumed = tmp_path / "resumed"
    result = train(mnist_dir, resumed, *REPRO, *CHECKPOINTED, "--resume", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    # It did resume there (the weights alone could not tell: a fresh run ends the same).
    assert f"resumed from {checkpoint}" in result.stdout and "epoch 2, step 50" in result.stdout
    assert read_summary(resumed)["step_engine"] == "cuda-graph"
    for run in (checkpointed, resumed):
        assert_bit_identical(run / MODEL_FILE, first_run / MODEL_FILE)


def test_fp16_trains_with_its_grad_scaler_and_names_its_engine(mnist_dir, tmp_path):
    args = ("--epochs", "1", "--max-train-samples", "6432", "--max-eval-samples", "2000")
    summary = trained(mnist_dir, tmp_path / "fp16", "--mixed-precision", "fp16", *args)
    assert summary["mixed_precision"] == "fp16"
    assert summary["step_engine"] in ("cuda-graph", "eager")
    assert math.isfinite(summary["train_loss"])
    assert summary["test_accuracy"] > 0.7  # 101 steps: 86% in fp32 (on a CPU)


def test_evaluate_reference_weights_on_cuda_scores_9917(mnist_dir, reference_weights):
    result = run_cli(
        "evaluate", "--weights", str(reference_weights), "--data-dir", str(mnist_dir), "--json",
        env=gpu_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [report] = result.json_lines()
    assert (report["test_correct"], report["test_total"]) == (9917, 10000)
