"""fp16's loss scaling through the eager step (``train_step``), in this process.

Accelerate makes a GradScaler for CUDA only, so the Accelerator gets an enabled CPU one, before
``prepare`` as fp16 runs have it. The captured step's path (a skipped step under the scaler) is
tested in test_engine.py; this is the path every DDP and CPU run takes: the Accelerator's scaler
scales the loss, ``AcceleratedOptimizer.step`` runs the scaler's step and update.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mnist_dist.config import OptimConfig, TrainConfig
from mnist_dist.engine import train_step
from mnist_dist.schedule import build_schedule
from mnist_dist.train import build_model_and_optimizer

INIT_SCALE = 2.0**16


@pytest.fixture
def scaled(cpu_accelerator):
    cpu_accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(cpu_accelerator, TrainConfig(), lr=1e-3)
    assert optimizer.scaler is cpu_accelerator.scaler
    return cpu_accelerator, model, optimizer


def _batch(n: int = 16, poisoned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    if poisoned:
        images[0] = float("inf")  # one image: the loss and every gradient are not finite
    return images, labels


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    """Adam's step counter of every parameter (its bias correction depends on it)."""
    return {float(state["step"]) for state in optimizer.state.values()}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_finite_step_updates_the_weights_and_keeps_the_scale(grad_accum, scaled):
    accelerator, model, optimizer = scaled
    before = _weights(model)
    figures = train_step(model, optimizer, accelerator, *_batch(), 16, grad_accum)
    assert torch.isfinite(figures).all()
    after = _weights(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert not any(a.equal(b) for a, b in zip(after, before, strict=True))
    assert accelerator.scaler.get_scale() == INIT_SCALE  # grows only after 2000 good steps
    assert _adam_steps(optimizer) == {1.0}
    # The figures are of the unscaled loss: the scale never reaches the records.
    assert figures[0] < 16 * 10  # summed cross-entropy of 16 images, not times 65536


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_non_finite_step_is_skipped_and_halves_the_scale(grad_accum, scaled):
    accelerator, model, optimizer = scaled
    train_step(model, optimizer, accelerator, *_batch(), 16, grad_accum)  # Adam has state
    before = _weights(model)
    moments = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    figures = train_step(model, optimizer, accelerator, *_batch(poisoned=True), 16, grad_accum)
    assert not torch.isfinite(figures[0])  # the loop's check sees it at the next sync
    assert all(a.equal(b) for a, b in zip(_weights(model), before, strict=True))
    assert accelerator.scaler.get_scale() == INIT_SCALE / 2
    # Adam's state is untouched, its step counter included: the skipped step does not count.
    state = optimizer.state[next(model.parameters())]
    assert all(state[k].equal(v) for k, v in moments.items())
    assert _adam_steps(optimizer) == {1.0}
    # The next finite step trains again, at the halved scale.
    train_step(model, optimizer, accelerator, *_batch(), 16, grad_accum)
    assert not any(a.equal(b) for a, b in zip(_weights(model), before, strict=True))
    assert accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert _adam_steps(optimizer) == {2.0}


def test_the_lr_scheduler_counts_an_epoch_whose_only_step_was_skipped(scaled):
    """The scheduler is stepped by epoch: an epoch of one skipped step still ends with the
    scheduler's step, without torch's "scheduler before optimizer" warning, and the LR follows
    the milestones exactly (one decay per milestone, none for the skipped step)."""
    accelerator, model, optimizer = scaled
    scheduler = build_schedule(optimizer, OptimConfig(lr_milestones=(1, 2), lr_gamma=0.1))
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for poisoned in (True, False, True):  # three one-step "epochs"
            train_step(model, optimizer, accelerator, *_batch(poisoned=poisoned), 16, 1)
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-5])
    assert scheduler.last_epoch == 3
    assert accelerator.scaler.get_scale() == INIT_SCALE / 4
    assert _adam_steps(optimizer) == {1.0}  # one step was applied, two skipped
