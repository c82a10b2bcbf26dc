"""The LR schedule (MultiStepLR, stepped once per epoch, never prepared: ``make_accelerator``
says why): the one place that builds, saves and restores it."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from mnist_dist.config import OptimConfig
from mnist_dist.engine import lr_value, stepped_optimizer


def build_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> LRScheduler:
    """The per-epoch schedule of a prepared ``optimizer``."""
    # torch wraps the optimizer's step to warn of a scheduler step before it: it must wrap the
    # step the training step calls. With fp16's scaler, AcceleratedOptimizer.step swaps the
    # inner step per call and restores the one from before the scheduler, so a wrapper on the
    # inner optimizer would be lost and torch would warn "optimizer.step() has been overridden".
    return MultiStepLR(
        stepped_optimizer(optimizer), milestones=list(optim.lr_milestones), gamma=optim.lr_gamma
    )


def current_lr(schedule: LRScheduler) -> float:
    """The LR of the first parameter group (a host sync under a captured step)."""
    return lr_value(schedule.optimizer.param_groups[0]["lr"])


def schedule_state(schedule: LRScheduler) -> dict[str, Any]:
    """What a checkpoint keeps of ``schedule``: its position and LRs, as JSON."""
    return {
        "last_epoch": schedule.last_epoch,
        "_last_lr": [lr_value(lr) for lr in schedule.get_last_lr()],
    }


def restore_schedule(schedule: LRScheduler, saved: dict[str, Any], branch: bool) -> None:
    """Put ``schedule`` where ``schedule_state`` left it. A ``branch`` replays its own
    settings' steps from the base LRs instead: the same LRs, bit for bit, as from the start."""
    if not branch:
        schedule.load_state_dict({**schedule.state_dict(), **saved})
        return
    for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
        group["initial_lr"], group["lr"] = base, base
    with warnings.catch_warnings():  # torch warns of a step before the optimizer's first
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(saved["last_epoch"]):
            schedule.step()
