"""Training throughput and time-to-accuracy: plain PyTorch next to mnist-dist, side by side.

Rows (choose with ``--rows``, a comma list; ``--rows all`` runs every one):

* ``plain`` (a): the reference recipe: ``torchvision.datasets.MNIST`` with
  ``Compose([Grayscale(1), Resize((28, 28)), ToTensor()])``, ``DataLoader(batch_size=64,
  shuffle=True)`` (``--plain-workers`` worker processes, default 0 like the reference), the
  ``MnistCNN`` model, Adam (lr 1e-3), ``CrossEntropyLoss``, MultiStepLR(milestones=[5, 8],
  gamma=0.01) stepped per epoch; test accuracy after every epoch (batch 1000).
* ``plain-tensor`` (b): a plain PyTorch loop over device-resident tensors with the speed options
  of mnist-dist's default (channels-last, fused Adam, one seeded permutation per epoch,
  no host sync per step), evaluating after every epoch like mnist-dist. (b) vs ``tensor`` is
  the harness's own overhead: Accelerate, checkpoints, stop checks, logging.
* ``captured`` (c): (b)'s recipe with the whole step (gather from the device-resident data by a
  static index buffer, forward, loss, backward, fused Adam with ``capturable=True`` and the LR
  in a device tensor) captured in one CUDA graph and replayed per step; the short last batch is
  padded to the full batch and masked by per-sample weights. (c) vs ``tensor`` is the harness's
  cost on top of a captured step. It needs a CUDA GPU: elsewhere it is reported as not
  available and skipped.
* mnist-dist rows, each ``python -m mnist_dist train`` run as a real subprocess and read back
  from its run directory: ``tensor`` (the default), ``eager`` (``--cuda-graph off``),
  ``nondeterministic`` (``--no-deterministic``), ``no-channels-last``, ``bf16`` (autocast),
  ``fp16`` (autocast and a grad scaler; CUDA only), ``compile`` (``--compile``), ``eval-10000``
  (one evaluation batch of 10,000), ``torchvision`` (the DataLoader pipeline), ``ddp2`` (2 ranks
  under ``accelerate launch``, global batch 64) and ``ddp2-weak`` (2 ranks, 64 per rank: weak
  scaling).

(b) and (c) use deterministic kernels, as mnist-dist does by default (``--no-deterministic``
turns them off there and in every mnist-dist row); (a) is the reference as it was written.

Every row runs in a new Python process ((a), (b) and (c) through this script's internal
``--worker``), so that none of them gains from a process warmed by the rows before it. A row that
fails is reported with its reason and the others still run (the exit code is then 1). The JSON
(``--json-out``) is rewritten after every row, so an interrupted run keeps the rows it finished.

images/s counts training only (data loading included, evaluation excluded) and is steady state:
the first epoch (and with it any compile time) is left out when there are two or more. "recipe
s" is the whole training function with its per-epoch evaluations (mnist-dist's
``segment_wall_seconds``); "process s" adds interpreter start and imports. With ``--repeats``
the rows take turns, each repeat starting one row later, and the table shows medians; a run
during which other processes took CPU is flagged.

Run from the repository root, e.g.::

    python benchmarks/throughput.py --epochs 2
    python benchmarks/throughput.py --data-dir /data --epochs 10 --repeats 3 --rows all \\
        --json-out throughput.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from mnist_dist.layout import RunLayout
from mnist_dist.model import MnistCNN
from mnist_dist.records import EpochRecord, Summary

SEED = 0
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 1000
LR = 1e-3
LR_MILESTONES = [5, 8]
LR_GAMMA = 0.01
BUSY_CORES = 0.25  # CPU used by other processes (cores) above which a run is flagged
REPO_ROOT = Path(__file__).resolve().parent.parent

ROW_NAMES = {
    "plain": "(a) plain PyTorch, reference recipe",
    "plain-tensor": "(b) plain PyTorch, device tensors",
    "captured": "(c) plain PyTorch, step in one CUDA graph",
    "tensor": "mnist-dist (default)",
    "eager": "mnist-dist --cuda-graph off",
    "nondeterministic": "mnist-dist --no-deterministic",
    "no-channels-last": "mnist-dist --no-channels-last",
    "bf16": "mnist-dist --mixed-precision bf16",
    "fp16": "mnist-dist --mixed-precision fp16",
    "compile": "mnist-dist --compile",
    "eval-10000": "mnist-dist --eval-batch-size 10000",
    "torchvision": "mnist-dist --loader torchvision",
    "ddp2": "mnist-dist, 2 DDP ranks, batch 64",
    "ddp2-weak": "mnist-dist, 2 DDP ranks, 64 per rank",
}
# The rows this script runs itself, in a worker process of their own.
BARE_ROWS = ("plain", "plain-tensor", "captured")
# The mnist-dist rows: extra `train` flags, and whether 2 ranks run under accelerate launch.
MNIST_DIST_ROWS: dict[str, tuple[list[str], bool]] = {
    "tensor": ([], False),
    "eager": (["--cuda-graph", "off"], False),
    "nondeterministic": (["--no-deterministic"], False),
    "no-channels-last": (["--no-channels-last"], False),
    "bf16": (["--mixed-precision", "bf16"], False),
    "fp16": (["--mixed-precision", "fp16"], False),
    "compile": (["--compile"], False),
    "eval-10000": (["--eval-batch-size", "10000"], False),
    "torchvision": (["--loader", "torchvision"], False),
    "ddp2": ([], True),
    "ddp2-weak": (["--batch-size", "128"], True),
}
# Rows that cannot run without a CUDA GPU, and why: elsewhere they are skipped with this line.
CUDA_ONLY_ROWS = {
    "captured": "a CUDA graph needs a CUDA GPU and none is visible",
    "fp16": "fp16 autocast needs a CUDA GPU and none is visible",
}


@dataclass
class EpochTiming:
    """Training images and training seconds of one epoch."""

    epoch: int
    images: int
    train_seconds: float


@dataclass
class RunResult:
    """One run of one row."""

    row: str
    images_per_second: float  # steady state, see steady_images_per_second
    test_accuracy: float
    test_correct: int
    test_total: int
    wall_seconds: float
    process_seconds: float | None = None  # the whole process, imports included
    other_cpu_cores: float | None = None  # CPU used meanwhile by other processes, in cores
    epochs: list[EpochTiming] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_images_per_second(epochs: Sequence[EpochTiming]) -> float:
    """Training images per second over all epochs but the first (all of them if only one)."""
    steady = [e for e in epochs if e.epoch >= 2] or list(epochs)
    return sum(e.images for e in steady) / sum(e.train_seconds for e in steady)


def reference_transform() -> transforms.Compose:
    return transforms.Compose(
        [transforms.Grayscale(1), transforms.Resize((28, 28)), transforms.ToTensor()]
    )


def run_plain(
    data_dir: str, epochs: int, max_train_samples: int | None, num_workers: int
) -> RunResult:
    """Train and test the reference recipe in this process."""
    started = time.perf_counter()
    seed_everything(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = reference_transform()
    train_set: Dataset = datasets.MNIST(
        root=data_dir, train=True, download=False, transform=transform
    )
    if max_train_samples is not None:
        train_set = Subset(train_set, range(min(max_train_samples, len(train_set))))
    test_set = datasets.MNIST(root=data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(
        train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=num_workers
    )
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE, num_workers=num_workers)

    model = MnistCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = MultiStepLR(optimizer, milestones=LR_MILESTONES, gamma=LR_GAMMA)
    criterion = nn.CrossEntropyLoss()

    timings: list[EpochTiming] = []
    correct = total = 0
    for epoch in range(1, epochs + 1):
        model.train()
        synchronize(device)
        epoch_start = time.perf_counter()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        synchronize(device)
        timings.append(EpochTiming(epoch, len(train_set), time.perf_counter() - epoch_start))
        scheduler.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                correct += int((model(images).argmax(dim=1) == labels).sum())
                total += labels.numel()
    return RunResult(
        row="plain",
        images_per_second=steady_images_per_second(timings),
        test_accuracy=correct / total,
        test_correct=correct,
        test_total=total,
        wall_seconds=time.perf_counter() - started,
        epochs=timings,
        extra={"device": str(device), "num_workers": num_workers},
    )


def bare_model_and_optimizer(
    device: torch.device, channels_last: bool = True
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Row (b)'s model and optimizer: mnist-dist's default speed options, no Accelerate."""
    model = MnistCNN().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=LR, fused=True)


def bare_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: AbstractContextManager[Any] | None = None,
) -> None:
    """Row (b)'s training step (under ``autocast`` for the forward pass, if given)."""
    with autocast or nullcontext():
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels on or off, as mnist-dist's ``--deterministic`` does. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when it first starts, so call this before any CUDA work."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def device_split(
    data_dir: str, train: bool, limit: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's first ``limit`` images (pixels in [0, 1]) and labels, resident on ``device``."""
    ds = datasets.MNIST(root=data_dir, train=train, download=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    return ds.data[:n].to(device).unsqueeze(1).float().div_(255), ds.targets[:n].to(device)


def epoch_order(num_samples: int, epoch: int) -> torch.Tensor:
    """The epoch's order of training images: mnist-dist's seed formula, so rows (b), (c) and
    mnist-dist see the same batches."""
    generator = torch.Generator().manual_seed(SEED * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


@torch.no_grad()
def bare_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Correct predictions over a device-resident split, in batches of ``EVAL_BATCH_SIZE``."""
    model.eval()
    hits = sum(
        (model(x).argmax(dim=1) == y).sum()
        for x, y in zip(images.split(EVAL_BATCH_SIZE), labels.split(EVAL_BATCH_SIZE), strict=True)
    )
    model.train()
    return int(hits)


def run_plain_tensor(
    data_dir: str, epochs: int, max_train_samples: int | None, deterministic: bool
) -> RunResult:
    """(b): the recipe as a plain loop over device-resident tensors, with mnist-dist's default
    speed options and none of its machinery."""
    started = time.perf_counter()
    set_deterministic(deterministic)
    seed_everything(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = device_split(data_dir, True, max_train_samples, device)
    test_images, test_labels = device_split(data_dir, False, None, device)
    model, optimizer = bare_model_and_optimizer(device)
    scheduler = MultiStepLR(optimizer, milestones=LR_MILESTONES, gamma=LR_GAMMA)
    n = len(labels)
    timings: list[EpochTiming] = []
    correct = 0
    for epoch in range(1, epochs + 1):
        model.train()
        synchronize(device)
        epoch_start = time.perf_counter()
        order = epoch_order(n, epoch).to(device)
        for idx in order.split(BATCH_SIZE):
            bare_step(model, optimizer, images[idx], labels[idx])
        synchronize(device)
        timings.append(EpochTiming(epoch, n, time.perf_counter() - epoch_start))
        scheduler.step()
        correct = bare_correct(model, test_images, test_labels)
    total = len(test_labels)
    return RunResult(
        row="plain-tensor",
        images_per_second=steady_images_per_second(timings),
        test_accuracy=correct / total,
        test_correct=correct,
        test_total=total,
        wall_seconds=time.perf_counter() - started,
        epochs=timings,
        extra={"device": str(device), "deterministic": deterministic},
    )


class CapturableStep:
    """Row (c)'s training step, written so that CUDA can capture it whole and replay it.

    An epoch's batches wait in static buffers: ``indices`` (one row of image indices per step)
    and ``weights`` (the same shape: 1 / the batch's size for a real image, 0 for padding), and
    a step counter on the device picks the row, so a replay needs no input from the host. The
    short last batch (60,000 = 937 x 64 + 32) is padded to the full batch with image 0 at
    weight 0: every step has one shape, and the loss, sum(weight x cross-entropy), is still the
    mean over the real images, since padding adds exact zeros to the loss and the gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.images, self.labels = images, labels
        self.num_samples, self.batch_size = len(labels), batch_size
        self.steps_per_epoch = math.ceil(self.num_samples / batch_size)
        shape, device = (self.steps_per_epoch, batch_size), images.device
        self.indices = torch.zeros(shape, dtype=torch.long, device=device)
        self.weights = torch.zeros(shape, dtype=torch.float32, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)

    def load_epoch(self, order: torch.Tensor) -> None:
        """Fill the buffers, in place, with an epoch's ``order`` of images (a permutation of
        the training set) and rewind the counter to its first step."""
        n, b = self.num_samples, self.batch_size
        sizes = torch.full((self.steps_per_epoch,), b, dtype=torch.float32)
        sizes[-1] = n - (self.steps_per_epoch - 1) * b
        weights = (1.0 / sizes).repeat_interleave(b)
        weights[n:] = 0.0
        indices = torch.zeros(self.steps_per_epoch * b, dtype=torch.long)
        indices[:n] = order
        self.indices.copy_(indices.view(self.steps_per_epoch, b))
        self.weights.copy_(weights.view(self.steps_per_epoch, b))
        self.step_index.zero_()

    def __call__(self) -> None:
        """One optimizer step on the counter's batch, then advance the counter. No host sync,
        no Python branch on a tensor: every op can be captured."""
        idx = self.indices.index_select(0, self.step_index).view(-1)
        weight = self.weights.index_select(0, self.step_index).view(-1)
        images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        losses = F.cross_entropy(self.model(images), labels, reduction="none")
        (losses * weight).sum().backward()
        self.optimizer.step()
        self.step_index += 1


def captured_model_and_optimizer(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Row (b)'s model and fused Adam, made capturable: Adam keeps its step count on the device
    and reads the LR from a device tensor, which MultiStepLR changes in place (``fill_``), so
    the schedule needs no new capture."""
    model = MnistCNN().to(device).to(memory_format=torch.channels_last)
    lr = torch.tensor(LR, device=device)
    return model, torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=True)


def capture(step: CapturableStep, warmup_steps: int = 3) -> torch.cuda.CUDAGraph:
    """``step`` as one CUDA graph, ready to replay from the loaded epoch's first step.

    Capture needs warm-up steps first, on a side stream (torch docs, "CUDA Graphs", whole-network
    capture): cuDNN and cuBLAS set up their kernels and Adam creates its state. They must not
    count as training, so afterwards the weights are put back and Adam's state zeroed (step 0,
    zero moments: what a fresh Adam's first step starts from), both in place, because the graph
    keeps these very tensors' addresses.
    """
    model, optimizer = step.model, step.optimizer
    if optimizer.state:
        raise ValueError("capture() needs an optimizer that has not stepped yet")
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    saved = [t.detach().clone() for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step.step_index.zero_()
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for tensor, value in zip(tensors, saved, strict=True):
            tensor.copy_(value)
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
    step.step_index.zero_()
    # No gradients at capture: the graph's backward then allocates them from its own pool and
    # every replay writes them afresh, so no zero_grad is needed between steps.
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def run_captured(
    data_dir: str, epochs: int, max_train_samples: int | None, deterministic: bool
) -> RunResult:
    """(c): row (b)'s recipe with its whole step captured in one CUDA graph, replayed per step."""
    started = time.perf_counter()
    set_deterministic(deterministic)
    seed_everything(SEED)
    device = torch.device("cuda")
    images, labels = device_split(data_dir, True, max_train_samples, device)
    test_images, test_labels = device_split(data_dir, False, None, device)
    model, optimizer = captured_model_and_optimizer(device)
    scheduler = MultiStepLR(optimizer, milestones=LR_MILESTONES, gamma=LR_GAMMA)
    step = CapturableStep(model, optimizer, images, labels, BATCH_SIZE)
    graph: torch.cuda.CUDAGraph | None = None
    capture_seconds = 0.0
    timings: list[EpochTiming] = []
    correct = 0
    for epoch in range(1, epochs + 1):
        synchronize(device)
        epoch_start = time.perf_counter()
        step.load_epoch(epoch_order(step.num_samples, epoch))
        if graph is None:  # in epoch 1's clock, as a compile would be
            graph = capture(step)
            synchronize(device)
            capture_seconds = time.perf_counter() - epoch_start
        for _ in range(step.steps_per_epoch):
            graph.replay()
        synchronize(device)
        timings.append(EpochTiming(epoch, step.num_samples, time.perf_counter() - epoch_start))
        scheduler.step()
        correct = bare_correct(model, test_images, test_labels)
    total = len(test_labels)
    return RunResult(
        row="captured",
        images_per_second=steady_images_per_second(timings),
        test_accuracy=correct / total,
        test_correct=correct,
        test_total=total,
        wall_seconds=time.perf_counter() - started,
        epochs=timings,
        extra={
            "device": str(device),
            "deterministic": deterministic,
            "capture_seconds": capture_seconds,
        },
    )


def run_timed(command: list[str], what: str) -> float:
    """Run ``command`` from the repository root and return its wall seconds; raise with the
    tail of its output if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        raise RuntimeError(
            f"{what} exited with {proc.returncode}: {' '.join(command)}\n" + "\n".join(tail)
        )
    return seconds


def run_mnist_dist(
    row: str,
    data_dir: str,
    epochs: int,
    max_train_samples: int | None,
    deterministic: bool = True,
) -> RunResult:
    """Run ``mnist-dist train`` (under ``accelerate launch`` for the DDP rows) as a subprocess
    and read its run directory."""
    extra_flags, launched = MNIST_DIST_ROWS[row]
    if not deterministic:
        extra_flags = [*extra_flags, "--no-deterministic"]
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        launcher = [sys.executable, "-m"]
        if launched:
            launcher = [
                str(Path(sys.executable).with_name("accelerate")), "launch",
                "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
                "--main_process_port", str(free_port()), "-m",
            ]  # fmt: skip
        command = [
            *launcher, "mnist_dist", "train",
            "--data-dir", data_dir,
            "--output-dir", str(run_dir),
            "--epochs", str(epochs),
            "--tracker", "none",
            *extra_flags,
        ]  # fmt: skip
        if max_train_samples is not None:
            command += ["--max-train-samples", str(max_train_samples)]
        process_seconds = run_timed(command, "mnist-dist")
        layout = RunLayout(run_dir)
        summary = Summary.from_dict(json.loads(layout.summary.read_text()))
        resolved = yaml.safe_load(layout.config.read_text()) or {}
        records = [
            EpochRecord.from_dict(json.loads(line))
            for line in layout.metrics.read_text().splitlines()
            if line.strip()
        ]
    timings = [
        EpochTiming(
            epoch=r.epoch,
            images=round(r.images_per_second * written(r.train_seconds, "train_seconds")),
            train_seconds=written(r.train_seconds, "train_seconds"),
        )
        for r in records
    ]
    return RunResult(
        row=row,
        images_per_second=steady_images_per_second(timings),
        test_accuracy=float(summary.test_accuracy),
        test_correct=summary.test_correct,
        test_total=summary.test_total,
        wall_seconds=written(summary.segment_wall_seconds, "segment_wall_seconds"),
        process_seconds=process_seconds,
        epochs=timings,
        extra={
            "world_size": summary.world_size,
            "mixed_precision": summary.mixed_precision,
            "step_engine": summary.step_engine,
            "deterministic": summary.deterministic,
            "train_seconds": sum(t.train_seconds for t in timings),
            "num_workers": resolved.get("data", {}).get("num_workers"),
            "summary_images_per_second": summary.images_per_second,
            "epoch_seconds": [r.epoch_seconds for r in records],
            "test_accuracy_per_epoch": [r.test_accuracy for r in records],
        },
    )


def written(value: float | None, name: str) -> float:
    """A figure that the records of the current version always hold (None only in older
    runs' records, which a benchmark never reads)."""
    if value is None:
        raise RuntimeError(f"the run's records have no {name}")
    return float(value)


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used since boot (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished (waited-for) children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_plain_row(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a), (b) or (c) in this process."""
    if row == "plain":
        return run_plain(args.data_dir, args.epochs, args.max_train_samples, args.plain_workers)
    if row == "captured":
        return run_captured(args.data_dir, args.epochs, args.max_train_samples, args.deterministic)
    return run_plain_tensor(args.data_dir, args.epochs, args.max_train_samples, args.deterministic)


def run_plain_subprocess(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a), (b) or (c) in a new Python process, like the mnist-dist rows: a fresh process
    (allocator, caches, thread pools) is not the harness's cost, so no row runs in a warm one.
    In-process, a (b) after other rows measured 17,000-18,000 images/s where new processes
    gave 11,000-17,000."""
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--worker", row,
            "--data-dir", args.data_dir,
            "--epochs", str(args.epochs),
            "--plain-workers", str(args.plain_workers),
            "--result-json", str(out),
            "--deterministic" if args.deterministic else "--no-deterministic",
        ]  # fmt: skip
        if args.max_train_samples is not None:
            command += ["--max-train-samples", str(args.max_train_samples)]
        process_seconds = run_timed(command, f"row {row}")
        saved = json.loads(out.read_text())
    saved["epochs"] = [EpochTiming(**e) for e in saved["epochs"]]
    return RunResult(**{**saved, "process_seconds": process_seconds})


def run_row(row: str, args: argparse.Namespace) -> RunResult:
    """Run one row in a new process and note how much CPU other processes took meanwhile
    (steal included)."""
    busy, own, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if row in BARE_ROWS:
        result = run_plain_subprocess(row, args)
    else:
        result = run_mnist_dist(
            row, args.data_dir, args.epochs, args.max_train_samples, args.deterministic
        )
    busy_after = machine_busy_seconds()
    if busy is not None and busy_after is not None:
        other = (busy_after - busy) - (own_cpu_seconds() - own)
        result.other_cpu_cores = max(0.0, other) / (time.perf_counter() - started)
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"),
        "accelerate": metadata.version("accelerate"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def paired_ratios(runs: list[RunResult], baseline: list[RunResult] | None) -> list[float]:
    """Each repeat's rate over the baseline's rate in the same repeat: the rows take turns, so
    pairing by repeat cancels the machine's drift between repeats. (Written mid-way, one of the
    two may hold one more repeat than the other; that one is left unpaired.)"""
    if not baseline:
        return []
    pairs = zip(runs, baseline, strict=False)
    return [r.images_per_second / b.images_per_second for r, b in pairs]


def ratio_fields(name: str, ratios: list[float]) -> dict[str, Any]:
    """The median of ``ratios`` and their range, as ``ratio_to_NAME`` and ``..._range``."""
    return {
        f"ratio_to_{name}": statistics.median(ratios) if ratios else None,
        f"ratio_to_{name}_range": [min(ratios), max(ratios)] if ratios else None,
    }


def summarize_row(
    row: str,
    runs: list[RunResult],
    plain: list[RunResult] | None,
    plain_tensor: list[RunResult] | None,
    captured: list[RunResult] | None = None,
) -> dict[str, Any]:
    """Medians over the repeats of one row, and its ratios to rows (a), (b) and (c): the median
    of the per-repeat ratios, with their range."""
    process = [r.process_seconds for r in runs if r.process_seconds is not None]
    other = [r.other_cpu_cores for r in runs if r.other_cpu_cores is not None]
    return {
        "row": row,
        "name": ROW_NAMES[row],
        "images_per_second": statistics.median(r.images_per_second for r in runs),
        "images_per_second_range": [
            min(r.images_per_second for r in runs),
            max(r.images_per_second for r in runs),
        ],
        **ratio_fields("plain", paired_ratios(runs, plain)),
        **ratio_fields("plain_tensor", paired_ratios(runs, plain_tensor)),
        **ratio_fields("captured", paired_ratios(runs, captured)),
        "test_accuracy": statistics.median(r.test_accuracy for r in runs),
        "wall_seconds": statistics.median(r.wall_seconds for r in runs),
        "process_seconds": statistics.median(process) if process else None,
        "max_other_cpu_cores": max(other) if other else None,
        "runs": [asdict(r) for r in runs],
    }


def summarize_rows(runs: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """``summarize_row`` for every row that has runs, against the baselines among them."""
    baselines = (runs.get("plain"), runs.get("plain-tensor"), runs.get("captured"))
    return [summarize_row(row, r, *baselines) for row, r in runs.items() if r]


def runs_from_json(path: str) -> dict[str, list[RunResult]]:
    """The runs of an earlier ``--json-out``, to print its table again."""
    saved = json.loads(Path(path).read_text())
    runs = {}
    for row in saved["rows"]:
        runs[row["row"]] = [
            RunResult(**{**r, "epochs": [EpochTiming(**e) for e in r["epochs"]]})
            for r in row["runs"]
        ]
    return runs


def format_table(rows: list[dict[str, Any]]) -> str:
    # The (c) column only where (c) ran: on a machine without CUDA it never does.
    with_c = any(r.get("ratio_to_captured") is not None for r in rows)
    ratio_keys = ["ratio_to_plain", "ratio_to_plain_tensor"] + ["ratio_to_captured"] * with_c
    header = ["row", "images/s", "vs (a)", "vs (b)", *["vs (c)"] * with_c]
    header += ["test acc", "recipe s", "process s"]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        [
            r["name"],
            f"{r['images_per_second']:,.0f}",
            *(ratio(r.get(key)) for key in ratio_keys),
            f"{r['test_accuracy']:.2%}",
            f"{r['wall_seconds']:.1f}",
            "-" if r["process_seconds"] is None else f"{r['process_seconds']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def parse_rows(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ROW_NAMES)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_NAMES]
    if not rows or unknown:
        raise argparse.ArgumentTypeError(
            f"rows must be a comma list from {','.join(ROW_NAMES)}, got {text!r}"
        )
    return list(dict.fromkeys(rows))  # de-duplicated, order kept


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Training throughput of plain PyTorch (reference recipe) vs mnist-dist."
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DIST_DATA_DIR") or "./data",
        help="folder holding MNIST/raw/*-ubyte (default: env MNIST_DIST_DATA_DIR or ./data)",
    )
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs per run")
    parser.add_argument(
        "--repeats", type=positive_int, default=1, help="runs per row; medians are reported"
    )
    parser.add_argument(
        "--max-train-samples",
        type=positive_int,
        default=None,
        help="train on the first N images only (default: all 60,000)",
    )
    parser.add_argument(
        "--rows",
        type=parse_rows,
        default=parse_rows("plain,plain-tensor,tensor"),
        help=f"'all' or a comma list from {','.join(ROW_NAMES)} "
        "(default: plain,plain-tensor,tensor)",
    )
    parser.add_argument(
        "--plain-workers",
        type=non_negative_int,
        default=0,
        help="DataLoader workers for the plain row (default: 0, like the reference)",
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic kernels in rows (b) and (c), as mnist-dist's default; "
        "--no-deterministic also passes --no-deterministic to the mnist-dist rows",
    )
    parser.add_argument(
        "--json-out",
        metavar="PATH",
        help="also write the results as JSON (rewritten after every row)",
    )
    # Internal: run one of the bare rows in this process and write its result as JSON.
    parser.add_argument("--worker", choices=BARE_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the table of an earlier --json-out again instead of running anything",
    )
    return parser


def failure_reason(error: BaseException) -> str:
    """One line for a failed row: mnist-dist's own error line if its output has one, else the
    last line of the output (``run_timed`` puts the output's tail in its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("mnist-dist: error:")]
    if ours:
        return ours[-1]
    return lines[-1] if lines else type(error).__name__


def write_json(
    path: str,
    machine: dict[str, Any],
    args: argparse.Namespace,
    runs: dict[str, list[RunResult]],
    not_run: dict[str, dict[str, str]],
) -> None:
    """The results so far: rewritten after every row, so an interrupted run keeps them."""
    settings = {
        "data_dir": args.data_dir,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "max_train_samples": args.max_train_samples,
        "rows": args.rows,
        "plain_workers": args.plain_workers,
        "deterministic": args.deterministic,
        "seed": SEED,
        "batch_size": BATCH_SIZE,
    }
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = {
        "machine": {**machine, "load_average_1min_after": load_after},
        "settings": settings,
        "rows": summarize_rows(runs),
        **not_run,  # "unavailable" and "failed": row -> reason
    }
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        print(format_table(summarize_rows(runs_from_json(args.table_from))))
        return 0
    args.data_dir = str(Path(args.data_dir).resolve())
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"throughput.py: no MNIST/raw under {args.data_dir}", file=sys.stderr)
        return 2
    if args.worker:
        result = run_plain_row(args.worker, args)
        Path(args.result_json).write_text(json.dumps(asdict(result)))
        return 0

    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), "
        f"torch threads {machine['torch_num_threads']}, GPU {machine['cuda'] or 'none'}; "
        f"python {machine['python']}, torch {machine['torch']}, "
        f"torchvision {machine['torchvision']}, accelerate {machine['accelerate']}"
    )
    steady = "epochs 2.." + str(args.epochs) if args.epochs >= 2 else "epoch 1"
    print(
        f"settings: {args.epochs} epoch(s), {args.max_train_samples or 60_000} training images, "
        f"{args.repeats} repeat(s), images/s over {steady}, plain workers {args.plain_workers}, "
        f"deterministic (b), (c) {'on' if args.deterministic else 'off'}"
    )
    unavailable: dict[str, str] = {}
    if machine["cuda"] is None:
        unavailable = {row: CUDA_ONLY_ROWS[row] for row in args.rows if row in CUDA_ONLY_ROWS}
    for row, why in unavailable.items():
        print(f"{ROW_NAMES[row]}: not available here: {why}")
    failed: dict[str, str] = {}
    rows_to_run = [row for row in args.rows if row not in unavailable]
    runs: dict[str, list[RunResult]] = {row: [] for row in rows_to_run}
    for repeat in range(1, args.repeats + 1):
        # Rows take turns so that drift hits them alike, and each repeat starts one row later
        # so that no row always runs right after the same one.
        shift = (repeat - 1) % max(len(rows_to_run), 1)
        for row in rows_to_run[shift:] + rows_to_run[:shift]:
            if row in failed:
                continue
            print(f"[{repeat}/{args.repeats}] {ROW_NAMES[row]} ...", end=" ", flush=True)
            try:
                result = run_row(row, args)
            except Exception as e:  # any row's failure: report it, run the others
                failed[row] = failure_reason(e)
                print(f"failed: {failed[row]}")
                print(str(e), file=sys.stderr)
                continue
            runs[row].append(result)
            print(f"{result.images_per_second:,.0f} images/s, {result.wall_seconds:.1f}s")
            if result.other_cpu_cores is not None and result.other_cpu_cores > BUSY_CORES:
                print(
                    f"warning: other processes used {result.other_cpu_cores:.2f} CPU cores "
                    "during this run: its timings are distorted",
                    file=sys.stderr,
                )
            if args.json_out:
                not_run = {"unavailable": unavailable, "failed": failed}
                write_json(args.json_out, machine, args, runs, not_run)

    rows = summarize_rows(runs)
    if rows:
        print()
        print(format_table(rows))
    flagged = [r["name"] for r in rows if (r["max_other_cpu_cores"] or 0.0) > BUSY_CORES]
    if flagged:
        print(f"distorted by other processes (see warnings): {', '.join(flagged)}")
    if failed:
        print(f"failed: {', '.join(ROW_NAMES[row] for row in failed)}", file=sys.stderr)

    if args.json_out:
        write_json(
            args.json_out, machine, args, runs, {"unavailable": unavailable, "failed": failed}
        )
        print(f"\nresults written to {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
