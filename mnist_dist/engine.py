"""The step engines: how one optimizer step reaches the device.

``EagerStep`` runs the step from Python, op by op: DDP, CPUs, the torchvision loader.
``CapturedStep`` records the whole step once as a CUDA graph (gather, forward, loss, backward,
the fused optimizer, the epoch figures) and then launches it with one call per step: a small
model on a fast GPU is otherwise bound by the host's launches (7-9 us each, ~70 per step).

Both write each step's (summed loss, correct predictions) into ``EpochStats`` on the device, so
the loop never waits for the device between steps; the loop reads the figures, and checks them
for a non-finite loss, only where it syncs anyway (log steps, checkpoints, the epoch's end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mnist_dist import faults
from mnist_dist.data import TensorTrainData, TrainData

# Steps run before a capture so that lazy initialisation (cuBLAS/cuDNN handles, the optimizer's
# state, autograd's buffers) happens outside the graph; the CUDA graphs notes of PyTorch use 3.
WARMUP_STEPS = 3


class EpochStats:
    """This rank's figures per step of the current epoch, on the device: (summed loss, correct
    predictions), float32 (counts are exact below 2**24 per step)."""

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.values = torch.zeros(steps_per_epoch, 2, dtype=torch.float32, device=device)

    def sums(self, start: int, stop: int) -> torch.Tensor:
        """(summed loss, correct) over steps ``start`` to ``stop`` (exclusive), in float64."""
        return self.values[start:stop].double().sum(dim=0)

    def first_non_finite(self, start: int, stop: int) -> torch.Tensor:
        """(any non-finite loss, index of the first one after ``start``), as int64 on the device."""
        bad = ~torch.isfinite(self.values[start:stop, 0])
        return torch.stack([bad.any().long(), bad.long().argmax()])


class StepEngine(Protocol):
    """Runs the optimizer steps of an epoch, writing each step's figures into ``EpochStats``."""

    name: str

    def run_epoch(self, epoch: int, start_step: int) -> Iterator[int]:
        """Take the steps of ``epoch`` from ``start_step`` on, yielding each step's index after
        it was launched (not necessarily finished on the device)."""
        ...


def lr_value(lr: float | torch.Tensor) -> float:
    """An LR as a Python float. A captured step keeps it in a float32 tensor on the device
    (reading it is a host sync): that float32 is given as its shortest decimal, so 1e-3 reads
    0.001 and not 0.0010000000474974513."""
    if isinstance(lr, torch.Tensor):
        return float(np.format_float_positional(np.float32(lr.item()), unique=True))
    return lr


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def stepped_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` a training step calls, of a prepared ``optimizer``: with
    fp16's grad scaler, Accelerate's (the scaler's step and update, no host sync: a fused
    optimizer takes the scale and the inf check on the device and skips the update of a step
    with inf gradients); otherwise the inner one, since ``AcceleratedOptimizer.step`` would
    only forward the call after an uncached package look-up (``is_lomo_available``, twice,
    about 30 us each)."""
    return optimizer if getattr(optimizer, "scaler", None) is not None else _inner(optimizer)


class EagerStep:
    """One step at a time from Python (``train_step``)."""

    name = "eager"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        data: TrainData,
        stats: EpochStats,
        grad_accum: int,
    ) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.data, self.stats, self.grad_accum = data, stats, grad_accum
        for group in _inner(optimizer).param_groups:  # as a captured run's checkpoint left it
            group["lr"], group["capturable"] = lr_value(group["lr"]), False

    def run_epoch(self, epoch: int, start_step: int) -> Iterator[int]:
        sharding = self.data.sharding
        for step, (images, labels) in enumerate(self.data.epoch(epoch, start_step), start_step):
            train_step(
                self.model, self.optimizer, self.accelerator, images, labels,
                sharding.global_batch_size_at(step), self.grad_accum, out=self.stats.values[step],
            )  # fmt: skip
            yield step


class CapturedStep:
    """The whole optimizer step as one CUDA graph, replayed once per step (one process).

    The graph reads fixed buffers: the epoch's permutation padded to whole batches, a 0/1 mask
    that hides the padding of the short last batch, each step's loss scale, and a step counter
    on the device that picks the row of each. The optimizer is Adam with ``capturable=True``
    and its LR in a device tensor, which MultiStepLR fills in place, so the schedule needs no
    new capture. Without a graph (before ``capture``) the same step runs eagerly.
    """

    name = "cuda-graph"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        data: TensorTrainData,
        stats: EpochStats,
        grad_accum: int,
    ) -> None:
        sharding = data.sharding
        if sharding.world_size != 1:
            raise ValueError("a captured step runs in one process")
        self.model, self.scaler = model, scaler
        self.prepared_optimizer, self.optimizer = optimizer, _inner(optimizer)
        self.data, self.stats, self.grad_accum = data, stats, grad_accum
        device = data.images.device
        steps, batch = sharding.steps_per_epoch, sharding.global_batch_size
        self.order = torch.zeros(steps, batch, dtype=torch.int64, device=device)
        real = torch.arange(steps * batch).view(steps, batch) < sharding.num_samples
        self.mask = real.float().to(device)
        # The gradient is that of the mean loss over the real images of the batch.
        self.scale = (1.0 / real.sum(dim=1).double()).float().to(device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.eager_settings = [(g["lr"], g["capturable"]) for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            # float32: the fused CUDA kernels read a tensor LR as float.
            lr = lr_value(group["lr"])  # a float, or a tensor restored from a checkpoint
            group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device)
            group["capturable"] = True
        self.graph: torch.cuda.CUDAGraph | None = None

    def run_epoch(self, epoch: int, start_step: int) -> Iterator[int]:
        sharding = self.data.sharding
        padded = torch.zeros(self.order.numel(), dtype=torch.int64)
        padded[: sharding.num_samples] = sharding.permutation(epoch)
        self.order.copy_(padded.view_as(self.order))
        self.position.fill_(start_step)
        for step in range(start_step, sharding.steps_per_epoch):
            if self.graph is not None:
                self.graph.replay()  # its backward writes the gradients afresh
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.step()
            yield step

    def step(self) -> None:
        """One optimizer step on the batch at ``position``; advances ``position``."""
        indices = self.order.index_select(0, self.position).view(-1)
        mask = self.mask.index_select(0, self.position).view(-1)
        images = self.data.images.index_select(0, indices)
        labels = self.data.labels.index_select(0, indices)
        scale = self.scale.index_select(0, self.position).view(())
        backward = (lambda t: self.scaler.scale(t).backward()) if self.scaler else None
        figures = masked_forward_backward(
            self.model, images, labels, mask, scale, self.grad_accum, backward
        )
        self.stats.values.index_copy_(0, self.position, figures.unsqueeze(0))
        faults.point("train.step")  # runs while the graph is recorded, not at its replays
        stepped_optimizer(self.prepared_optimizer).step()
        self.position.add_(1)

    def capture(self) -> None:
        """Record ``step`` as a CUDA graph. The warm-up steps this needs leave no trace: the
        weights, the optimizer's and the scaler's state are put back as they were. Raises
        whatever the capture raised (then the step stays eager and untouched)."""
        saved = _TrainingState(self.model, self.optimizer, self.scaler)
        captured = False
        try:
            cuda = self.data.images.device.type == "cuda"
            side = torch.cuda.Stream() if cuda else None
            if side is not None:  # warm up off the default stream, as capture requires
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if side is not None else nullcontext():
                for _ in range(WARMUP_STEPS):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step()
            if side is not None:
                torch.cuda.current_stream().wait_stream(side)
            # Gradients allocated inside the capture live in the graph's memory pool, and
            # each replay writes them afresh.
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            self.graph, captured = graph, True
        finally:
            saved.restore()
            self.position.zero_()
            if not captured:  # leave the optimizer as the eager step expects it
                self.optimizer.zero_grad(set_to_none=True)
                for group, (lr, capturable) in zip(
                    self.optimizer.param_groups, self.eager_settings, strict=True
                ):
                    group["lr"], group["capturable"] = lr, capturable


class _TrainingState:
    """Copies of everything an optimizer step changes, to undo the warm-up steps in place (the
    graph keeps the addresses of these tensors)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.params = [p.detach().clone() for p in model.parameters()]
        self.optimizer_state = {
            p: {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
            for p, state in optimizer.state.items()
        }
        self.scaler_state = scaler.state_dict() if scaler is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.model.parameters(), self.params, strict=True):
            p.copy_(saved)
        for p, state in self.optimizer.state.items():
            saved = self.optimizer_state.get(p)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    # A state the warm-up created is Adam's initial one: all zeros, step 0.
                    value.copy_(saved[key]) if saved is not None else value.zero_()
        if self.scaler is not None and self.scaler_state:
            self.scaler.load_state_dict(self.scaler_state)  # fills its tensors in place


def masked_forward_backward(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    scale: torch.Tensor,
    grad_accum: int,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Forward and backward of a fixed-shape batch whose padding has ``mask`` 0, in
    ``grad_accum`` micro-batches. The gradient is that of ``scale`` times the summed
    cross-entropy of the real images, exactly: padded images add 0 to the loss and to every
    gradient. Returns (summed loss, correct predictions) of the real images, float32."""
    figures = []
    for x, y, m in zip(
        images.tensor_split(grad_accum),
        labels.tensor_split(grad_accum),
        mask.tensor_split(grad_accum),
        strict=True,
    ):
        logits = model(x)
        loss = (F.cross_entropy(logits.float(), y, reduction="none") * m).sum()
        (backward or torch.Tensor.backward)(loss * scale)
        correct = ((logits.argmax(dim=1) == y) * m).sum()
        figures.append(torch.stack([loss.detach(), correct]))
    return figures[0] if len(figures) == 1 else torch.stack(figures).sum(dim=0)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images: torch.Tensor,
    labels: torch.Tensor,
    global_batch_size: int,
    grad_accum: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimizer step on this rank's share of a global batch, in ``grad_accum`` micro-batches.

    The loss is this rank's summed cross-entropy times world_size / global_batch_size: DDP then
    averages over ranks, so the gradient is exactly that of the mean loss over the global batch,
    whatever the world size, the accumulation or an uneven last batch. Returns this rank's
    (summed loss, correct predictions) on the device, in float32 (written into ``out`` if
    given). On a GPU every op is a kernel launch: the step adds as few as it can.
    """
    scale = accelerator.num_processes / global_batch_size
    if grad_accum == 1:  # the common case, without the split and the stack
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = faults.value("train.loss", loss)
        backward(accelerator, loss * scale)
        correct = (logits.argmax(dim=1) == labels).sum(dtype=loss.dtype)
        optimizer_step(optimizer)
        return torch.stack([loss.detach(), correct], out=out)
    stats = []
    micro_batches = list(
        zip(images.tensor_split(grad_accum), labels.tensor_split(grad_accum), strict=True)
    )
    for i, (x, y) in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch.
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            loss = faults.value("train.loss", loss)
            backward(accelerator, loss * scale)
        correct = (logits.argmax(dim=1) == y).sum(dtype=loss.dtype)
        stats.append(torch.stack([loss.detach(), correct]))
    optimizer_step(optimizer)
    return torch.sum(torch.stack(stats), dim=0, out=out)


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """``accelerator.backward(loss)`` without its division of the loss by the accumulation
    steps, which the loss scale already covers: with ``gradient_accumulation_steps`` left at 1
    it adds a division, forward and backward, to every step. Only fp16's grad scaler needs
    Accelerate's path."""
    if getattr(accelerator, "scaler", None) is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """The step of ``stepped_optimizer``, then ``zero_grad``."""
    faults.point("train.step")
    stepped_optimizer(optimizer).step()
    _inner(optimizer).zero_grad(set_to_none=True)


def build_engine(
    mode: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    data: TrainData,
    grad_accum: int,
    say: Callable[[str], None],
) -> tuple[StepEngine, EpochStats, str]:
    """The step engine ``--cuda-graph MODE`` asks for, its ``EpochStats`` and why it was
    chosen. ``auto`` captures where it can; a capture that fails leaves one warning and eager
    steps, and the run goes on."""
    stats = EpochStats(data.sharding.steps_per_epoch, accelerator.device)

    def eager(reason: str) -> tuple[StepEngine, EpochStats, str]:
        engine = EagerStep(model, optimizer, accelerator, data, stats, grad_accum)
        return engine, stats, reason

    if mode == "off":
        return eager("--cuda-graph off")
    if not isinstance(data, TensorTrainData) or accelerator.num_processes > 1:
        why = (
            "the torchvision loader feeds batches from Python"
            if not isinstance(data, TensorTrainData)
            else "DDP steps run eagerly"
        )
        if mode == "on":
            say(f"warning: --cuda-graph on: {why}; training with eager steps")
        return eager(why)
    if mode == "auto" and accelerator.device.type != "cuda":
        return eager("no CUDA device")
    scaler = getattr(accelerator, "scaler", None)
    engine = CapturedStep(model, optimizer, scaler, data, stats, grad_accum)
    try:
        engine.capture()
    except Exception as e:  # whatever the capture raised, the run goes on eagerly
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        say(
            f"warning: CUDA graph capture failed ({type(e).__name__}: {message}); "
            "training with eager steps"
        )
        return eager("the capture failed")
    return engine, stats, "the whole optimizer step replays as one CUDA graph"
