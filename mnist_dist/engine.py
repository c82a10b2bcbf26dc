"""The step engines: ``EagerStep`` runs the step from Python; ``CapturedStep`` replays it as
one CUDA graph per step, since a small model on a fast GPU is otherwise bound by the host's
launches (~70 per step). Both write each step's figures into ``StepFigures`` on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mnist_dist import faults
from mnist_dist.data import TensorTrainData, TrainData
from mnist_dist.distributed import say
from mnist_dist.errors import MnistDistError, first_line

# Steps run before a capture so that lazy initialisation (cuBLAS/cuDNN handles, the optimizer's
# state, autograd's buffers) happens outside the graph; the CUDA graphs notes of PyTorch use 3.
WARMUP_STEPS = 3


class StepFigures:
    """This rank's (summed loss, correct) per step of the epoch, float32, on the device."""

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.values = torch.zeros(steps_per_epoch, 2, dtype=torch.float32, device=device)
        self.rows = torch.arange(steps_per_epoch, device=device).unsqueeze(1)

    def write(self, position: torch.Tensor, figures: torch.Tensor) -> None:
        """Write ``figures`` into the row ``position`` (a one-element device tensor) names."""
        # Not an indexed write: under deterministic algorithms that is a sort on CUDA, and on
        # some torch versions a host sync that fails a capture (pytorch/pytorch#125952).
        torch.where(self.rows == position, figures, self.values, out=self.values)

    def sums(self, start: int, stop: int) -> torch.Tensor:
        """(summed loss, correct) over steps ``start`` to ``stop`` (exclusive), in float64."""
        return self.values[start:stop].double().sum(dim=0)

    def first_non_finite(self, start: int, stop: int) -> torch.Tensor:
        """(any non-finite loss, index of the first one after ``start``), as int64 on the device."""
        bad = ~torch.isfinite(self.values[start:stop, 0])
        return torch.stack([bad.any().long(), bad.long().argmax()])


def lr_value(lr: float | torch.Tensor) -> float:
    """An LR (a captured step's is a device tensor) as a float; a float32 one as its shortest
    decimal, so 1e-3 reads 0.001 and not 0.0010000000474974513."""
    if isinstance(lr, torch.Tensor):
        if lr.dtype == torch.float32:
            return float(np.format_float_positional(np.float32(lr.item()), unique=True))
        return float(lr.item())
    return lr


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def stepped_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer a step calls: with fp16's grad scaler Accelerate's (the scaler's step and
    update, without a host sync for a fused optimizer); otherwise the inner one, as
    ``AcceleratedOptimizer.step`` first looks a package up uncached (about 60 us)."""
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
        stats: StepFigures,
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
    """The optimizer step as one CUDA graph per batch size, replayed once per step (one process),
    reading the epoch's order, the step and the LR from device tensors. Eager until ``capture``."""

    name = "cuda-graph"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        data: TensorTrainData,
        stats: StepFigures,
        grad_accum: int,
    ) -> None:
        sharding = data.sharding
        if sharding.world_size != 1:
            raise ValueError("a captured step runs in one process")
        self.model, self.scaler, self.backward = model, scaler, _backward(scaler)
        self.prepared_optimizer, self.optimizer = optimizer, _inner(optimizer)
        self.data, self.stats, self.grad_accum = data, stats, grad_accum
        device, steps = data.images.device, sharding.steps_per_epoch
        self.order = torch.zeros(
            steps, sharding.global_batch_size, dtype=torch.int64, device=device
        )
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        # Training forward passes of this process, counted on the device for a fault handler
        # at ``train.loss`` (a replay runs no Python); counted only while one is installed.
        self.forwards = torch.zeros(1, dtype=torch.int64, device=device)
        # The step of each batch size: (size, the first step of the epoch with that size).
        last = sharding.global_batch_size_at(steps - 1)
        self.shapes = {sharding.global_batch_size_at(0): 0}
        self.shapes.setdefault(last, steps - 1)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.eager_settings = [(g["lr"], g["capturable"]) for g in self.optimizer.param_groups]
        # The LR as a tensor in the dtype fused Adam reads a float LR as (float on CUDA, double
        # on the CPU), so the step equals the one with a float LR bit for bit.
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        for group in self.optimizer.param_groups:
            lr = lr_value(group["lr"])  # a float, or a tensor restored from a checkpoint
            group["lr"], group["capturable"] = torch.tensor(lr, dtype=dtype, device=device), True

    def run_epoch(self, epoch: int, start_step: int) -> Iterator[int]:
        sharding = self.data.sharding
        padded = torch.zeros(self.order.numel(), dtype=torch.int64)
        padded[: sharding.num_samples] = sharding.permutation(epoch)
        self.order.copy_(padded.view_as(self.order))
        self.position.fill_(start_step)
        for step in range(start_step, sharding.steps_per_epoch):
            size = sharding.global_batch_size_at(step)
            graph = self.graphs.get(size)
            if graph is not None:
                graph.replay()  # its backward writes the gradients afresh
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.step(size)
            yield step

    def step(self, size: int) -> None:
        """One optimizer step on the first ``size`` images of the batch at ``position``."""
        indices = self.order.index_select(0, self.position).view(-1)[:size]
        images = self.data.images.index_select(0, indices)
        labels = self.data.labels.index_select(0, indices)
        figures = forward_backward(
            self.model, images, labels, self.grad_accum, 1.0 / size, self.backward,
            loss_fault=self.loss_fault,
        )  # fmt: skip
        self.stats.write(self.position, figures)
        faults.point("train.step")  # runs while a graph is recorded, not at its replays
        stepped_optimizer(self.prepared_optimizer).step()
        self.position.add_(1)

    def loss_fault(self, loss: torch.Tensor) -> torch.Tensor:
        """The ``train.loss`` fault point, whose handler also gets ``forwards`` (1 in the first
        forward pass). A graph replays what the handler did once, so a handler that changes one
        pass's loss uses tensor ops, e.g. ``loss + torch.where(forwards == n, nan, 0.0)``."""
        if not faults.installed("train.loss"):
            return loss
        self.forwards.add_(1)
        return faults.value("train.loss", loss, forwards=self.forwards)

    def capture(self) -> Exception | None:
        """Record a graph per batch size; the warm-up steps leave no trace. If the capture
        raises, the step stays eager, on the default stream, and the error is returned (raised
        as a ``MnistDistError`` if it left CUDA unusable: no eager fallback can run then)."""
        restore = _snapshot(self.model, self.optimizer, self.scaler)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        failure: Exception | None = None
        try:
            side = torch.cuda.Stream() if self.data.images.device.type == "cuda" else None
            if side is not None:  # warm up off the default stream, as capture requires
                side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side) if side is not None else nullcontext():
                    for size, step in self.shapes.items():
                        for _ in range(WARMUP_STEPS):
                            self.position.fill_(step)
                            self.optimizer.zero_grad(set_to_none=True)
                            self.step(size)
            finally:
                if side is not None:
                    torch.cuda.current_stream().wait_stream(side)
            for size, step in self.shapes.items():
                self.position.fill_(step)
                # Gradients allocated inside the capture live in the graph's memory pool, and
                # each replay writes them afresh.
                self.optimizer.zero_grad(set_to_none=True)
                graphs[size] = record_graph(lambda size=size: self.step(size))
        except Exception as e:
            if not cuda_usable(self.data.images.device):
                raise MnistDistError(
                    f"the CUDA graph capture failed ({type(e).__name__}: {first_line(e)}) and "
                    "left the GPU unusable; rerun with --cuda-graph off"
                ) from e
            failure = e
        restore()
        self.position.zero_()
        self.forwards.zero_()
        if failure is not None:  # leave the optimizer as the eager step expects it
            self.optimizer.zero_grad(set_to_none=True)
            for group, saved in zip(self.optimizer.param_groups, self.eager_settings, strict=True):
                group["lr"], group["capturable"] = saved
            return failure
        self.graphs = graphs
        return None


StepEngine = EagerStep | CapturedStep  # run_epoch yields each step's index once launched


def record_graph(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``step`` recorded as a CUDA graph, on a side stream; raises the error of a failed op."""
    # Not ``torch.cuda.graph``: after a failed op its exit raises capture_end's error in place
    # of the op's, and never leaves the side stream, so everything after would run there.
    torch.cuda.synchronize()  # as torch.cuda.graph does: free what can be freed first
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph.capture_begin()
        try:
            step()
        except BaseException:
            with suppress(Exception):  # ends the capture; after a failed op it raises too
                graph.capture_end()
            raise
        graph.capture_end()
    return graph


def cuda_usable(device: torch.device) -> bool:
    """Whether ``device`` still runs work (a device-side assert poisons a CUDA context)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception:
        return False
    return True


def _snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> Callable[[], None]:
    """A function that puts back everything an optimizer step changes, in place (a graph keeps
    the addresses of these tensors)."""
    params = [p.detach().clone() for p in model.parameters()]
    optimizer_state = {
        p: {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        for p, state in optimizer.state.items()
    }
    scaler_state = scaler.state_dict() if scaler is not None else None

    @torch.no_grad()
    def restore() -> None:
        for p, saved in zip(model.parameters(), params, strict=True):
            p.copy_(saved)
        for p, state in optimizer.state.items():
            saved = optimizer_state.get(p)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    # A state the warm-up created is Adam's initial one: all zeros, step 0.
                    value.copy_(saved[key]) if saved is not None else value.zero_()
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)  # fills its tensors in place

    return restore


def forward_backward(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    grad_accum: int,
    scale: float,
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], AbstractContextManager[object]] | None = None,
    out: torch.Tensor | None = None,
    loss_fault: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and backward of a batch in ``grad_accum`` micro-batches (``no_sync`` around all but
    the last), for the gradient of ``scale`` times the summed cross-entropy. Returns (summed
    loss, correct), float32, into ``out`` if given."""
    micro_batches = [(images, labels)]
    if grad_accum > 1:
        micro_batches = list(
            zip(images.tensor_split(grad_accum), labels.tensor_split(grad_accum), strict=True)
        )
    figures = []
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last or no_sync is None else no_sync():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            loss = loss_fault(loss) if loss_fault is not None else faults.value("train.loss", loss)
            correct = (logits.argmax(dim=1) == y).sum(dtype=loss.dtype)
            backward(loss * scale)
        figures.append((loss.detach(), correct))
    if len(figures) == 1:  # the common case, without the sum
        return torch.stack(figures[0], out=out)
    return torch.sum(torch.stack([torch.stack(f) for f in figures]), dim=0, out=out)


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
    """One optimizer step on this rank's share of a global batch. The loss is this rank's
    summed cross-entropy times world_size / global_batch_size: DDP then averages over ranks,
    so the gradient is exactly that of the mean loss over the global batch, whatever the world
    size, the accumulation or an uneven last batch. Returns (summed loss, correct), float32."""
    figures = forward_backward(
        model, images, labels, grad_accum, accelerator.num_processes / global_batch_size,
        _backward(getattr(accelerator, "scaler", None)), lambda: accelerator.no_sync(model), out,
    )  # fmt: skip
    faults.point("train.step")
    stepped_optimizer(optimizer).step()
    _inner(optimizer).zero_grad(set_to_none=True)
    return figures


def _backward(scaler: torch.amp.GradScaler | None) -> Callable[[torch.Tensor], None]:
    """``loss.backward``, through fp16's grad scaler if there is one. (``accelerator.backward``
    would also divide the loss by the accumulation steps, which the loss scale covers.)"""
    if scaler is None:
        return torch.Tensor.backward
    return lambda loss: scaler.scale(loss).backward()


def build_engine(
    mode: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    data: TrainData,
    grad_accum: int,
) -> tuple[StepEngine, StepFigures, str]:
    """The step engine ``--cuda-graph MODE`` asks for, its ``StepFigures`` and why; a failed
    capture leaves a warning and eager steps."""
    figures = StepFigures(data.sharding.steps_per_epoch, accelerator.device)
    why = "the whole optimizer step replays as one CUDA graph per batch size"
    if mode == "off":
        why = "--cuda-graph off"
    elif not isinstance(data, TensorTrainData) or accelerator.num_processes > 1:
        why = "DDP steps run eagerly"
        if not isinstance(data, TensorTrainData):
            why = "the torchvision loader feeds batches from Python"
        if mode == "on":
            say(f"warning: --cuda-graph on: {why}; training with eager steps")
    elif mode == "auto" and accelerator.device.type != "cuda":
        why = "no CUDA device"
    else:
        scaler = getattr(accelerator, "scaler", None)
        engine = CapturedStep(model, optimizer, scaler, data, figures, grad_accum)
        e = engine.capture()
        if e is None:
            return engine, figures, why
        say(
            f"warning: CUDA graph capture failed ({type(e).__name__}: {first_line(e)}); "
            "training with eager steps"
        )
        why = "the capture failed"
    return EagerStep(model, optimizer, accelerator, data, figures, grad_accum), figures, why
