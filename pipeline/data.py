"""Fashion-MNIST as tensors: IDX decoding, splits, seeded batching and augmentation.

Everything here is pure apart from :func:`load_split`, which reads ``data/raw``.
Images stay ``uint8`` (N, 28, 28) until :func:`to_input` turns a batch into floats
on whatever device it already lives on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import DataError

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# name -> (sha256 of the decompressed file, size in bytes); shared/FACTS.md
FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: torch.uint8}


def parse_idx(buf: bytes, name: str = "IDX data") -> torch.Tensor:
    """Decode an IDX file (unsigned bytes only) into a uint8 tensor of its declared shape.

    Raises:
        DataError: bad magic, unsupported element type, or a size that does not match the header.
    """
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic); run `dvc repro download` to fetch it again")
    dtype_code, ndim = buf[2], buf[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{name} has IDX element type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{name} is truncated inside its IDX header; run `dvc repro download`")
    shape = struct.unpack(f">{ndim}I", buf[4:header])
    expected = header
    count = 1
    for d in shape:
        count *= d
    expected += count
    if len(buf) != expected:
        raise DataError(
            f"{name} holds {len(buf) - header} data bytes but its header {tuple(shape)} needs {count}; "
            "run `dvc repro download`"
        )
    data = torch.frombuffer(bytearray(buf[header:]), dtype=torch.uint8)
    return data.reshape(shape)


@dataclass(frozen=True)
class Split:
    """Images (N, 28, 28) uint8 and labels (N,) int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


def load_split(raw_dir: str | Path, split: str, subset: int = 0) -> Split:
    """Read ``split`` ("train" or "test") from the IDX files in ``raw_dir``.

    ``subset`` > 0 keeps the first ``subset`` samples.
    """
    raw_dir = Path(raw_dir)
    images_name, labels_name = SPLIT_FILES[split]
    tensors = []
    for fname in (images_name, labels_name):
        path = raw_dir / fname
        try:
            buf = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"data file {path} is missing; run `dvc repro download`") from None
        tensors.append(parse_idx(buf, str(path)))
    images, labels = tensors
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{raw_dir}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match; "
            "run `dvc repro download`"
        )
    if int(labels.max()) >= len(CLASSES):
        raise DataError(f"{raw_dir / labels_name} has label {int(labels.max())}; Fashion-MNIST has 10 classes")
    out = Split(images, labels.long())
    return out.take(slice(0, subset)) if subset > 0 else out


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carve a seeded random validation split of ``val_size`` samples out of ``train``."""
    if not 1 <= val_size < len(train):
        raise DataError(
            f"data.val_size ({val_size}) must be at least 1 and less than the {len(train)} training samples"
            " (see data.subset)"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return train.take(train_idx), train.take(val_idx)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1]; normalisation lives in the model."""
    return images.unsqueeze(1).float().div_(255.0)


# one random stream per use, so turning one augmentation on leaves the others' draws unchanged
ORDER, FLIP, SHIFT, CUTOUT = 0, 7_919, 104_729, 15_485_863


def epoch_rng(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The CPU generator of ``stream`` for ``epoch``: the same on every process."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + stream * 100_003)


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
    if batch_size % world:
        raise DataError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    local = batch_size // world
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
