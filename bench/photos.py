"""How predict reads real photos: test images rendered as product photos, classified with and without ``--photo``.

    python -m bench.photos [--model-dir models] [--data data/raw] [--samples 2000] [--out FILE.json]

Each test image becomes a "photo" as a user would take one (:func:`render_photo`): negated (a dark item on a
light background, as Fashion-MNIST's product photos were before its conversion), enlarged 10-16 times with a
smooth filter, placed off-centre on a light 640 x 480 canvas, with mild noise, and saved as a JPEG. The report
gives the model's accuracy on the 28 x 28 originals, on the photos read with ``--photo``, and on the photos
letterboxed with ``--invert`` (predict's default reading, told that the background is light).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.dataset import load_split
from pipeline.errors import cli
from pipeline.files import write_json
from pipeline.model import load_artifact
from pipeline.predict import read_image, top_k

CANVAS = (640, 480)  # a phone photo's shape, scaled down
PAPER = 235  # the light background's grey
NOISE = 3.0  # the sensor noise's standard deviation, in grey levels
JPEG_QUALITY = 85


def render_photo(image: torch.Tensor, rng: random.Random) -> Image.Image:
    """A 28 x 28 uint8 Fashion-MNIST image as a photo of the item: see the module's docstring."""
    scale = rng.randint(10, 16)
    item = Image.fromarray(255 - image.numpy()).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    canvas = Image.new("L", CANVAS, PAPER)
    left, top = rng.randint(0, CANVAS[0] - item.width), rng.randint(0, CANVAS[1] - item.height)
    dark = Image.fromarray(np.minimum(np.asarray(item), PAPER).astype(np.uint8))  # the item's own light is paper
    canvas.paste(dark, (left, top))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, NOISE, (CANVAS[1], CANVAS[0]))
    noisy = np.clip(np.asarray(canvas, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Image.open(io.BytesIO(buffer.getvalue()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accuracy of predict on test images rendered as photos.")
    p.add_argument("--model-dir", default="models", help="model artifact folder (default: %(default)s)")
    p.add_argument("--data", default="data/raw", help="IDX folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2000, help="the first N test images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the renderings' random seed (default: %(default)s)")
    p.add_argument("--out", type=Path, help="also write the report to this JSON file")
    return p.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, cfg = load_artifact(args.model_dir)
    model.eval()
    test = load_split(args.data, "test", args.samples)
    rng = random.Random(args.seed)
    read: dict[str, list[torch.Tensor]] = {"photo": [], "letterbox_invert": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(test.images):
            path = Path(tmp) / f"{i}.jpg"
            render_photo(image, rng).save(path)  # the JPEG's own bytes, copied as a user's file would be
            read["photo"].append(read_image(path, cfg, invert=False, photo=True))
            read["letterbox_invert"].append(read_image(path, cfg, invert=True))
    report = {"samples": len(test), "seed": args.seed, "model_dir": str(args.model_dir)}
    for name, images in {"original_28x28": test.images, **{k: torch.stack(v) for k, v in read.items()}}.items():
        preds = top_k(model, images, 1)[1][:, 0]
        report[f"accuracy_{name}"] = round(float((preds == test.labels).float().mean()), 4)
    print(json.dumps(report, indent=1))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
