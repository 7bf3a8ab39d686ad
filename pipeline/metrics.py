"""Pure classification metrics, computed from (gathered) predictions and labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Predictions:
    """One entry per sample of a split, in the split's own order (CPU tensors)."""

    preds: torch.Tensor  # predicted class
    labels: torch.Tensor  # true class
    losses: torch.Tensor  # cross-entropy
    confidence: torch.Tensor  # the predicted class's softmax probability


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes) int64; row = true class, column = predicted class."""
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    flat = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: torch.Tensor, classes: Sequence[str]) -> dict:
    """Overall and per-class accuracy (keyed by class name), plus per-class support.

    A class with no samples gets accuracy 0.0 and support 0, so the keys never vary.
    """
    cm = cm.long()
    support = cm.sum(dim=1)
    correct = cm.diagonal()
    total = int(support.sum())
    per_class = {
        name: (round(int(c) / int(s), 6) if int(s) else 0.0)
        for name, c, s in zip(classes, correct, support, strict=True)
    }
    return {
        "accuracy": round(int(correct.sum()) / total, 6) if total else 0.0,
        "samples": total,
        "per_class_accuracy": per_class,
        "per_class_support": {name: int(s) for name, s in zip(classes, support, strict=True)},
    }
