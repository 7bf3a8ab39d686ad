"""Classify images with a trained model: ``fashion-predict [--model-dir models] INPUT... | --idx N...``.

The smallest honest "use the model" path. It rebuilds the model from its artifact
(safetensors + architecture JSON, no pickle) and prints the top-k classes with
probabilities for each input, or writes them to a CSV or JSON file:

    fashion-predict shirt.png boot.jpg        # image files, any size: grey, letterboxed to 28x28
    fashion-predict photos/ "shots/*.jpg"     # every image in a folder; a glob (quoted or not)
    fashion-predict photos/ --out preds.csv   # or preds.json: the top-k of each input
    fashion-predict --idx 0 1 2               # test-set samples from data/raw
    fashion-predict --idx 0 1 2 --onnx        # the same, run by onnxruntime from onnx/model.onnx (no torch model)

Images are read like Fashion-MNIST: light garment on a dark background. Pass
``--invert`` for photos of dark items on a light background. A non-square image is
letterboxed (padded with the background, never stretched) before it is resized. Every PIL
mode is read as the 8-bit grey picture it shows (:func:`to_grey`): 16- and 32-bit and float
greys scaled, transparency composited over that same background.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.dataset import CLASSES, load_split, to_input
from pipeline.errors import DataError, ModelArtifactError, cli
from pipeline.files import check_outputs, write_text
from pipeline.model import ModelConfig, artifact_info, load_artifact
from pipeline.onnx_model import ONNX_FILE, Logits, open_session, read_spec, session_logits

if TYPE_CHECKING:
    from PIL import Image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Print the top-k Fashion-MNIST classes for images or test samples.")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...), folders of them, or globs to classify")
    p.add_argument("--idx", type=int, nargs="+", metavar="N", help="classify test-set samples N... instead")
    p.add_argument("--model-dir", help="model artifact folder (default: models)")
    p.add_argument("--onnx", type=Path, nargs="?", const=Path("onnx", ONNX_FILE), metavar="PATH",
                   help=f"run this ONNX file with onnxruntime instead, its spec (.json) beside it; builds no torch "
                   f"model (PATH defaults to onnx/{ONNX_FILE}, written by `dvc repro export`)")  # fmt: skip
    p.add_argument("--data", default="data/raw", help="IDX folder, for --idx (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes to print per input (default: %(default)s)")
    p.add_argument("--invert", action="store_true", help="invert image files (dark item on light background)")
    p.add_argument("--photo", action="store_true", help="convert photos as Fashion-MNIST's images were made: trim "
                   "the background, resize, sharpen, centre, and negate a light background")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the results to this .csv or .json file instead of printing them")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix not in (".csv", ".json"):
        p.error(f"--out {args.out}: give a .csv or .json file")
    if args.photo and args.invert:
        p.error("--photo negates a light background itself; drop --invert")
    if args.onnx is not None and args.onnx.suffix != ".onnx":  # `--onnx shirt.png` took the image as its PATH
        p.error(f"--onnx {args.onnx}: give an .onnx file, or put --onnx after the images")
    if bool(args.images) == bool(args.idx):
        p.error("give image files or --idx, not both or neither")
    if args.onnx is not None and args.model_dir is not None:
        p.error("--onnx runs the ONNX file and reads no model folder; drop --model-dir")
    if not 1 <= args.top_k <= len(CLASSES):
        p.error(f"--top-k must be between 1 and {len(CLASSES)}")
    return args


MAX_PIXELS = 40_000_000  # a photo of 40 megapixels is fine; a decompression bomb is refused before decoding
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expand_inputs(args: list[str]) -> list[Path]:
    """Files as given; a folder as the image files in it, sorted; a glob (a pattern no file is named) as its
    matches, sorted. A folder without images, or a glob that matches nothing, is an error."""
    paths: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif not path.exists() and glob.has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg))
            if not matches:
                raise DataError(f"{arg} matches no file")
            paths += matches
        else:
            paths.append(path)
    return paths


def white_level(im: Image.Image) -> tuple[int, bool]:
    """The sample value that is white in a 16- or 32-bit grey, and whether Pillow hands its samples back wrapped.

    From the file's own bits per sample where it declares them (TIFF: ``2**bits - 1``, or ``2**(bits - 1) - 1``
    for signed samples); 65535 for every other file, since PNG, PGM/PPM and the rest hold at most 16-bit greys
    (and Pillow scales a PGM's ``maxval`` to 65535). Unsigned 32-bit samples come back as signed ones: wrapped.
    """
    tags = getattr(im, "tag_v2", {})
    if 258 not in tags:  # BitsPerSample
        return 65535, False
    bits, signed = tags[258][0], tags.get(339, (1,))[0] == 2  # SampleFormat 2: signed integers
    return 2 ** (bits - 1 if signed else bits) - 1, bits == 32 and not signed


def scaled_grey(im: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer grey (``I;16*``, ``I``) or a float one (``F``) as 8-bit, rounded: 0 is black, and
    :func:`white_level` (integers) or 1.0 (floats, as the model's own inputs are scaled) is white.

    Raises:
        ValueError: a sample is not finite or lies outside that range; it is refused, not clipped.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(im).astype(np.float64)
    white, wrapped = (1, False) if im.mode == "F" else white_level(im)
    if wrapped:
        values[values < 0] += 2.0**32
    if not (np.isfinite(values).all() and 0 <= values.min() and values.max() <= white):
        raise ValueError(
            f"its {im.mode} samples run {values.min():g} to {values.max():g}; black is 0 and white is {white}"
        )
    return Image.fromarray(np.rint(values * (255 / white)).astype(np.uint8))


def to_grey(im: Image.Image, background: int) -> Image.Image:
    """``im``, in any PIL mode, as the 8-bit grey (mode ``L``) picture it shows.

    16- and 32-bit integer and float greys are scaled by :func:`scaled_grey`. Transparency (``LA``, ``RGBA``,
    ``PA``, or ``P``, ``L`` or ``RGB`` with a transparent colour) is composited over ``background``. Every other
    mode (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ...) takes PIL's conversion (ITU-R 601-2 luma).

    Raises:
        ValueError: samples :func:`scaled_grey` refuses, or a mode PIL cannot convert to grey (``LAB``).
    """
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        return scaled_grey(im)
    if "transparency" in im.info or im.getbands()[-1] in ("A", "a"):
        rgba = im.convert("RGBA")
        grey = Image.new("L", im.size, background)
        grey.paste(rgba.convert("L"), mask=rgba.getchannel("A"))
        return grey
    return im.convert("L")


# Fashion-MNIST's own conversion of its product photos (the dataset's README): pixels within 5 % of the
# corners' colour are background and trimmed away; the sharpening is a Gaussian of radius and sigma 1
TRIM = 0.05


def letterbox(grey: Image.Image, size: int, invert: bool) -> Image.Image:
    """``grey`` padded to a square with its background (never stretched) and resized to ``size``; ``invert``
    reads a dark item on a light background (the background is taken as white, then everything negated)."""
    from PIL import Image, ImageOps

    square = ImageOps.pad(grey, (size, size), Image.Resampling.BILINEAR, color=255 if invert else 0)
    return ImageOps.invert(square) if invert else square


def photo_view(grey: Image.Image, size: int) -> Image.Image:
    """A photo of one item as Fashion-MNIST's conversion made its images: the background (the corners'
    median colour, within :data:`TRIM`) trimmed away, the longest edge resized to ``size`` (Lanczos),
    sharpened, centred on a square of the background, and negated when the background is light, so that the
    item comes out light on black (the background's grey level mapped to black, as a white one is by the
    negation). Noise specks do not stop the trim (it looks at a median-filtered copy)."""
    from PIL import Image, ImageChops, ImageFilter, ImageOps

    w, h = grey.size
    corners = [grey.getpixel(p) for p in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
    background = sorted(int(c) for c in corners if isinstance(c, int | float))[1]  # mode L: one int each
    smooth = grey.filter(ImageFilter.MedianFilter(5)) if min(w, h) >= 5 else grey
    away = ImageChops.difference(smooth, Image.new("L", grey.size, background)).point(
        lambda v: 255 if v > TRIM * 255 else 0
    )
    item = grey.crop(away.getbbox() or (0, 0, w, h))
    scale = size / max(item.size)
    shape = (max(1, round(item.width * scale)), max(1, round(item.height * scale)))
    item = item.resize(shape, Image.Resampling.LANCZOS).filter(ImageFilter.UnsharpMask(1, 100, 0))
    square = Image.new("L", (size, size), background)
    square.paste(item, ((size - item.width) // 2, (size - item.height) // 2))
    if background > 127:
        square, background = ImageOps.invert(square), 255 - background
    return square.point(lambda v: max(0, round((v - background) * 255 / (255 - background))))  # background: black


def read_image(path: Path, cfg: ModelConfig, invert: bool, photo: bool = False) -> torch.Tensor:
    """A file as uint8 (H, W) at the model's input size, greyscale: letterboxed (padded, not stretched), or with
    ``photo`` as Fashion-MNIST's conversion made its images (:func:`photo_view`)."""
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
                background = 255 if invert or photo else 0  # transparency: a light background for a photo
                grey = to_grey(im, background)
                size = cfg.image_size
                grey = photo_view(grey, size) if photo else letterbox(grey, size, invert)
    except Image.DecompressionBombError:  # so large that PIL will not even read its header
        raise DataError(f"{path} is over {2 * (Image.MAX_IMAGE_PIXELS or 0) // 10**6} megapixels; {refused}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path} is not an image PIL can read ({e})") from None
    except ValueError as e:
        raise DataError(f"{path} cannot be read as a grey picture: {e}") from None
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(cfg.image_size, cfg.image_size)


def top_k(model: Logits, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices), each (N, k), best first, of uint8 ``images`` (N, H, W)."""
    with torch.no_grad():
        probs = model(to_input(images)).softmax(dim=1)
    return probs.topk(k, dim=1)


def classifier(args: argparse.Namespace) -> tuple[Logits, ModelConfig, list[str], str]:
    """The model to run, its architecture (for the input size), its class names and where it came from: the
    torch model rebuilt from ``--model-dir``, or with ``--onnx`` an onnxruntime session (no torch model built)."""
    if args.onnx is not None:
        cfg, classes = read_spec(args.onnx)
        return session_logits(open_session(args.onnx)), cfg, classes, str(args.onnx)
    model_dir = args.model_dir or "models"
    model, cfg = load_artifact(model_dir)
    classes = artifact_info(model_dir)["classes"]  # the artifact names its own classes
    return model.eval(), cfg, classes, model_dir


def refuse_non_finite(probs: torch.Tensor, names: list[str], model_dir: str) -> None:
    """No finite number, no output: a NaN or infinite probability is the model's failure, never a prediction."""
    bad = (~probs.isfinite()).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ModelArtifactError(
            f"model {model_dir} gives NaN or infinite probabilities for {names[bad[0]]} ({len(bad)} of {len(names)} "
            "inputs); retrain: dvc repro --force train"
        )


def rows_of(names: list[str], probs: torch.Tensor, indices: torch.Tensor, classes: list[str]) -> list[dict]:
    """One row per input: its name and its top-k classes, best first, with their probabilities."""
    return [
        {"input": name, "top": [{"class": classes[int(c)], "probability": round(float(p), 6)}
                                for p, c in zip(p_row, c_row, strict=True)]}
        for name, p_row, c_row in zip(names, probs, indices, strict=True)
    ]  # fmt: skip


def as_csv(rows: list[dict]) -> str:
    """``input, class_1, probability_1, ..., class_k, probability_k``, one line per input."""
    k = len(rows[0]["top"])
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["input", *(f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "probability"))])
    out.writerows([r["input"], *(v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}"))] for r in rows)
    return buffer.getvalue()


def inputs(args: argparse.Namespace, cfg: ModelConfig, classes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The images to classify, uint8 (N, H, W), and a name for each."""
    if not args.idx:
        paths = expand_inputs(args.images)
        return torch.stack([read_image(p, cfg, args.invert, args.photo) for p in paths]), [str(p) for p in paths]
    test = load_split(args.data, "test")
    bad = [i for i in args.idx if not 0 <= i < len(test)]
    if bad:
        raise DataError(f"--idx {bad[0]} is out of range; the test set has {len(test)} samples (0..{len(test) - 1})")
    return test.images[args.idx], [f"test[{i}] (true: {classes[int(test.labels[i])]})" for i in args.idx]


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        check_outputs({"--out": args.out})
    model, cfg, classes, source = classifier(args)
    images, names = inputs(args, cfg, classes)
    probs, indices = top_k(model, images, args.top_k)
    refuse_non_finite(probs, names, source)
    rows = rows_of(names, probs, indices, classes)
    if args.out is None:
        for row in rows:
            print(f"{row['input']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"]))
    else:
        write_text(args.out, as_csv(rows) if args.out.suffix == ".csv" else json.dumps(rows, indent=1) + "\n")
        print(f"{len(rows)} prediction(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
