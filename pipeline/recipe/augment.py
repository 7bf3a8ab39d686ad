"""Augmentation, at training and at test time, as small pure tensor functions on the batch's own device.

Training: :func:`augment` applies a :class:`~pipeline.recipe.sampling.Batch`'s seeded draws (flip,
translate, cutout) to its uint8 images. Test time: :func:`logits_of` averages a model's logits over
the views ``evaluate.tta`` names.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.params import TestTimeAugmentation, TrainParams
from pipeline.recipe.sampling import Batch


def batch_cutout(images: torch.Tensor, centers: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square around each image's centre (B, H, W); squares may leave the image."""
    if size == 0:
        return images
    _, h, w = images.shape
    top, left = centers[:, 0, None] - size // 2, centers[:, 1, None] - size // 2  # (B, 1)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top) & (rows < top + size)  # (B, H)
    in_cols = (cols >= left) & (cols < left + size)  # (B, W)
    return images.masked_fill(in_rows[:, :, None] & in_cols[:, None, :], 0)


def batch_flip_lr(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip the images whose ``mask`` entry is True along the width axis (B, H, W)."""
    return torch.where(mask[:, None, None], images.flip(-1), images)


def batch_translate(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move each image (B, H, W) by its (dy, dx) in ``shifts`` (B, 2), filling with zeros; one gather.

    ``|dy|, |dx| <= max_shift``. A positive dy moves the content down, a positive dx to the right.
    """
    if max_shift == 0:
        return images
    b, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # (B, H + 2m, W + 2m), zero border
    rows = max_shift - shifts[:, 0, None] + torch.arange(h, device=images.device)  # (B, H) source rows
    cols = max_shift - shifts[:, 1, None] + torch.arange(w, device=images.device)  # (B, W) source cols
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def augment(images: torch.Tensor, batch: Batch, cfg: TrainParams) -> torch.Tensor:
    """The training augmentation of one batch's images (B, H, W), with its draws: flip, translate, cutout."""
    if cfg.hflip:
        images = batch_flip_lr(images, batch.flip)
    return batch_cutout(batch_translate(images, batch.shift, cfg.translate), batch.cutout, cfg.cutout)


def logits_of(model: nn.Module, inputs: torch.Tensor, tta: TestTimeAugmentation = "none") -> torch.Tensor:
    """``model``'s float32 logits for ``inputs`` (N, C, H, W) under test-time augmentation ``tta``.

    ``flip`` averages them with the mirror image's; ``flip_shift`` (as airbench does) averages that half and half
    with the mean of the same for the image moved 1 px up-left and 1 px down-right (zero fill, as in training).
    """
    if tta == "none":
        return model(inputs).float()
    logits = (model(inputs).float() + model(inputs.flip(-1)).float()) / 2
    if tta == "flip_shift":
        moved = [logits_of(model, shifted(inputs, d), "flip") for d in (-1, 1)]
        logits = (logits + (moved[0] + moved[1]) / 2) / 2
    return logits


def shifted(inputs: torch.Tensor, d: int) -> torch.Tensor:
    """``inputs`` (N, C, H, W) moved by ``d`` pixels down and right (negative: up and left), filled with zeros."""
    padded = torch.nn.functional.pad(inputs, (abs(d),) * 4)
    h, w = inputs.shape[-2:]
    top = abs(d) - d
    return padded[..., top : top + h, top : top + w]
