"""Training behaviour through the real entry point: schedule, precision, accumulation, accuracy."""

import math
import warnings
from functools import partial

import pytest
import torch
from helpers import fault_env, launch_cli, make_tiny_mnist, read_jsonl, read_summary, run_cli

from mnist_dist.config import OptimConfig, TrainConfig
from mnist_dist.engine import train_step
from mnist_dist.layout import CONFIG_FILE, METRICS_FILE, STEPS_FILE
from mnist_dist.schedule import build_schedule
from mnist_dist.train import build_model_and_optimizer

# Launch modes a run can be started in: plain python (1 process) and 2 gloo ranks.
LAUNCHERS = {"1proc": run_cli, "2proc": launch_cli}


def train(launcher: str, data_dir, out, *args: str):
    result = LAUNCHERS[launcher](
        "train", "--data-dir", str(data_dir), "--output-dir", str(out), *args
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def train_1proc(train_here):
    """``train("1proc", ...)`` in this process (no process start) for the tests that read
    only the files a run writes."""

    def run(data_dir, out, *args: str) -> None:
        train_here("--data-dir", str(data_dir), "--output-dir", str(out), *args)

    return run


@pytest.mark.dataset
@pytest.mark.parametrize("launcher", ["1proc", "2proc"])
def test_lr_is_stepped_once_per_epoch_on_every_world_size(
    launcher, mnist_dir, tmp_path, train_1proc
):
    # 10 epochs of 640 images: the reference schedule, cheaply.
    (train_1proc if launcher == "1proc" else partial(train, launcher))(
        mnist_dir,
        tmp_path / "r",
        "--max-train-samples",
        "640",
        "--max-eval-samples",
        "500",
    )
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "r" / METRICS_FILE)]
    expected = [1e-3] * 5 + [1e-5] * 3 + [1e-7] * 2
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert read_summary(tmp_path / "r")["world_size"] == (2 if launcher == "2proc" else 1)


def test_images_per_second_leaves_the_evaluation_out(tmp_path):
    # Every evaluation batch sleeps 2 s (a fault): that belongs to epoch_seconds, not to the
    # train_seconds that images/s divides by. Training 256 images takes a fraction of that.
    data = make_tiny_mnist(tmp_path / "data", n_train=256)
    result = run_cli(
        "train", "--data-dir", str(data), "--output-dir", str(tmp_path / "r"), "--epochs", "2",
        env=fault_env(EVAL_SLEEP=2),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(tmp_path / "r" / METRICS_FILE)
    assert len(records) == 2
    for r in records:
        assert 0 < r["train_seconds"] < 2.0
        assert r["epoch_seconds"] >= r["train_seconds"] + 2.0
        assert r["images_per_second"] == pytest.approx(256 / r["train_seconds"])
    summary = read_summary(tmp_path / "r")
    total = sum(r["train_seconds"] for r in records)
    assert summary["images_per_second"] == pytest.approx(512 / total)


@pytest.mark.dataset
def test_bf16_trains_on_cpu_with_a_finite_loss(mnist_dir, tmp_path, train_1proc):
    # 300 optimizer steps of 64 images under bf16 autocast.
    train_1proc(
        mnist_dir,
        tmp_path / "r",
        "--mixed-precision",
        "bf16",
        "--epochs",
        "1",
        "--max-train-samples",
        "19200",
        "--max-eval-samples",
        "2000",
        "--log-every",
        "25",
    )
    summary = read_summary(tmp_path / "r")
    assert (summary["mixed_precision"], summary["global_step"]) == ("bf16", 300)
    losses = [s["train_loss"] for s in read_jsonl(tmp_path / "r" / STEPS_FILE)]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert summary["test_accuracy"] > 0.9


@pytest.mark.dataset
def test_grad_accum_splits_a_step_without_changing_its_math(mnist_dir, tmp_path, train_1proc):
    args = (
        "--epochs",
        "1",
        "--max-train-samples",
        "3200",
        "--max-eval-samples",
        "1000",
        "--log-every",
        "5",
    )
    train_1proc(mnist_dir, tmp_path / "a1", *args)
    train_1proc(mnist_dir, tmp_path / "a4", *args, "--grad-accum", "4")
    one = [s["train_loss"] for s in read_jsonl(tmp_path / "a1" / STEPS_FILE)]
    four = [s["train_loss"] for s in read_jsonl(tmp_path / "a4" / STEPS_FILE)]
    # Same global batch, same samples: only float summation order differs.
    assert four == pytest.approx(one, rel=1e-4)
    assert read_summary(tmp_path / "a4")["global_step"] == 50


@pytest.mark.dataset
@pytest.mark.parametrize("option", ["--compile", "--no-channels-last"])
def test_speed_options_keep_the_math(option, mnist_dir, tmp_path, train_1proc):
    args = ("--epochs", "1", "--max-train-samples", "1600", "--max-eval-samples", "1000")
    args += ("--log-every", "5")
    train_1proc(mnist_dir, tmp_path / "default", *args)
    train_1proc(mnist_dir, tmp_path / "option", *args, option)
    default = [s["train_loss"] for s in read_jsonl(tmp_path / "default" / STEPS_FILE)]
    other = [s["train_loss"] for s in read_jsonl(tmp_path / "option" / STEPS_FILE)]
    # Other kernels, other float summation order; the same optimizer steps on the same batches.
    assert other == pytest.approx(default, rel=1e-3)
    config = (tmp_path / "option" / CONFIG_FILE).read_text()
    assert ("compile: true" if option == "--compile" else "channels_last: false") in config


@pytest.mark.dataset
def test_torchvision_loader_trains_the_same_batches(mnist_dir, tmp_path, train_1proc):
    args = (
        "--epochs",
        "1",
        "--max-train-samples",
        "1280",
        "--max-eval-samples",
        "1000",
        "--log-every",
        "5",
    )
    train_1proc(mnist_dir, tmp_path / "t", *args)
    train_1proc(mnist_dir, tmp_path / "v", *args, "--loader", "torchvision", "--num-workers", "1")
    tensor = [s["train_loss"] for s in read_jsonl(tmp_path / "t" / STEPS_FILE)]
    loader = [s["train_loss"] for s in read_jsonl(tmp_path / "v" / STEPS_FILE)]
    assert loader == pytest.approx(tensor, rel=1e-6)


@pytest.mark.dataset
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["1proc", "2proc"])
def test_full_reference_recipe_reaches_99_percent(launcher, mnist_dir, tmp_path):
    result = train(launcher, mnist_dir, tmp_path / "full")
    summary = read_summary(tmp_path / "full")
    assert summary["world_size"] == (2 if launcher == "2proc" else 1)
    assert (summary["epochs_completed"], summary["global_step"]) == (10, 10 * 938)
    assert summary["test_total"] == 10_000
    assert summary["test_accuracy"] >= 0.990, summary
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "full" / METRICS_FILE)]
    assert lrs == pytest.approx([1e-3] * 5 + [1e-5] * 3 + [1e-7] * 2, rel=1e-9)
    print(
        f"{launcher}: {summary['test_correct']}/10000, {summary['images_per_second']:.0f} img/s, "
        f"{summary['segment_wall_seconds']:.0f}s"
    )
    assert f"{summary['test_correct']}/10000" in result.stdout


@pytest.mark.parametrize("scaled", [True, False], ids=["fp16 grad scaler", "no scaler"])
def test_the_lr_scheduler_sees_the_optimizer_steps_without_a_warning(scaled, cpu_accelerator):
    # fp16's path steps through AcceleratedOptimizer.step and a GradScaler. Accelerate makes the
    # scaler for CUDA only, so it gets an enabled CPU one here, before prepare as in fp16 runs.
    if scaled:
        cpu_accelerator.scaler = torch.amp.GradScaler("cpu")
    model, optimizer = build_model_and_optimizer(cpu_accelerator, TrainConfig(), lr=1e-3)
    assert (optimizer.scaler is not None) == scaled
    scheduler = build_schedule(optimizer, OptimConfig(lr_milestones=(1,), lr_gamma=0.1))
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # an "epoch", then the scheduler's step at its end
            train_step(model, optimizer, cpu_accelerator, images, labels, 8, grad_accum=1)
        scheduler.step()
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # it still drives the LR
