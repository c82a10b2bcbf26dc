"""Accuracy, loss and confusion matrix over a split, exact across ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator


@dataclass
class EvalResult:
    """Figures over every image of the evaluated split, all ranks together."""

    loss: float  # mean cross-entropy per image
    correct: int
    total: int
    confusion: list[list[int]]  # confusion[true][predicted]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    num_classes: int = 10,
) -> EvalResult:
    """Evaluate this rank's shard and sum the counts over ranks.

    Each rank holds a disjoint, unpadded shard of the split, so summing per-rank counts counts
    every image exactly once (the padding that ``even_batches`` adds to prepared loaders, and
    that ``gather_for_metrics`` must drop, never arises). Counts stay on the device until the
    one reduction at the end.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    model.train(was_training)
    loss_sum, confusion = accelerator.reduce([loss_sum, confusion], reduction="sum")
    matrix = confusion.view(num_classes, num_classes)
    total = int(matrix.sum().item())
    return EvalResult(
        loss=loss_sum.item() / total if total else float("nan"),
        correct=int(matrix.diagonal().sum().item()),
        total=total,
        confusion=matrix.tolist(),
    )
