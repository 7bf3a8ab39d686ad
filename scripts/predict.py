"""Classify images with a trained model: ``python -m scripts.predict [--model-dir models] IMAGE... | --idx N...``.

The smallest honest "use the model" path. It rebuilds the model from its artifact
(safetensors + architecture JSON, no pickle) and prints the top-k classes with
probabilities for each input:

    python -m scripts.predict shirt.png boot.jpg        # image files, any size: grey, 28x28
    python -m scripts.predict --idx 0 1 2               # test-set samples from data/raw
    python -m scripts.predict --idx 0 --top-k 3

Images are read like Fashion-MNIST: light garment on a dark background. Pass
``--invert`` for photos of dark items on a light background.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from pipeline.batches import to_input
from pipeline.dataset import CLASSES, load_split
from pipeline.errors import DataError, cli
from pipeline.model import ModelConfig, artifact_info, load_artifact

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Print the top-k Fashion-MNIST classes for images or test samples.")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...) to classify")
    p.add_argument("--idx", type=int, nargs="+", metavar="N", help="classify test-set samples N... instead")
    p.add_argument("--model-dir", default="models", help="model artifact folder (default: %(default)s)")
    p.add_argument("--data", default="data/raw", help="IDX folder, for --idx (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes to print per input (default: %(default)s)")
    p.add_argument("--invert", action="store_true", help="invert image files (dark item on light background)")
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.idx):
        p.error("give image files or --idx, not both or neither")
    if not 1 <= args.top_k <= len(CLASSES):
        p.error(f"--top-k must be between 1 and {len(CLASSES)}")
    return args


MAX_PIXELS = 40_000_000  # a photo of 40 megapixels is fine; a decompression bomb is refused before decoding


def read_image(path: Path, cfg: ModelConfig, invert: bool) -> torch.Tensor:
    """A file as uint8 (H, W) at the model's input size, greyscale."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise DataError(f"image {path} does not exist")
    if not path.is_file():  # a folder, a FIFO or a device would hang or fail inside PIL
        raise DataError(f"{path} is not a regular file")
    refused = f"images over {MAX_PIXELS // 10**6} megapixels are refused"
    try:
        with warnings.catch_warnings():  # the size is checked here, before anything is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size  # from the header
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path} is {width}x{height}; {refused}")
                grey = im.convert("L").resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:  # so large that PIL will not even read its header
        raise DataError(f"{path} is over {2 * (Image.MAX_IMAGE_PIXELS or 0) // 10**6} megapixels; {refused}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path} is not an image PIL can read ({e})") from None
    t = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(cfg.image_size, cfg.image_size)
    return 255 - t if invert else t


def top_k(model: torch.nn.Module, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices), each (N, k), best first."""
    with torch.no_grad():
        probs = model(to_input(images)).softmax(dim=1)
    return probs.topk(k, dim=1)


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, cfg = load_artifact(args.model_dir)
    model.eval()
    names_of = artifact_info(args.model_dir)["classes"]  # the artifact names its own classes
    if args.idx:
        test = load_split(args.data, "test")
        bad = [i for i in args.idx if not 0 <= i < len(test)]
        if bad:
            raise DataError(
                f"--idx {bad[0]} is out of range; the test set has {len(test)} samples (0..{len(test) - 1})"
            )
        images = test.images[args.idx]
        names = [f"test[{i}] (true: {names_of[int(test.labels[i])]})" for i in args.idx]
    else:
        images = torch.stack([read_image(Path(p), cfg, args.invert) for p in args.images])
        names = list(args.images)
    probs, indices = top_k(model, images, args.top_k)
    for name, p_row, c_row in zip(names, probs, indices, strict=True):
        ranked = ", ".join(f"{names_of[int(c)]} {float(p):.3f}" for p, c in zip(p_row, c_row, strict=True))
        print(f"{name}: {ranked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
