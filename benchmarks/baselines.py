"""The plain PyTorch baselines that ``throughput.py`` sets beside mnist-dist, each training and
testing the recipe in the calling process: (a) ``plain``, the reference recipe as its author
wrote it (its settings written out, not read from mnist-dist; a test pins them to its defaults);
(b) ``plain-tensor``, mnist-dist's default recipe and speed options as a bare loop over device
tensors; (c) ``captured``, (b) with the whole step in one CUDA graph (CUDA only). (b) and (c)
take their settings, data and shuffle from mnist-dist itself, so they cannot drift from it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets

from mnist_dist.config import DataConfig, OptimConfig, TrainConfig
from mnist_dist.data import epoch_seed, load_split, reference_transform, split_tensors
from mnist_dist.determinism import set_determinism
from mnist_dist.model import MnistCNN


@dataclass(frozen=True)
class ReferenceRecipe:
    """Row (a)'s settings, as the reference code has them."""

    seed: int = 0
    batch_size: int = 64  # images per step
    eval_batch_size: int = 1000  # images per forward pass when testing
    lr: float = 1e-3  # Adam's learning rate before the first milestone
    lr_milestones: tuple[int, ...] = (5, 8)  # epochs after which the LR is multiplied by gamma
    lr_gamma: float = 0.01


REFERENCE = ReferenceRecipe()
# Rows (b) and (c): mnist-dist's defaults, whatever they are.
TRAIN, OPTIM = TrainConfig(), OptimConfig()
EVAL_BATCH_SIZE = DataConfig().eval_batch_size


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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_images_per_second(epochs: Sequence[EpochTiming]) -> float:
    """Training images per second over all epochs but the first (all of them if only one)."""
    steady = [e for e in epochs if e.epoch >= 2] or list(epochs)
    return sum(e.images for e in steady) / sum(e.train_seconds for e in steady)


def finished(
    row: str, wall: float, timings: list[EpochTiming], correct: int, total: int, **extra: Any
) -> RunResult:
    """A run's result, ``correct`` of ``total`` test images right after its last epoch."""
    ips = steady_images_per_second(timings)
    return RunResult(row, ips, correct / total, correct, total, wall, epochs=timings, extra=extra)


def run_plain(
    data_dir: str, epochs: int, max_train_samples: int | None, num_workers: int
) -> RunResult:
    """Train and test the reference recipe in this process."""
    started, recipe, transform = time.perf_counter(), REFERENCE, reference_transform()
    set_seed(recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set: Dataset = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    if max_train_samples is not None:
        train_set = Subset(train_set, range(min(max_train_samples, len(train_set))))
    test_set = datasets.MNIST(data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(
        train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=num_workers
    )
    test_loader = DataLoader(test_set, batch_size=recipe.eval_batch_size, num_workers=num_workers)
    model = MnistCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = MultiStepLR(optimizer, milestones=recipe.lr_milestones, gamma=recipe.lr_gamma)
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
    extra = {"device": str(device), "num_workers": num_workers}
    return finished("plain", time.perf_counter() - started, timings, correct, total, **extra)


def bare_model_and_optimizer(
    device: torch.device, channels_last: bool = TRAIN.channels_last, capturable: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Row (b)'s model and fused Adam, no Accelerate. ``capturable`` (row (c)): the LR a device
    tensor, which MultiStepLR changes in place, so the schedule needs no new capture."""
    model = MnistCNN().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = torch.tensor(OPTIM.lr, device=device) if capturable else OPTIM.lr
    return model, torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def bare_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: AbstractContextManager[Any] | None = None,
) -> None:
    """Row (b)'s training step, the forward pass under ``autocast`` if given."""
    with autocast or nullcontext():
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def epoch_order(num_samples: int, epoch: int) -> torch.Tensor:
    """The epoch's order of training images, with mnist-dist's shuffle seed."""
    generator = torch.Generator().manual_seed(epoch_seed(TRAIN.seed, epoch))
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


class CapturableStep:
    """Row (c)'s training step, capturable whole: a device counter picks each step's row of the
    epoch's ``indices`` and ``weights`` (1 / the batch's size), so a replay needs no host input.
    The short last batch is padded to a full one with image 0 at weight 0: one shape for every
    step, and sum(weight x cross-entropy) is still the mean over its real images."""

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
        """Load an epoch's ``order`` of images into the buffers, in place; rewind the counter."""
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
        """One optimizer step on the counter's batch; no host sync, so every op can be captured."""
        idx = self.indices.index_select(0, self.step_index).view(-1)
        weight = self.weights.index_select(0, self.step_index).view(-1)
        images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        losses = F.cross_entropy(self.model(images), labels, reduction="none")
        (losses * weight).sum().backward()
        self.optimizer.step()
        self.step_index += 1


def capture(step: CapturableStep, warmup_steps: int = 3) -> torch.cuda.CUDAGraph:
    """``step`` as one CUDA graph, ready to replay from the loaded epoch's first step."""
    model, optimizer = step.model, step.optimizer
    if optimizer.state:
        raise ValueError("capture() needs an optimizer that has not stepped yet")
    # Capture needs warm-up steps first, on a side stream (torch docs, "CUDA Graphs", whole-network
    # capture). They must not count as training: afterwards the weights are put back and Adam's
    # state zeroed (what a fresh Adam starts from), in place, since the graph keeps the addresses.
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


def run_device_tensors(
    row: str, data_dir: str, epochs: int, max_train_samples: int | None, deterministic: bool
) -> RunResult:
    """Row (b), a bare loop over device-resident tensors, or (c), "captured": one CUDA graph."""
    started = time.perf_counter()
    set_determinism(deterministic)
    set_seed(TRAIN.seed)
    captured = row == "captured"
    device = torch.device("cuda" if captured or torch.cuda.is_available() else "cpu")
    # Preprocessed as mnist-dist's tensor loader does, resident on the device.
    images, labels = split_tensors(load_split(data_dir, train=True), max_train_samples, device)
    test_images, test_labels = split_tensors(load_split(data_dir, train=False), None, device)
    model, optimizer = bare_model_and_optimizer(device, capturable=captured)
    scheduler = MultiStepLR(optimizer, milestones=OPTIM.lr_milestones, gamma=OPTIM.lr_gamma)
    if captured:
        step = CapturableStep(model, optimizer, images, labels, TRAIN.global_batch_size)
    graph: torch.cuda.CUDAGraph | None = None
    capture_seconds = 0.0
    timings: list[EpochTiming] = []
    correct = 0
    for epoch in range(1, epochs + 1):
        synchronize(device)
        epoch_start = time.perf_counter()
        order = epoch_order(len(labels), epoch)
        if not captured:
            for idx in order.to(device).split(TRAIN.global_batch_size):
                bare_step(model, optimizer, images[idx], labels[idx])
        else:
            step.load_epoch(order)
            if graph is None:  # in epoch 1's clock, as a compile would be
                graph = capture(step)
                synchronize(device)
                capture_seconds = time.perf_counter() - epoch_start
            for _ in range(step.steps_per_epoch):
                graph.replay()
        synchronize(device)
        timings.append(EpochTiming(epoch, len(labels), time.perf_counter() - epoch_start))
        scheduler.step()
        correct = bare_correct(model, test_images, test_labels)
    extra = {"capture_seconds": capture_seconds} if captured else {}
    figures = {"device": str(device), "deterministic": deterministic, **extra}
    wall_seconds = time.perf_counter() - started
    return finished(row, wall_seconds, timings, correct, len(test_labels), **figures)
