"""Seeded batching and augmentation: per-epoch random streams, rank shards, and small pure tensor functions.

Every draw of an epoch is made on the CPU from its own seeded stream, so it is the same on every
process and device; each rank takes its contiguous shard of every global batch. :func:`to_input`
turns a uint8 batch into floats on whatever device it already lives on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from pipeline.errors import DataError


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1]; normalisation lives in the model."""
    return images.unsqueeze(1).float().div_(255.0)


# one random stream per use, so turning one augmentation on leaves the others' draws unchanged
ORDER, FLIP, SHIFT, CUTOUT = "order", "flip", "shift", "cutout"


def epoch_rng(seed: int, epoch: int, stream: str) -> torch.Generator:
    """The CPU generator of ``stream`` for ``epoch``: the same on every process.

    Its seed is a hash of all three, so no two (seed, epoch, stream) share a sequence: with a
    linear mix, one seed's flips would be another seed's data order.
    """
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of ``range(n)``, the same on every process."""
    return torch.randperm(n, generator=epoch_rng(seed, epoch, ORDER))


def flip_mask(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which positions of the epoch's order get a horizontal flip; independent of the process count."""
    return torch.rand(n, generator=epoch_rng(seed, epoch, FLIP)) < 0.5


def shift_offsets(n: int, seed: int, epoch: int, max_shift: int) -> torch.Tensor:
    """(n, 2) random (dy, dx) translations in ``[-max_shift, max_shift]`` per position of the epoch's order."""
    if max_shift == 0:
        return torch.zeros(n, 2, dtype=torch.long)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=epoch_rng(seed, epoch, SHIFT))


def cutout_centers(n: int, seed: int, epoch: int, size: int, image_size: int = 28) -> torch.Tensor:
    """(n, 2) random (row, col) centres of the erased square per position of the epoch's order."""
    if size == 0:
        return torch.zeros(n, 2, dtype=torch.long)
    return torch.randint(0, image_size, (n, 2), generator=epoch_rng(seed, epoch, CUTOUT))


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


def augment(
    images: torch.Tensor,
    flip: torch.Tensor,
    shift: torch.Tensor,
    centers: torch.Tensor,
    hflip: bool,
    max_shift: int,
    cutout: int,
) -> torch.Tensor:
    """The training augmentation of one batch (B, H, W) on its own device: flip, translate, cutout."""
    if hflip:
        images = batch_flip_lr(images, flip)
    return batch_cutout(batch_translate(images, shift, max_shift), centers, cutout)


def local_batch(batch_size: int, world: int) -> int:
    """Each process's share of the global batch; the global batch must split evenly."""
    if batch_size % world:
        raise DataError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    return batch_size // world


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full global batches per epoch; the ragged tail of each epoch's order is dropped."""
    return n // batch_size


def rank_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    start: int = 0,
    max_shift: int = 0,
    cutout: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (indices, flip, shift, cutout centre) for this rank's share of each global batch of the epoch.

    Every global batch of ``batch_size`` is cut into ``world`` equal contiguous shards, so
    the union over ranks is exactly the single-process batch. ``start`` skips the first
    steps, for resuming mid-epoch in exactly the same order. The epoch's draws are made on
    the CPU (the same on every device) and moved to ``device`` once, not once per step.
    """
    local = local_batch(batch_size, world)
    order, flips, shifts, centers = (
        t.to(device)
        for t in (
            epoch_order(n, seed, epoch),
            flip_mask(n, seed, epoch),
            shift_offsets(n, seed, epoch, max_shift),
            cutout_centers(n, seed, epoch, cutout),
        )
    )
    for step in range(start, steps_per_epoch(n, batch_size)):
        lo = step * batch_size + rank * local
        yield order[lo : lo + local], flips[lo : lo + local], shifts[lo : lo + local], centers[lo : lo + local]
