"""The step engines: the captured step's math against the eager step, the engine choice and
its fallback after a failed capture, and the deterministic settings."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from helpers import assert_bit_identical, read_summary, run_here

from mnist_dist import faults
from mnist_dist.data import Sharding, TensorTrainData
from mnist_dist.determinism import CUBLAS_WORKSPACE_ENV, set_determinism
from mnist_dist.engine import CapturedStep, EagerStep, StepFigures
from mnist_dist.layout import CONFIG_FILE, MODEL_FILE
from mnist_dist.model import MnistCNN


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _engine_run(
    engine_cls: type, data: TensorTrainData, epochs: int, accelerator, grad_accum: int = 2
) -> tuple[list, list]:
    """Train ``epochs`` epochs with a fresh model and optimizer through ``engine_cls``."""
    torch.manual_seed(0)
    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    stats = StepFigures(data.sharding.steps_per_epoch, torch.device("cpu"))
    if engine_cls is CapturedStep:
        engine = CapturedStep(model, optimizer, None, data, stats, grad_accum)
    else:
        engine = EagerStep(model, optimizer, accelerator, data, stats, grad_accum)
    figures = []
    for epoch in range(1, epochs + 1):
        for _ in engine.run_epoch(epoch, 0):
            pass
        figures.append(stats.values.clone())
    return [p.detach().clone() for p in model.parameters()], figures


# Epochs of 1 step (a short one), 2 steps (full, short), 4 steps (3 full, short) and 3 full
# steps, at batch 64.
EPOCH_SHAPES = [(40, 1), (96, 2), (200, 2), (192, 1), (200, 1), (96, 4)]


@pytest.mark.parametrize(("num_samples", "grad_accum"), EPOCH_SHAPES)
def test_the_captured_steps_math_run_eagerly_trains_bit_identically_to_the_eager_step(
    num_samples, grad_accum, cpu_accelerator
):
    """Everything a CUDA graph records, run without a graph: the epoch's order in a device
    buffer, the device step counter, a step per batch size (the short last batch has its own),
    Adam with a tensor LR and ``capturable``, the figures written at the counter's row. It is
    the eager step's math, bit for bit, in weights and figures.

    Not covered here: fused Adam on the CPU reads a tensor LR as a number on the host, so the
    device-side read of the LR that a CUDA replay does is not exercised on the CPU (the GPU
    tests check the LR after each milestone, read back from the optimizer)."""
    images, labels = _batch(num_samples, seed=3)
    data = TensorTrainData(images, labels, Sharding(num_samples, 64, 1, 0, seed=0))
    eager_weights, eager_figures = _engine_run(EagerStep, data, 2, cpu_accelerator, grad_accum)
    static_weights, static_figures = _engine_run(CapturedStep, data, 2, cpu_accelerator, grad_accum)
    for eager, static in zip(eager_figures, static_figures, strict=True):
        assert static.equal(eager)
    for eager, static in zip(eager_weights, static_weights, strict=True):
        assert static.equal(eager)


def test_the_step_figures_are_written_without_an_indexed_write_or_a_sort():
    """Under deterministic algorithms an indexed write (``index_copy_``, ``index_put_``) becomes
    a sort on CUDA; the figures' write is two element-wise ops, and a non-finite figure stays
    in its row."""
    from torch.profiler import ProfilerActivity, profile

    stats = StepFigures(5, torch.device("cpu"))
    position, figures = torch.tensor([3]), torch.tensor([float("nan"), 7.0])
    set_determinism(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stats.write(position, figures)
    finally:
        set_determinism(False)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert ops == ["aten::eq", "aten::where"]
    assert torch.isnan(stats.values[3, 0]) and stats.values[3, 1] == 7.0
    assert stats.values[[0, 1, 2, 4]].eq(0).all()


def test_deterministic_settings_are_applied():
    saved = os.environ.pop(CUBLAS_WORKSPACE_ENV, None)
    try:
        assert set_determinism(True) == {"deterministic": True, CUBLAS_WORKSPACE_ENV: ":4096:8"}
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
        assert set_determinism(False)["deterministic"] is False
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        set_determinism(False)
        torch.backends.cudnn.benchmark = False
        if saved is None:
            os.environ.pop(CUBLAS_WORKSPACE_ENV, None)
        else:
            os.environ[CUBLAS_WORKSPACE_ENV] = saved


def _train(tmp_path, tiny_mnist, name: str, *flags: str):
    out = tmp_path / name
    result = run_here(
        "train", "--data-dir", str(tiny_mnist), "--epochs", "2", "--batch-size", "48",
        "--output-dir", str(out), *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result


def test_auto_trains_eagerly_on_the_cpu_and_records_the_engine_and_determinism(
    tmp_path, tiny_mnist
):
    out, result = _train(tmp_path, tiny_mnist, "auto")
    assert "warning" not in result.stdout + result.stderr
    assert "step engine: eager (no CUDA device); deterministic algorithms on" in result.stdout
    summary = read_summary(out)
    assert summary["step_engine"] == "eager" and summary["deterministic"] is True
    config = (out / CONFIG_FILE).read_text()
    assert "deterministic: true" in config and "step_engine: eager" in config

    out, result = _train(tmp_path, tiny_mnist, "nondet", "--no-deterministic")
    assert read_summary(out)["deterministic"] is False
    assert "deterministic: false" in (out / CONFIG_FILE).read_text()
    assert "deterministic algorithms off" in result.stdout


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_failed_capture_is_one_warning_then_eager_steps_that_match_cuda_graph_off(
    precision, tmp_path, tiny_mnist
):
    """On a machine without a CUDA GPU ``--cuda-graph on`` runs the warm-up steps and then
    fails to capture: the run goes on eagerly, and the warm-up left no trace in the weights."""
    precision_flags = ("--mixed-precision", precision)
    forced, result = _train(tmp_path, tiny_mnist, "on", "--cuda-graph", "on", *precision_flags)
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1, output
    assert warnings[0].startswith("warning: CUDA graph capture failed (")
    assert warnings[0].endswith("); training with eager steps")
    assert read_summary(forced)["step_engine"] == "eager"
    off, _ = _train(tmp_path, tiny_mnist, "off", "--cuda-graph", "off", *precision_flags)
    assert_bit_identical(forced / MODEL_FILE, off / MODEL_FILE)


def test_cuda_graph_on_with_the_torchvision_loader_says_why_it_stays_eager(tmp_path, tiny_mnist):
    out, result = _train(
        tmp_path, tiny_mnist, "tv", "--cuda-graph", "on", "--loader", "torchvision",
        "--num-workers", "0",
    )  # fmt: skip
    assert (
        "warning: --cuda-graph on: the torchvision loader feeds batches from Python; "
        "training with eager steps"
    ) in result.stdout
    assert read_summary(out)["step_engine"] == "eager"


def test_cuda_graph_rejects_an_unknown_mode(tiny_mnist):
    result = run_here("train", "--data-dir", str(tiny_mnist), "--cuda-graph", "maybe")
    assert result.returncode == 2
    assert result.error_lines() and "--cuda-graph" in result.error_lines()[0]


@pytest.fixture
def scaled_accelerator(cpu_accelerator):
    """An Accelerator on the CPU with an enabled GradScaler, as fp16 runs have one on a GPU
    (Accelerate makes it for CUDA only)."""
    cpu_accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    return cpu_accelerator


def test_the_captured_steps_grad_scaler_path_skips_a_non_finite_step_on_the_device(
    scaled_accelerator,
):
    """fp16's path of the captured step, run without a graph: the scaler's step and update
    through Accelerate's optimizer, with no host sync. A step whose gradients are not finite
    leaves the weights alone and halves the scale; the next steps train; the LR scheduler sees
    the steps (no warning)."""
    import warnings

    from mnist_dist.config import OptimConfig, TrainConfig
    from mnist_dist.schedule import build_schedule
    from mnist_dist.train import build_model_and_optimizer

    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(scaled_accelerator, TrainConfig(), lr=1e-3)
    scheduler = build_schedule(optimizer, OptimConfig(lr_milestones=(1,), lr_gamma=0.1))
    images, labels = _batch(200, seed=3)
    sharding = Sharding(200, 64, 1, 0, seed=0)
    images[sharding.permutation(1)[0]] = float("nan")  # in the first batch of epoch 1
    data = TensorTrainData(images, labels, sharding)
    stats = StepFigures(sharding.steps_per_epoch, torch.device("cpu"))
    scaler = scaled_accelerator.scaler
    engine = CapturedStep(model, optimizer, scaler, data, stats, grad_accum=1)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        steps = engine.run_epoch(1, 0)
        next(steps)
        assert all(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))
        assert scaler.get_scale() == 2.0**15
        assert torch.isnan(stats.values[0, 0])
        for _ in steps:
            pass
        scheduler.step()
    assert not any(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(stats.values[1:, 0]).all()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-4)


@pytest.mark.parametrize("num_samples", [40, 96, 200])  # epochs of 1, 2 and 4 steps
def test_cuda_graph_on_fails_only_for_want_of_cuda_in_epochs_of_any_length(
    num_samples, tmp_path, tiny_mnist
):
    """The warm-up steps of every batch size run on the CPU (epochs shorter than the warm-up
    included); the capture then fails only because there is no CUDA, and the eager steps that
    follow train exactly as ``--cuda-graph off``."""
    flags = ("--max-train-samples", str(num_samples), "--batch-size", "64")
    forced, result = _train(tmp_path, tiny_mnist, "on", "--cuda-graph", "on", *flags)
    [warning] = [x for x in (result.stdout + result.stderr).splitlines() if "warning" in x]
    assert warning.startswith("warning: CUDA graph capture failed (")
    cause = warning.split("(", 1)[1]
    assert "IndexError" not in cause and "out of range" not in cause, warning
    assert "NVIDIA" in cause or "CUDA" in cause, warning  # no driver, or a build without CUDA
    off, _ = _train(tmp_path, tiny_mnist, "off", "--cuda-graph", "off", *flags)
    assert_bit_identical(forced / MODEL_FILE, off / MODEL_FILE)


class FakeCuda:
    """The CUDA calls a capture makes, on the CPU: a current stream that ``torch.cuda.stream``
    contexts set, and graphs whose capture fails as CUDA's does after an op failed inside it
    (``capture_end`` then raises an error of its own)."""

    def __init__(self, monkeypatch) -> None:
        self.current, self.capturing, self.calls = "default", False, []
        fake = self

        class Graph:
            def capture_begin(self, *args, **kwargs) -> None:
                fake.calls.append(("capture_begin", fake.current))
                fake.capturing, fake.failed = True, False

            def capture_end(self) -> None:
                fake.calls.append(("capture_end", fake.current))
                fake.capturing = False
                if fake.failed:
                    raise RuntimeError("operation failed due to a previous error during capture")

        @contextlib.contextmanager
        def stream(s):
            before, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = before

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: "side")
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def failing_op(self) -> None:
        """A ``train.step`` handler: an op that CUDA refuses while a capture is on."""
        self.calls.append(("train.step", self.current))
        if self.capturing:
            self.failed = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda(monkeypatch)
    faults.inject("train.step", fake.failing_op)
    yield fake
    faults.clear()


def _build(accelerator, data: TensorTrainData, mode: str = "on"):
    from mnist_dist.engine import build_engine

    torch.manual_seed(0)
    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    said: list[str] = []
    with mock.patch("mnist_dist.engine.say", said.append):
        engine, _, _ = build_engine(mode, model, optimizer, accelerator, data, 1)
    return model, engine, said


def test_a_capture_failing_inside_the_graph_leaves_eager_steps_on_the_default_stream(
    fake_cuda, cpu_accelerator
):
    images, labels = _batch(200, seed=3)
    data = TensorTrainData(images, labels, Sharding(200, 64, 1, 0, seed=0))
    model, engine, said = _build(cpu_accelerator, data)
    # One warning, with the op's error, not capture_end's.
    assert said == [
        "warning: CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted "
        "when stream is capturing); training with eager steps"
    ]
    assert engine.name == "eager"
    assert ("capture_end", "side") in fake_cuda.calls  # the capture was ended, on its stream
    assert fake_cuda.current == "default" and not fake_cuda.capturing
    del fake_cuda.calls[:]
    for epoch in (1, 2):
        for _ in engine.run_epoch(epoch, 0):
            pass
    assert fake_cuda.calls == [("train.step", "default")] * 8  # every step on the default one
    faults.clear()
    off_model, off_engine, _ = _build(cpu_accelerator, data, mode="off")
    for epoch in (1, 2):
        for _ in off_engine.run_epoch(epoch, 0):
            pass
    for p, q in zip(model.parameters(), off_model.parameters(), strict=True):
        assert p.equal(q)  # the warm-up and the failed capture left no trace


def test_a_capture_that_leaves_cuda_unusable_stops_with_one_line(
    fake_cuda, cpu_accelerator, monkeypatch
):
    """A device-side assert poisons the CUDA context: nothing can run after it, the eager
    fallback included, so the run stops with one line that names the cause."""
    from mnist_dist import engine as engine_module
    from mnist_dist.errors import MnistDistError

    monkeypatch.setattr(engine_module, "cuda_usable", lambda device: False)
    images, labels = _batch(96, seed=3)
    data = TensorTrainData(images, labels, Sharding(96, 64, 1, 0, seed=0))
    with pytest.raises(MnistDistError) as raised:
        _build(cpu_accelerator, data)
    assert str(raised.value) == (
        "the CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted when "
        "stream is capturing) and left the GPU unusable; rerun with --cuda-graph off"
    )


def test_the_captured_steps_loss_fault_counts_forward_passes_on_the_device(cpu_accelerator):
    """The ``train.loss`` point of the captured step gets the device counter of forward passes,
    so that a handler made of tensor ops hits the same forward pass at every replay. Run
    without a graph here: the counter and the handler's ops are what a graph records."""
    images, labels = _batch(200, seed=3)
    data = TensorTrainData(images, labels, Sharding(200, 64, 1, 0, seed=0))
    torch.manual_seed(0)
    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    stats = StepFigures(4, torch.device("cpu"))
    engine = CapturedStep(model, optimizer, None, data, stats, grad_accum=2)
    seen = []

    def nan_at_fifth(loss, forwards):
        seen.append(forwards)
        # Added, not selected: torch.where's backward would turn loss * nan into NaN gradients
        # in every forward pass.
        return loss + torch.where(forwards == 5, float("nan"), 0.0).view(())

    faults.inject("train.loss", nan_at_fifth)
    try:
        for _ in engine.run_epoch(1, 0):
            pass
    finally:
        faults.clear()
    assert all(f is engine.forwards for f in seen) and int(engine.forwards) == 8
    # Forward pass 5 is the first micro-batch of step 3, the first non-finite one.
    assert torch.isfinite(stats.values[:2, 0]).all() and torch.isnan(stats.values[2, 0])
    assert stats.first_non_finite(0, 4).tolist() == [1, 2]
