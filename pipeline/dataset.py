"""The Fashion-MNIST dataset: its manifest (file names, digests, classes), IDX decoding and splits.

Pure apart from :func:`load_split`, which reads ``data/raw``. torch is imported only inside the
functions that make tensors, so the download stage, which needs just the manifest, never loads it.
Images stay ``uint8`` (N, 28, 28); :func:`to_input` turns a batch into the models' float input.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataError, path_problem

if TYPE_CHECKING:
    import torch

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

# name -> (sha256 of the decompressed file, size in bytes): the published files, which every source must match
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
UNSIGNED_BYTE = 0x08  # the only IDX element type Fashion-MNIST uses


def parse_idx(buf: bytes, name: str = "IDX data") -> torch.Tensor:
    """Decode an IDX file (unsigned bytes only) into a uint8 tensor of its declared shape.

    Raises:
        DataError: bad magic, unsupported element type, or a size that does not match the header.
    """
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic); run `dvc repro download` to fetch it again")
    dtype_code, ndim = buf[2], buf[3]
    if dtype_code != UNSIGNED_BYTE:
        raise DataError(f"{name} has IDX element type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{name} is truncated inside its IDX header; run `dvc repro download`")
    shape = struct.unpack(f">{ndim}I", buf[4:header])
    count = math.prod(shape)
    if len(buf) != header + count:
        raise DataError(
            f"{name} holds {len(buf) - header} data bytes but its header {tuple(shape)} needs {count}; "
            "run `dvc repro download`"
        )
    import torch

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


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1]; normalisation lives in the model."""
    return images.unsqueeze(1).float().div_(255.0)


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
        except OSError as e:  # a file where the folder should be, a folder where a file should be, no permission
            raise DataError(f"data: {path_problem(e, 'pass another --data')}") from None
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
    import torch

    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return train.take(train_idx), train.take(val_idx)
