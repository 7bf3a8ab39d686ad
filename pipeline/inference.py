"""Distributed inference: every sample's prediction exactly once, whatever the number of processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.dataset import Split, to_input
from pipeline.metrics import Predictions
from pipeline.params import TestTimeAugmentation
from pipeline.recipe.augment import logits_of


def eval_loader(split: Split, batch_size: int) -> DataLoader:
    """A loader over ``split`` (with sample indices) in its stored order; prepare it so each process gets a shard."""
    dataset = TensorDataset(torch.arange(len(split)), split.images, split.labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def predict(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, tta: TestTimeAugmentation = "none"
) -> Predictions:
    """Predictions for every sample exactly once, whatever the number of processes.

    ``loader`` must be prepared; ``gather_for_metrics`` drops the duplicates that pad
    the last batch across processes.
    """
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    for i, images, y in loader:
        logits = logits_of(model, to_input(images), tta)
        loss = nn.functional.cross_entropy(logits, y, reduction="none")
        confidence, p = logits.softmax(dim=1).max(dim=1)
        parts.append(tuple(t.cpu() for t in accelerator.gather_for_metrics((i, p, y, loss, confidence))))
    index, preds, labels, losses, confidence = (torch.cat(column) for column in zip(*parts, strict=True))
    order = index.argsort()
    return Predictions(preds[order], labels[order], losses[order], confidence[order])
