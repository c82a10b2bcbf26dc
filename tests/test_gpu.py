"""The GPU path: the captured step against the eager one, bit-exact reruns and resumes, fp16,
the options that must still capture, the LR schedule and the NaN guard under capture, and
evaluation on CUDA. Marked ``gpu`` (``pytest -m gpu``); skipped where no CUDA GPU is visible.

Every run here sees the GPUs (``gpu_env``), where the rest of the suite hides them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, fault_env, gpu_env, read_jsonl, read_summary, run_cli

from mnist_dist.data import Sharding, TensorTrainData
from mnist_dist.engine import CapturedStep, StepFigures, lr_value
from mnist_dist.errors import EXIT_DIVERGED
from mnist_dist.layout import CHECKPOINTS_DIR, METRICS_FILE, MODEL_FILE, STEPS_FILE
from mnist_dist.model import MnistCNN

pytestmark = pytest.mark.gpu

# Two epochs of 16,000 images (250 steps each): long enough for a non-deterministic kernel to
# show (0.13 apart on an H200 without the deterministic settings), short on a GPU.
REPRO = ("--epochs", "2", "--max-train-samples", "16000", "--max-eval-samples", "2000")
CHECKPOINTED = ("--checkpoint-every", "300", "--keep-checkpoints", "5")  # step 300: epoch 2
MID_EPOCH = "epoch-002-step-000050"  # global step 300 = 250 + 50


def train(data: Path, out: Path, *args: str, env: dict[str, str] | None = None):
    return run_cli(
        "train", "--data-dir", str(data), "--output-dir", str(out), "--tracker", "none", *args,
        env={**gpu_env(), **(env or {})},
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


@pytest.mark.parametrize("num_samples", [40, 96])
def test_captured_step_trains_short_epochs_like_the_eager_step(num_samples, mnist_dir, tmp_path):
    # 96 images: a full batch of 64, then a short one of 32 with a graph of its own; 40: one
    # short step. Fewer steps than the warm-up takes: its steps must stay inside the epoch (an
    # index out of range is a device-side assert on CUDA). Two steps at most, so fp32 rounding
    # cannot grow: the losses agree to 1e-5; a wrong batch or mean is far more.
    args = ("--epochs", "1", "--max-train-samples", str(num_samples), "--log-every", "1")
    captured = trained(mnist_dir, tmp_path / "captured", *args)
    eager = trained(mnist_dir, tmp_path / "eager", *args, "--cuda-graph", "off")
    assert (captured["step_engine"], eager["step_engine"]) == ("cuda-graph", "eager")
    a, b = step_losses(tmp_path / "captured"), step_losses(tmp_path / "eager")
    assert len(a) == len(b) == -(-num_samples // 64)
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


def test_the_same_run_without_determinism_still_captures(mnist_dir, tmp_path):
    summary = trained(mnist_dir, tmp_path / "nondet", *REPRO, "--no-deterministic")
    assert (summary["step_engine"], summary["deterministic"]) == ("cuda-graph", False)
    assert math.isfinite(summary["train_loss"]) and summary["test_accuracy"] > 0.9


@pytest.mark.parametrize("flag", ["--compile", "--grad-accum"])
def test_compile_and_grad_accum_capture_and_train_like_their_eager_runs(flag, mnist_dir, tmp_path):
    # 6,432 images: 100 full batches and a short one; the eager run of the same options is
    # the reference (as in the test above: epoch 1's mean loss to 1e-4).
    args = ("--epochs", "1", "--max-train-samples", "6432", "--max-eval-samples", "2000")
    args = (*args, flag, *(["2"] if flag == "--grad-accum" else []))
    captured = trained(mnist_dir, tmp_path / "captured", *args)
    eager = trained(mnist_dir, tmp_path / "eager", *args, "--cuda-graph", "off")
    assert (captured["step_engine"], eager["step_engine"]) == ("cuda-graph", "eager")
    a, b = epoch_losses(tmp_path / "captured"), epoch_losses(tmp_path / "eager")
    assert a[0] == pytest.approx(b[0], rel=1e-4)


def test_the_captured_step_reads_each_milestones_lr_from_the_device():
    """The graph reads the LR from its device tensor at every replay: MultiStepLR must fill
    that tensor in place. Read back from the optimizer after each milestone, the LR is the
    schedule's; an LR of 0 leaves the weights exactly as they were, over a whole epoch of
    replays (a graph that kept reading the old LR would move them)."""
    from torch.optim.lr_scheduler import MultiStepLR

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(200, 1, 28, 28, generator=generator).to(device)
    labels = torch.randint(0, 10, (200,), generator=generator).to(device)
    sharding = Sharding(200, 64, 1, 0, seed=0)  # 3 full steps and a short one
    torch.manual_seed(0)
    model = MnistCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    stats = StepFigures(sharding.steps_per_epoch, device)
    engine = CapturedStep(
        model, optimizer, None, TensorTrainData(images, labels, sharding), stats, 1
    )
    assert engine.capture() is None  # it returns a failure it could recover from
    assert sorted(engine.graphs) == [8, 64]
    lr = optimizer.param_groups[0]["lr"]
    scheduler = MultiStepLR(optimizer, milestones=[1, 2, 3], gamma=0.1)
    expected = [1e-3, 1e-4, 1e-5]
    for epoch, want in enumerate(expected, 1):
        assert optimizer.param_groups[0]["lr"] is lr  # the tensor the graphs read
        assert lr_value(lr) == pytest.approx(want, rel=1e-6)
        assert lr_value(lr) == pytest.approx(lr_value(scheduler.get_last_lr()[0]), rel=1e-6)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in engine.run_epoch(epoch, 0):
            pass
        assert not any(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))
        scheduler.step()
    zero = MultiStepLR(optimizer, milestones=[1], gamma=0.0)
    zero.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr_value(lr) == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    for _ in engine.run_epoch(4, 0):
        pass
    assert all(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.isfinite(stats.values[:, 0]).all()


def test_the_nan_guard_stops_a_captured_run_with_the_usual_message(mnist_dir, tmp_path):
    # 640 images: 10 steps per epoch; forward pass 13 (epoch 2, step 3) returns NaN, injected
    # through the captured step's device counter of forward passes.
    args = ("--epochs", "2", "--max-train-samples", "640", "--max-eval-samples", "1000")
    out = tmp_path / "nan"
    result = train(mnist_dir, out, *args, env=fault_env(NAN_AT_STEP=13))
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    assert "step engine: cuda-graph" in result.stdout
    [line] = result.error_lines()
    assert "non-finite training loss at epoch 2, step 3 (global step 13)" in line


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
    assert summary["step_engine"] == "cuda-graph"  # a failed fp16 capture must not pass
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
