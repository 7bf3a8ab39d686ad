import csv
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import export, predict
from pipeline.dataset import CLASSES, load_split, to_input
from pipeline.model import CONFIG_FILE, ModelConfig, build_model, save_artifact
from tests.conftest import REPO


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models")
    return tmp_path / "models", model


def parse(out: str) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for line in out.strip().splitlines():
        name, _, ranked = line.rpartition(": ")
        pairs = [item.rsplit(" ", 1) for item in ranked.split(", ")]
        rows.append((name, [(c, float(p)) for c, p in pairs]))
    return rows


def test_idx_samples_get_top_k_classes_matching_the_model(tiny_raw, artifact, capsys):
    model_dir, model = artifact
    assert (
        predict.main(["--model-dir", str(model_dir), "--data", str(tiny_raw), "--idx", "0", "5", "--top-k", "4"]) == 0
    )
    rows = parse(capsys.readouterr().out)
    test = load_split(tiny_raw, "test")
    with torch.no_grad():
        expected = model(to_input(test.images[[0, 5]])).softmax(1)
    assert [name for name, _ in rows] == [f"test[{i}] (true: {CLASSES[int(test.labels[i])]})" for i in (0, 5)]
    for (_, ranked), probs in zip(rows, expected, strict=True):
        assert len(ranked) == 4
        assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
        assert ranked[0][0] == CLASSES[int(probs.argmax())]
        assert ranked[0][1] == pytest.approx(float(probs.max()), abs=1e-3)


def test_image_files_of_any_size_are_classified(tmp_path, artifact, capsys):
    paths = []
    for i, size in enumerate([(28, 28), (64, 48)]):
        path = tmp_path / f"item{i}.png"
        Image.new("RGB", size, color=(200, 200, 200)).save(path)
        paths.append(str(path))
    predict.main(["--model-dir", str(artifact[0]), *paths])
    rows = parse(capsys.readouterr().out)
    assert [name for name, _ in rows] == paths
    assert all(len(ranked) == 3 and all(c in CLASSES for c, _ in ranked) for _, ranked in rows)


def test_unknown_architecture_is_refused(tmp_path, artifact, tiny_raw, capsys):
    model_dir = artifact[0]
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    meta["model"]["name"] = "mystery_net"
    (model_dir / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as info:
        predict.main(["--model-dir", str(model_dir), "--data", str(tiny_raw), "--idx", "0"])
    assert info.value.code == 2
    assert "names model 'mystery_net', which this version does not know" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--idx", "137"], r"--idx 137 is out of range; the test set has 137 samples"),
        (["not-there.png"], r"image not-there.png does not exist"),
    ],
    ids=["idx-out-of-range", "missing-image"],
)
def test_bad_inputs_get_one_line(tiny_raw, artifact, capsys, args, match):
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), "--data", str(tiny_raw), *args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(match, err)


def test_an_out_that_names_a_folder_is_one_line_before_anything_runs(tmp_path, tiny_raw, artifact, capsys):
    (tmp_path / "preds.csv").mkdir()
    with pytest.raises(SystemExit) as info:
        predict.main(["--model-dir", str(artifact[0]), "--data", str(tiny_raw), "--idx", "0", "--out",
                      str(tmp_path / "preds.csv")])  # fmt: skip
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {tmp_path / 'preds.csv'} is a folder where a file must be; remove it or pass "
                            "another --out\n") and captured.out == ""  # fmt: skip
    assert not any((tmp_path / "preds.csv").iterdir()) and not list(tmp_path.glob(".tmp-*"))


def test_a_file_that_is_not_an_image_is_reported(tmp_path, artifact, capsys):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), str(path)])
    assert "is not an image PIL can read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("side", "said"), [(7_000, "is 7000x7000"), (20_000, "is over 178 megapixels")], ids=["large", "bomb"]
)
def test_a_huge_image_is_refused_before_decoding(tmp_path, artifact, capsys, side, said):
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path, optimize=True)  # a small file of 49 or 400 megapixels
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), str(path)])
    assert capsys.readouterr().err.strip() == f"error: {path} {said}; images over 40 megapixels are refused"


def test_a_fifo_is_refused_instead_of_read_also_inside_a_folder(tmp_path, artifact, capsys):
    import os

    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait forever for a writer
    for path, said in ((tmp_path / "pipe.png", "is not a regular file"), (tmp_path, "holds no image files")):
        with pytest.raises(SystemExit):
            predict.main(["--model-dir", str(artifact[0]), str(path)])
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {'folder ' if path.is_dir() else ''}{path} {said}")


def test_folders_and_globs_are_classified_into_csv_and_json(tmp_path, artifact):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (photos / name).touch()
    Image.new("L", (28, 28), 200).save(photos / "b.png")
    Image.new("RGB", (40, 30), (90, 90, 90)).save(photos / "a.jpg")
    shots = tmp_path / "shots"
    shots.mkdir()
    Image.new("L", (28, 28), 10).save(shots / "c.png")
    inputs = [str(photos), str(shots / "*.png")]  # a folder, and a glob the shell did not expand
    assert (
        predict.main(["--model-dir", str(artifact[0]), *inputs, "--top-k", "2", "--out", str(tmp_path / "p.json")]) == 0
    )
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["input"] for r in rows] == [str(photos / "a.jpg"), str(photos / "b.png"), str(shots / "c.png")]
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"] for r in rows)
    assert (
        predict.main(["--model-dir", str(artifact[0]), *inputs, "--top-k", "2", "--out", str(tmp_path / "p.csv")]) == 0
    )
    with (tmp_path / "p.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["input", "class_1", "probability_1", "class_2", "probability_2"]
    assert [(t["input"], t["class_1"], float(t["probability_1"])) for t in table] == [
        (r["input"], r["top"][0]["class"], pytest.approx(r["top"][0]["probability"], abs=1e-6)) for r in rows
    ]


@pytest.mark.parametrize(
    ("inputs", "said"),
    [(["empty"], "folder {tmp}/empty holds no image files"), (["{tmp}/*.png"], "{tmp}/*.png matches no file")],
    ids=["empty-folder", "glob-matching-nothing"],
)
def test_an_input_that_names_no_image_is_one_line(tmp_path, artifact, capsys, inputs, said):
    (tmp_path / "empty").mkdir()
    monkey_inputs = [str(tmp_path / i) if i == "empty" else i.format(tmp=tmp_path) for i in inputs]
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model-dir", str(artifact[0]), *monkey_inputs])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {said.format(tmp=tmp_path)}")


def test_a_non_square_image_is_letterboxed_not_stretched(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("L", (56, 28), 255).save(wide)  # a white band twice as wide as high
    image = predict.read_image(wide, ModelConfig(), invert=False)
    assert image.shape == (28, 28)
    assert image[:6].max() == 0 and image[-6:].max() == 0  # padded above and below with the dark background
    assert image[10:18].min() == 255  # the band itself, whole width, unstretched in height
    inverted = predict.read_image(wide, ModelConfig(), invert=True)
    assert inverted[:6].max() == 0 and inverted[10:18].max() == 0  # light background padded, then all inverted


RAMP = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)  # every grey level, 0 (black) to 255 (white)
BILEVEL = np.where(RAMP >= 128, 255, 0).astype(np.uint8)  # what a 1-bit file can hold of it
GREYS = [v for v in range(256) for _ in range(3)]  # a palette whose entry v is grey v


def hidden_black(picture: np.ndarray, mode: str) -> Image.Image:
    """``picture`` in ``mode`` (``LA``, ``PA``, ``RGBA``): its black pixels transparent, a light grey under them."""
    visible = picture > 0
    grey = Image.fromarray(np.where(visible, picture, 200).astype(np.uint8))
    image = Image.merge(mode, [grey] * (len(mode) - 1) + [Image.fromarray(visible.astype(np.uint8) * 255)])
    if mode == "PA":
        image.putpalette(GREYS)
    return image


def paletted(picture: np.ndarray, transparent: bool) -> Image.Image:
    """``picture`` as palette indices; with ``transparent``, entry 0 (black) is a transparent red."""
    image = Image.frombytes("P", (28, 28), picture.tobytes())
    image.putpalette([200, 60, 60, *GREYS[3:]] if transparent else GREYS)
    if transparent:
        image.info["transparency"] = 0
    return image


def scaled(picture: np.ndarray, white: int, dtype: str) -> Image.Image:
    """``picture`` with 255 (white) scaled to ``white``, in samples of ``dtype`` (rounded, unless floats)."""
    values = picture / 255 * white
    return Image.fromarray((values if np.dtype(dtype).kind == "f" else np.rint(values)).astype(dtype))


def unsigned_32bit_tiff(picture: np.ndarray, path) -> None:
    """A TIFF of unsigned 32-bit samples: Pillow writes signed ones, so its SampleFormat tag is rewritten."""
    scaled(picture, 2**32 - 1, "uint32").convert("I").save(path)
    data = path.read_bytes()
    signed = struct.pack("<HHIH", 339, 3, 1, 2)  # the IFD entry SampleFormat = 2 (signed integers)
    assert data.count(signed) == 1
    path.write_bytes(data.replace(signed, struct.pack("<HHIH", 339, 3, 1, 1)))


def saved(encode):
    """A writer that saves ``encode(picture)`` at the path it is given."""
    return lambda picture, path: encode(picture).save(path)


WRITERS = {  # id: (the mode the file opens as, its suffix, the picture it holds, how to write it)
    "I;16-png": ("I;16", ".png", RAMP, saved(lambda p: scaled(p, 65535, "uint16"))),
    "I;16B-tiff": ("I;16B", ".tif", RAMP, saved(lambda p: scaled(p, 65535, ">u2"))),
    "I-16bit-ppm": ("I", ".ppm", RAMP, saved(lambda p: scaled(p, 65535, "uint16"))),
    "I-signed-32bit-tiff": ("I", ".tif", RAMP, saved(lambda p: scaled(p, 2**31 - 1, "int32"))),
    "I-unsigned-32bit-tiff": ("I", ".tif", RAMP, unsigned_32bit_tiff),
    "F-tiff": ("F", ".tif", RAMP, saved(lambda p: scaled(p, 1, "float32"))),
    "P-png": ("P", ".png", RAMP, saved(lambda p: paletted(p, transparent=False))),
    "P-transparent-png": ("P", ".png", RAMP, saved(lambda p: paletted(p, transparent=True))),
    "PA-tiff": ("PA", ".tif", RAMP, saved(lambda p: hidden_black(p, "PA"))),
    "LA-png": ("LA", ".png", RAMP, saved(lambda p: hidden_black(p, "LA"))),
    "RGBA-png": ("RGBA", ".png", RAMP, saved(lambda p: hidden_black(p, "RGBA"))),
    "CMYK-tiff": ("CMYK", ".tif", RAMP, saved(lambda p: Image.fromarray(p).convert("CMYK"))),
    "1-png": ("1", ".png", BILEVEL, saved(lambda p: Image.fromarray(p >= 128))),
    "RGB-png": ("RGB", ".png", RAMP, saved(lambda p: Image.fromarray(p).convert("RGB"))),
}


@pytest.mark.parametrize(("mode", "suffix", "picture", "write"), WRITERS.values(), ids=WRITERS.keys())
def test_every_image_mode_reads_as_the_same_8bit_picture(tmp_path, mode, suffix, picture, write):
    path = tmp_path / f"picture{suffix}"
    write(picture, path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    image = predict.read_image(path, ModelConfig(), invert=False)
    assert image.numpy().tolist() == picture.tolist()


@pytest.mark.parametrize(("invert", "hidden", "item"), [(False, 255, 90), (True, 0, 255 - 90)], ids=["plain", "invert"])
def test_a_transparent_background_is_the_background_the_reading_assumes(tmp_path, invert, hidden, item):
    path = tmp_path / "cutout.png"
    picture = np.zeros((28, 28, 4), dtype=np.uint8)
    picture[..., :3] = hidden  # transparent, over the grey the reading does not assume
    picture[8:20, 8:20] = (90, 90, 90, 255)  # an opaque grey square
    Image.fromarray(picture).save(path)
    image = predict.read_image(path, ModelConfig(), invert=invert)
    assert image[0, 0] == 0  # black read as is; white under --invert, then inverted with the rest
    assert image[14, 14] == item


@pytest.mark.parametrize(
    ("values", "said"),
    [([0.0, 255.0], r"its F samples run 0 to 255; black is 0 and white is 1"), ([0.5, float("nan")], r"run nan")],
    ids=["float-0-to-255", "float-nan"],
)
def test_grey_samples_beyond_white_are_refused_not_clipped(tmp_path, artifact, capsys, values, said):
    path = tmp_path / "float.tif"
    Image.fromarray(np.resize(np.array(values, dtype=np.float32), (28, 28))).save(path)
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model-dir", str(artifact[0]), str(path), "--out", str(tmp_path / "p.csv")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(path))} cannot be read as a grey picture: .*{said}.*\n", err)
    assert not (tmp_path / "p.csv").exists()


def test_non_finite_probabilities_are_refused_and_nothing_written(tmp_path, tiny_raw, capsys):
    model = build_model(ModelConfig())
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(1e8)  # finite weights whose activations overflow float32 within seven layers
    save_artifact(model, ModelConfig(), tmp_path / "models")
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as stop:
        predict.main(
            ["--model-dir", str(tmp_path / "models"), "--data", str(tiny_raw), "--idx", "3", "4", "--out", str(out)]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: model {tmp_path / 'models'} gives NaN or infinite probabilities for test[3] (true: Dress) "
        "(2 of 2 inputs); retrain: dvc repro --force train\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [["fashion-predict"], ["fashion-benchmark"], [sys.executable, "-m", "scripts.predict"]],
    ids=["fashion-predict", "fashion-benchmark", "python-m-scripts-predict"],
)
def test_the_console_commands_and_the_module_form_answer_help(command):
    if command[0].startswith("fashion-"):
        command = [str(Path(sys.executable).parent / command[0])]  # installed by `pip install -e .`
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr


def garment() -> torch.Tensor:
    """A 28 x 28 shirt as Fashion-MNIST draws one: light, on black, touching the top and bottom edges."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[0:28, 8:20] = 200  # body
    image[0:12, 2:26] = 170  # sleeves
    image[4:24, 12:16] = 240  # a light placket
    return image


@pytest.mark.parametrize("light_background", [True, False], ids=["dark-item-on-paper", "light-item-on-black"])
def test_a_photo_reads_as_fashion_mnist_made_its_images_and_a_letterbox_does_not(tmp_path, light_background):
    import random

    from bench.photos import render_photo

    original = garment()
    photo = render_photo(original, random.Random(3))  # enlarged, off-centre on a 640 x 480 canvas, noise, JPEG
    if not light_background:
        photo = Image.fromarray(255 - np.asarray(photo))
    photo.save(tmp_path / "shirt.jpg")
    cfg = ModelConfig()
    read = predict.read_image(tmp_path / "shirt.jpg", cfg, invert=False, photo=True)
    letterboxed = predict.read_image(tmp_path / "shirt.jpg", cfg, invert=light_background)

    def off(image: torch.Tensor) -> float:
        return (image.float() - original.float()).abs().mean().item()

    assert off(read) < 20, read  # the item fills the frame again, light on black (sharpening leaves halos)
    assert off(letterboxed) > 3 * off(read)  # a small item in a large frame


def test_photo_and_invert_together_are_refused(artifact, capsys):
    with pytest.raises(SystemExit) as failed:
        predict.main(["x.png", "--photo", "--invert", "--model-dir", str(artifact)])
    assert failed.value.code == 2 and "--photo negates a light background itself" in capsys.readouterr().err


@pytest.fixture
def exported(tmp_path, tiny_raw, artifact, write_params) -> Path:
    """The export stage's ONNX file of ``artifact``'s model (its spec beside it)."""
    out = tmp_path / "onnx"
    assert export.main(export.command(write_params(), tiny_raw, artifact[0], out, tmp_path / "onnx.json")[3:]) == 0
    return out / "model.onnx"


def no_torch_model(cfg: ModelConfig) -> torch.nn.Module:
    raise AssertionError("build_model was called")


def as_photos(tmp_path: Path, raw: Path) -> list[str]:
    """Test images as a user would photograph them: dark on light, ten times the size."""
    test = load_split(raw, "test")
    paths = [tmp_path / f"photo{i}.png" for i in range(4)]
    for i, path in enumerate(paths):
        Image.fromarray((255 - test.images[i]).numpy()).resize((280, 280)).save(path)
    return [*map(str, paths), "--photo"]


@pytest.mark.parametrize("given", ["idx", "photos"])
def test_onnx_gives_the_torch_paths_predictions_and_builds_no_torch_model(
    tmp_path, tiny_raw, artifact, exported, monkeypatch, given
):
    args = ["--data", str(tiny_raw), "--idx", *map(str, range(0, 137, 9))] if given == "idx" else as_photos(
        tmp_path, tiny_raw
    )  # fmt: skip
    predict.main([*args, "--model-dir", str(artifact[0]), "--top-k", "10", "--out", str(tmp_path / "torch.json")])
    monkeypatch.setattr("pipeline.model.build_model", no_torch_model)
    with pytest.raises(AssertionError, match="build_model was called"):  # the patch does stop the torch path
        predict.main([*args, "--model-dir", str(artifact[0])])
    predict.main([*args, "--onnx", str(exported), "--top-k", "10", "--out", str(tmp_path / "onnx.json")])
    by_torch, by_onnx = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("torch", "onnx"))
    assert [row["input"] for row in by_onnx] == [row["input"] for row in by_torch] and len(by_onnx) >= 4
    for t, o in zip(by_torch, by_onnx, strict=True):
        assert o["top"][0]["class"] == t["top"][0]["class"]
        probabilities = {x["class"]: x["probability"] for x in t["top"]}
        assert {x["class"]: x["probability"] for x in o["top"]} == pytest.approx(probabilities, abs=2e-6)


def test_onnx_prints_as_the_torch_path_does(tiny_raw, exported, capsys):
    assert predict.main(["--data", str(tiny_raw), "--idx", "0", "5", "--onnx", str(exported)]) == 0
    rows = parse(capsys.readouterr().out)
    assert [name for name, _ in rows] == ["test[0] (true: T-shirt/top)", "test[5] (true: Sandal)"]
    assert all(len(ranked) == 3 and all(c in CLASSES for c, _ in ranked) for _, ranked in rows)


@pytest.mark.parametrize(
    ("args", "said"),
    [(["--onnx", "shirt.png"], "--onnx shirt.png: give an .onnx file, or put --onnx after the images"),
     (["shirt.png", "--onnx", "m.onnx", "--model-dir", "models"], "--onnx runs the ONNX file and reads no model")],
    ids=["image-taken-as-path", "model-dir-too"],
)  # fmt: skip
def test_onnx_usage_errors_are_one_line(capsys, args, said):
    with pytest.raises(SystemExit) as stop:
        predict.main(args)
    assert stop.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["corrupt", "no-onnxruntime"])
def test_an_onnx_model_that_cannot_run_is_one_line_and_writes_nothing(
    tmp_path, tiny_raw, exported, capsys, monkeypatch, fault
):
    if fault == "corrupt":
        exported.write_bytes(exported.read_bytes()[: len(exported.read_bytes()) // 2])
        said = f"error: onnxruntime cannot load {exported} ("
    else:
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
        said = "error: onnxruntime is not installed; pip install onnxruntime (or pip install -e .)"
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as stop:
        predict.main(["--data", str(tiny_raw), "--idx", "0", "--onnx", str(exported), "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(said) and err.count("\n") == 1, err
    assert not out.exists()
