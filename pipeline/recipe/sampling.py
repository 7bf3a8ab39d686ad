"""Seeded sampling: per-epoch random streams, global batches, and each process's shard of them.

Every draw of an epoch is made on the CPU from its own seeded stream, so it is the same on every
process and device; each rank takes its contiguous shard of every global batch, as a :class:`Batch`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from pipeline.errors import DataError

# one random stream per use, so turning one augmentation on leaves the others' draws unchanged
ORDER, FLIP, SHIFT, CUTOUT = "order", "flip", "shift", "cutout"


class Batch(NamedTuple):
    """One process's shard of a global batch: which samples, and the augmentation draws for each."""

    indices: torch.Tensor  # (B,) positions in the training split
    flip: torch.Tensor  # (B,) bool: mirror this image left-right (with train.hflip)
    shift: torch.Tensor  # (B, 2) (dy, dx) translation in pixels (with train.translate)
    cutout: torch.Tensor  # (B, 2) (row, col) centre of the erased square (with train.cutout)


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


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which samples (by index, not position) are flipped in ``epoch``: at random in epoch 0, then every other
    epoch each sample the other way, so that every image is seen both ways in any two epochs in a row."""
    first = torch.rand(n, generator=epoch_rng(seed, 0, FLIP)) < 0.5
    return first if epoch % 2 == 0 else ~first


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
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    max_shift: int = 0,
    cutout: int = 0,
    alternate_flip: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """This rank's :class:`Batch` of each global batch of ``batch_size`` of the epoch over ``n`` samples.

    Every global batch is cut into ``world`` equal contiguous shards, so the union over ranks is
    exactly the single-process batch. ``start`` skips the first steps, for resuming mid-epoch in
    exactly the same order. The epoch's draws are made on the CPU (the same on every device) and
    moved to ``device`` once, not once per step. ``alternate_flip`` flips by :func:`alternating_flips`.
    """
    local = local_batch(batch_size, world)
    order = epoch_order(n, seed, epoch)
    draws = Batch(
        order,
        alternating_flips(n, seed, epoch)[order] if alternate_flip else flip_mask(n, seed, epoch),
        shift_offsets(n, seed, epoch, max_shift),
        cutout_centers(n, seed, epoch, cutout),
    )
    draws = Batch(*(t.to(device) for t in draws))
    for step in range(start, steps_per_epoch(n, batch_size)):
        lo = step * batch_size + rank * local
        yield Batch(*(t[lo : lo + local] for t in draws))
