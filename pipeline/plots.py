"""Pictures and plot data for `dvc plots`: labelled image grids and per-sample tables.

Pure functions of tensors; the stages decide where the results are written.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.metrics import Predictions


def label_grid(images: torch.Tensor, captions: Sequence[str], cols: int = 8, scale: int = 3) -> Image.Image:
    """A grid of uint8 (N, H, W) images, each enlarged ``scale`` times with its caption under it.

    Captions may hold several lines ("\n"); the second and later lines are drawn in red.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    h, w = (images.shape[1], images.shape[2]) if len(images) else (28, 28)
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    cell_w, cell_h = w * scale + 8, h * scale + 8 + 12 * lines
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 2
        tile = Image.fromarray(image.cpu().numpy(), mode="L").resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas.paste(tile.convert("RGB"), (x, y))
        for j, text in enumerate(caption.split("\n")):
            colour = (0, 0, 0) if j == 0 else (200, 0, 0)
            draw.text((x, y + h * scale + 2 + 12 * j), text[: cell_w // 6], fill=colour, font=font)
    return canvas


def misclassified(
    images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, classes: Sequence[str], limit: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """The first ``limit`` wrongly predicted samples, captioned "true class" over "-> predicted class"."""
    wrong = (preds != labels).nonzero().flatten()[:limit]
    captions = [f"{classes[int(labels[i])]}\n-> {classes[int(preds[i])]}" for i in wrong]
    return images[wrong], captions


def first_of_each_class(images: torch.Tensor, labels: torch.Tensor, per_class: int = 4) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of each class, class by class."""
    picks = [(labels == k).nonzero().flatten()[:per_class] for k in range(int(labels.max()) + 1)]
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def write_predictions_csv(path: Path, got: Predictions, classes: Sequence[str]) -> None:
    """One row per test sample: its index in the test set, actual and predicted class names (DVC's confusion
    template reads these two), and the predicted class's probability (to sort by confidence)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "actual", "predicted", "probability"])
        rows = zip(got.labels.tolist(), got.preds.tolist(), got.confidence.tolist(), strict=True)
        out.writerows((i, classes[a], classes[p], f"{c:.6f}") for i, (a, p, c) in enumerate(rows))


def write_per_class_csv(path: Path, per_class_accuracy: dict[str, float]) -> None:
    """One row per class: its test accuracy (for a sorted bar chart)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "accuracy"])
        out.writerows(per_class_accuracy.items())
