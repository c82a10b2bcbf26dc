"""The step engines: ``EagerStep`` runs the step from Python (DDP, CPUs, the torchvision
loader); ``CapturedStep`` records it once as a CUDA graph and launches it with one call per
step, since a small model on a fast GPU is otherwise bound by the host's launches (7-9 us
each, ~70 per step). Both write each step's (summed loss, correct) into ``StepFigures`` on the
device, so the loop waits for the device only where it syncs anyway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Protocol

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
    """This rank's figures per step of the current epoch, on the device: (summed loss, correct
    predictions), float32 (counts are exact below 2**24 per step)."""

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.values = torch.zeros(steps_per_epoch, 2, dtype=torch.float32, device=device)
        self.rows = torch.arange(steps_per_epoch, device=device).unsqueeze(1)

    def write(self, position: torch.Tensor, figures: torch.Tensor) -> None:
        """Write ``figures`` into the row ``position`` (a one-element device tensor) names: two
        element-wise kernels, deterministic and capturable. An indexed write would not be:
        under deterministic algorithms ``index_copy_`` on CUDA becomes ``index_put_`` with a
        sort (about ten more kernels), and on some torch versions a host sync that fails the
        capture (fixed upstream by pytorch/pytorch#125952)."""
        torch.where(self.rows == position, figures, self.values, out=self.values)

    def sums(self, start: int, stop: int) -> torch.Tensor:
        """(summed loss, correct) over steps ``start`` to ``stop`` (exclusive), in float64."""
        return self.values[start:stop].double().sum(dim=0)

    def first_non_finite(self, start: int, stop: int) -> torch.Tensor:
        """(any non-finite loss, index of the first one after ``start``), as int64 on the device."""
        bad = ~torch.isfinite(self.values[start:stop, 0])
        return torch.stack([bad.any().long(), bad.long().argmax()])


class StepEngine(Protocol):
    """Runs the optimizer steps of an epoch, writing each step's figures into ``StepFigures``."""

    name: str

    def run_epoch(self, epoch: int, start_step: int) -> Iterator[int]:
        """Take the steps of ``epoch`` from ``start_step`` on, yielding each step's index after
        it was launched (not necessarily finished on the device)."""
        ...


def lr_value(lr: float | torch.Tensor) -> float:
    """An LR as a Python float. A captured step keeps it in a tensor on the device (reading it
    is a host sync). A float32 one is given as its shortest decimal, so 1e-3 reads 0.001 and
    not 0.0010000000474974513."""
    if isinstance(lr, torch.Tensor):
        if lr.dtype == torch.float32:
            return float(np.format_float_positional(np.float32(lr.item()), unique=True))
        return float(lr.item())
    return lr


def lr_tensor(lr: float, device: torch.device) -> torch.Tensor:
    """The LR of a capturable optimizer: a tensor on ``device`` the scheduler fills in place.
    On CUDA float32, as the fused kernels read a tensor LR as float (the value a float LR
    becomes there too); elsewhere float64, since the CPU's fused kernel reads it as a double
    (so the step equals the one with a float LR bit for bit)."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    return torch.tensor(lr, dtype=dtype, device=device)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
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


class CudaUnusableError(MnistDistError):
    """A failed capture left the CUDA context unusable: no eager fallback can run."""


class CapturedStep:
    """The whole optimizer step as a CUDA graph, replayed once per step (one process).

    The graph reads fixed buffers: the epoch's permutation padded to whole batches and a step
    counter on the device that picks its row. Every batch of an epoch is full but the last one
    may be short: it has a graph of its own, for its size, so no step pays for masking padded
    images. The optimizer is Adam with ``capturable=True`` and its LR in a device tensor, which
    the LR scheduler fills in place, so the schedule needs no new capture. Without graphs (before
    ``capture``) the same steps run eagerly.
    """

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
        self.model, self.scaler = model, scaler
        self.prepared_optimizer, self.optimizer = optimizer, _inner(optimizer)
        self.data, self.stats, self.grad_accum = data, stats, grad_accum
        device = data.images.device
        steps = sharding.steps_per_epoch
        batch = sharding.global_batch_size
        self.order = torch.zeros(steps, batch, dtype=torch.int64, device=device)
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
        for group in self.optimizer.param_groups:
            lr = lr_value(group["lr"])  # a float, or a tensor restored from a checkpoint
            group["lr"], group["capturable"] = lr_tensor(lr, device), True

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
        """One optimizer step on the first ``size`` images of the batch at ``position`` (all of
        them but in the short last batch); advances ``position``."""
        indices = self.order.index_select(0, self.position).view(-1)
        if size < len(indices):
            indices = indices[:size]
        images = self.data.images.index_select(0, indices)
        labels = self.data.labels.index_select(0, indices)
        backward = (lambda t: self.scaler.scale(t).backward()) if self.scaler else _backward
        figures = forward_backward(
            self.model, images, labels, self.grad_accum, 1.0 / size, backward,
            loss_fault=self.loss_fault,
        )  # fmt: skip
        self.stats.write(self.position, figures)
        faults.point("train.step")  # runs while a graph is recorded, not at its replays
        stepped_optimizer(self.prepared_optimizer).step()
        self.position.add_(1)

    def loss_fault(self, loss: torch.Tensor) -> torch.Tensor:
        """The ``train.loss`` fault point of the captured step. Its handler also gets
        ``forwards``, this process's training forward passes so far (1 in the first), as a
        device tensor: a graph records what the handler did once, so a handler that changes
        one forward pass's loss does it with tensor ops that every replay evaluates anew, e.g.
        ``loss + torch.where(forwards == n, nan, 0.0)``. Adds nothing to a graph without one."""
        if not faults.installed("train.loss"):
            return loss
        self.forwards.add_(1)
        return faults.value("train.loss", loss, forwards=self.forwards)

    def capture(self) -> None:
        """Record a graph per batch size. The warm-up steps this needs leave no trace: the
        weights, the optimizer's and the scaler's state are put back as they were. Raises
        whatever the capture raised; then the step stays eager, on the default stream, as it
        was, unless the failure left CUDA unusable: then ``CudaUnusableError``."""
        saved = _TrainingState(self.model, self.optimizer, self.scaler)
        cuda = self.data.images.device.type == "cuda"
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        try:
            side = torch.cuda.Stream() if cuda else None
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
                raise CudaUnusableError(
                    f"the CUDA graph capture failed ({type(e).__name__}: {first_line(e)}) and "
                    "left the GPU unusable; rerun with --cuda-graph off"
                ) from e
            self._restore(saved, eager=True)
            raise
        self._restore(saved, eager=False)
        self.graphs = graphs

    def _restore(self, saved: _TrainingState, eager: bool) -> None:
        saved.restore()
        self.position.zero_()
        self.forwards.zero_()
        if eager:  # leave the optimizer as the eager step expects it
            self.optimizer.zero_grad(set_to_none=True)
            for group, (lr, capturable) in zip(
                self.optimizer.param_groups, self.eager_settings, strict=True
            ):
                group["lr"], group["capturable"] = lr, capturable


def record_graph(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``step`` recorded as a CUDA graph, on a side stream (capture needs one).

    ``torch.cuda.graph``'s exit ends the capture before it leaves the stream context: after an
    op failed inside, ``capture_end`` raises "operation failed due to a previous error during
    capture", which replaces the real cause, and the stream context is never left, so
    everything after runs on the side stream. Here the stream context is always left, and the
    error raised is the op's."""
    torch.cuda.synchronize()  # as torch.cuda.graph does: free what can be freed first
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph.capture_begin()
        try:
            step()
        except BaseException:
            # End the stream's capture. After a failed op this raises too; the op's error,
            # raised below, is the cause.
            with suppress(Exception):
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


def forward_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fault: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of a training batch: its summed cross-entropy (float32, through the
    ``train.loss`` fault point, or ``loss_fault``) and its correct predictions (float32)."""
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    loss = loss_fault(loss) if loss_fault is not None else faults.value("train.loss", loss)
    correct = (logits.argmax(dim=1) == labels).sum(dtype=loss.dtype)
    return loss, correct


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
    """Forward and backward of a batch in ``grad_accum`` micro-batches, the one definition of
    both step engines: the gradient is that of ``scale`` times the summed cross-entropy
    (``backward`` runs on that product). ``no_sync``: the context for every micro-batch but
    the last (DDP's, so that gradients are all-reduced once). Returns (summed loss, correct
    predictions), float32 (written into ``out`` if given)."""
    if grad_accum == 1:  # the common case, without the split and the sum
        loss, correct = forward_loss(model, images, labels, loss_fault)
        backward(loss * scale)
        return torch.stack([loss.detach(), correct], out=out)
    figures = []
    micro_batches = list(
        zip(images.tensor_split(grad_accum), labels.tensor_split(grad_accum), strict=True)
    )
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last or no_sync is None else no_sync():
            loss, correct = forward_loss(model, x, y, loss_fault)
            backward(loss * scale)
        figures.append(torch.stack([loss.detach(), correct]))
    return torch.sum(torch.stack(figures), dim=0, out=out)


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
        lambda loss: backward(accelerator, loss), lambda: accelerator.no_sync(model), out,
    )  # fmt: skip
    faults.point("train.step")
    stepped_optimizer(optimizer).step()
    _inner(optimizer).zero_grad(set_to_none=True)
    return figures


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """``accelerator.backward(loss)`` without its division of the loss by the accumulation
    steps, which the loss scale already covers: with ``gradient_accumulation_steps`` left at 1
    it adds a division, forward and backward, to every step. Only fp16's grad scaler needs
    Accelerate's path."""
    if getattr(accelerator, "scaler", None) is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def build_engine(
    mode: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    data: TrainData,
    grad_accum: int,
) -> tuple[StepEngine, StepFigures, str]:
    """The step engine ``--cuda-graph MODE`` asks for, its ``StepFigures`` and why it was
    chosen. A capture that fails leaves one warning and eager steps (unless it left CUDA
    unusable: ``CudaUnusableError``)."""
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
        try:
            engine.capture()
            return engine, figures, why
        except CudaUnusableError:
            raise
        except Exception as e:  # whatever the capture raised, the run goes on eagerly
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            say(
                f"warning: CUDA graph capture failed ({type(e).__name__}: {message}); "
                "training with eager steps"
            )
            why = "the capture failed"
    return EagerStep(model, optimizer, accelerator, data, figures, grad_accum), figures, why
