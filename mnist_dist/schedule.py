"""The LR schedule, the one place that builds, steps, saves and restores it: Adam's LR
multiplied by ``--lr-gamma`` after each of ``--lr-milestones`` (MultiStepLR), stepped once per
epoch. Another schedule changes this module and its options in ``OptimConfig``.

We step the scheduler ourselves and never ``prepare`` it: a prepared scheduler steps once per
process (huggingface/accelerate#2926). A captured step keeps each LR in a device tensor that
the graph reads (``engine.lr_tensor``); torch's schedulers fill it in place.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from mnist_dist.config import OptimConfig
from mnist_dist.engine import lr_value, stepped_optimizer


def build_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> LRScheduler:
    """The per-epoch schedule of a prepared ``optimizer``.

    torch wraps the ``step`` of the optimizer it is given, to warn when the scheduler steps
    before the optimizer; it must wrap the ``step`` that the training step calls
    (``stepped_optimizer``). With fp16's scaler that is ``AcceleratedOptimizer.step``, which
    replaces the inner optimizer's ``step`` during each call and then restores the method it
    saved in ``prepare``, from before any scheduler existed: a wrapper put on the inner
    optimizer is gone after the first step, and torch warns that
    "``optimizer.step()`` has been overridden after learning rate scheduler
    initialization".
    """
    return MultiStepLR(
        stepped_optimizer(optimizer), milestones=list(optim.lr_milestones), gamma=optim.lr_gamma
    )


def current_lr(schedule: LRScheduler) -> float:
    """The LR of the first parameter group (a host sync under a captured step: read it only
    where the loop syncs anyway)."""
    return lr_value(schedule.optimizer.param_groups[0]["lr"])


def schedule_state(schedule: LRScheduler) -> dict[str, Any]:
    """What a checkpoint keeps of ``schedule``: its position and LRs, as JSON."""
    return {
        "last_epoch": schedule.last_epoch,
        "_last_lr": [lr_value(lr) for lr in schedule.get_last_lr()],
    }


def restore_schedule(schedule: LRScheduler, saved: dict[str, Any], branch: bool) -> None:
    """Put ``schedule`` where ``schedule_state`` left it; the optimizer's LRs come back with
    the checkpoint. A ``branch`` follows its own settings instead: from the base LRs, the same
    steps as a run that trained with them from the start, so the same LRs bit for bit."""
    if not branch:
        schedule.load_state_dict({**schedule.state_dict(), **saved})
        return
    for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
        group["initial_lr"], group["lr"] = base, base
    with warnings.catch_warnings():  # torch warns of a step before the optimizer's first
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(saved["last_epoch"]):
            schedule.step()
