"""Accuracy, loss and confusion matrix over a split, exact across ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object

from mnist_dist import faults


@dataclass
class Misclassified:
    """One test image the model got wrong."""

    index: int  # position in the evaluated split
    true_label: int
    predicted: int
    probabilities: list[float]  # softmax over the classes
    image: list[list[int]]  # 28x28 grey levels 0-255


@dataclass
class EvalResult:
    """Figures over every image of the evaluated split, all ranks together."""

    loss: float  # mean cross-entropy per image
    correct: int
    total: int
    confusion: list[list[int]]  # confusion[true][predicted]
    # The first ``max_misclassified`` wrong images of the split, in split order (main process).
    misclassified: list[Misclassified] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    num_classes: int = 10,
    max_misclassified: int = 0,
) -> EvalResult:
    """Evaluate this rank's shard and sum the counts over ranks (the shards are disjoint and
    unpadded, so every image counts once). With ``max_misclassified`` > 0 the first wrong
    images are gathered to the main process too (a host sync per batch)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    wrong: list[Misclassified] = []  # this rank's, indexed within its shard
    seen = 0
    for images, labels in batches:
        faults.point("eval.batch")
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
        if len(wrong) < max_misclassified:
            wrong += _misclassified(images, labels, logits, seen, max_misclassified - len(wrong))
        seen += len(labels)
    model.train(was_training)
    loss_sum, confusion = accelerator.reduce([loss_sum, confusion], reduction="sum")
    matrix = confusion.view(num_classes, num_classes)
    total = int(matrix.sum().item())
    merged: list[Misclassified] = []
    if max_misclassified > 0:  # every rank's examples, re-indexed within the whole split
        offset = 0
        for shard_size, examples in gather_object([(seen, wrong)]):  # in rank order, contiguous
            for example in examples:
                example.index += offset
            merged += examples
            offset += shard_size
    return EvalResult(
        loss=loss_sum.item() / total if total else float("nan"),
        correct=int(matrix.diagonal().sum().item()),
        total=total,
        confusion=matrix.tolist(),
        misclassified=merged[:max_misclassified],
    )


def _misclassified(
    images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, offset: int, limit: int
) -> list[Misclassified]:
    probabilities = logits.softmax(dim=1)
    predicted = probabilities.argmax(dim=1)
    rows = (predicted != labels).nonzero().flatten()[:limit].tolist()
    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).squeeze(1)
    return [
        Misclassified(
            index=offset + i,
            true_label=int(labels[i]),
            predicted=int(predicted[i]),
            probabilities=probabilities[i].tolist(),
            image=pixels[i].tolist(),
        )
        for i in rows
    ]
